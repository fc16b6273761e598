"""The latency table: real measurements on tiny ViTs, its JSON, interpolation, gradients, errors.

The whole module runs torch on one intra-op thread: on a shared 2-core machine, two threads
with a busy neighbour stall on each other (one is descheduled at a barrier), and end-to-end
timings jump 3-30x while the short per-module ones dodge it; one thread keeps both honest.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from search_space.arch import BlockArch
from search_space.latency import LatencyTable, dense_arch, load_table, main, measure_table

TINY = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=128, depth=4,
            num_heads=4)  # the project's default model: MLP 512, head_dim 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def table() -> LatencyTable:
    """D in {64, 128}; head dims {16, 32} x 1..4 heads; MLP {256, 512}: ~30 timings."""
    dense = dense_arch("vit_tiny_patch16_224", **TINY)
    return measure_table("vit_tiny_patch16_224", dense, batch=64, divisions=2, reps=5)


def test_grid_is_what_a_search_reaches(table):
    assert table.embed == [64, 128]
    assert table.widths == {"attn": [16, 32, 48, 64, 96, 128], "mlp": [256, 512],
                            "attn_dims": [16, 32]}
    assert table.key["batch"] == 64 and table.key["threads"] == 1


def test_json_round_trip(table, tmp_path):
    back = LatencyTable.load(table.save(tmp_path / "t.json"))
    assert back.to_dict() == table.to_dict()
    assert back.dense == table.dense
    assert float(back.attn(100, 40)) == float(table.attn(100, 40))


def test_interpolation_exact_at_grid_points_between_neighbours_clamped(table):
    for i, D in enumerate(table.embed):
        assert float(table.stem_head(D)) == table.ms["stem_head"][i]
        for part, fn in (("attn", table.attn), ("mlp", table.mlp)):
            ws, row = table.widths[part], table.ms[part][i]
            for j, w in enumerate(ws):
                assert float(fn(D, w)) == row[j]
            for j in range(len(ws) - 1):  # midpoints: the mean of the two neighbours
                mid = float(fn(D, (ws[j] + ws[j + 1]) / 2))
                assert mid == pytest.approx((row[j] + row[j + 1]) / 2, rel=1e-12)
            assert float(fn(D, 10 * ws[-1])) == row[-1]  # clamped outside the grid
            assert float(fn(D, 1)) == row[0]
    mid_d = float(table.mlp(96, 512))  # bilinear along D too
    assert mid_d == pytest.approx((table.ms["mlp"][0][1] + table.ms["mlp"][1][1]) / 2)
    # a real measurement, not noise: twice the MLP width costs clearly more
    assert table.ms["mlp"][1][1] > 1.2 * table.ms["mlp"][1][0]


def test_gradients_flow_through_widths_and_embed(table):
    D = torch.tensor(100.0, requires_grad=True)
    wa = torch.tensor(40.0, requires_grad=True)  # between 32 and 48
    wm = torch.tensor(300.0, requires_grad=True)  # between 256 and 512
    total = table.stem_head(D) + table.attn(D, wa) + table.mlp(D, wm)
    total.backward()
    for g in (D.grad, wa.grad, wm.grad):
        assert g is not None and torch.isfinite(g) and g != 0
    # piecewise linear: d/dw at a grid D is the segment's slope
    w = torch.tensor(40.0, requires_grad=True)
    table.attn(128, w).backward()
    row = table.ms["attn"][1]
    assert float(w.grad) == pytest.approx((row[2] - row[1]) / (48 - 32), rel=1e-5)
    assert table.mlp(torch.tensor([64.0, 128.0]), torch.tensor([256.0, 512.0])).shape == (2,)


def test_prediction_matches_measured_latency(table):
    dense = table.dense
    archs = {
        "dense": dense,
        "half MLP": replace(dense, blocks=tuple(BlockArch(4, 32, 256) for _ in range(4))),
        "mixed": replace(dense, blocks=(BlockArch(4, 32, 512), BlockArch(2, 24, 512),
                                        BlockArch(4, 32, 384), BlockArch(1, 16, 256))),
    }
    for name, arch in archs.items():
        pred, meas = table.of_arch(arch), table.measure_arch(arch, reps=10)
        print(f"{name}: predicted {pred:.3f} ms, measured {meas:.3f} ms, ratio {pred / meas:.3f}")
        assert pred == pytest.approx(meas, rel=0.3), name
    smaller = replace(dense, blocks=(BlockArch(4, 32, 512), BlockArch(0, 0, 512, mixer="none"),
                                     BlockArch(4, 32, 0), BlockArch(4, 32, 512)))
    parts = table.attn(128, 128) + table.mlp(128, 512)
    assert table.of_arch(smaller) == pytest.approx(table.of_arch(dense) - float(parts))


def test_arch_the_table_does_not_cover_is_refused(table):
    dense = table.dense
    conv = replace(dense, blocks=(*dense.blocks[:2], BlockArch(0, 0, 512, "conv3", conv_dim=8),
                                  dense.blocks[3]))
    with pytest.raises(ValueError, match="block 2 has mixer 'conv3'"):
        table.of_arch(conv)
    with pytest.raises(ValueError, match="img_size"):
        table.of_arch(replace(dense, img_size=56))


def test_bad_model_name_and_missing_table(tmp_path, capsys):
    assert main(["vit_nonexistent_model", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'vit_nonexistent_model' is not a timm model" in err and err.count("\n") == 1
    with pytest.raises(FileNotFoundError, match="no latency table for model 'vit_tiny_patch16"):
        load_table("vit_tiny_patch16_224", cache_dir=tmp_path, **TINY)


def test_cli_measures_then_finds_the_cache(tmp_path, capsys):
    small = ["--img-size", "28", "--patch-size", "14", "--in-chans", "1", "--num-classes", "10",
             "--embed-dim", "32", "--depth", "1", "--num-heads", "1", "--batch", "8"]
    args = ["vit_tiny_patch16_224", *small, "--cache-dir", str(tmp_path)]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("measured: ") and "batch 8" in first
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("cached: ")
    assert len(list(tmp_path.glob("*.json"))) == 1
    table = load_table("vit_tiny_patch16_224", batch=8, cache_dir=tmp_path, img_size=28,
                       patch_size=14, in_chans=1, num_classes=10, embed_dim=32, depth=1,
                       num_heads=1)
    assert table.embed == [16, 24, 32] and table.widths["attn"] == [8, 16, 24, 32]
    assert main([*args, "--force"]) == 0
    assert capsys.readouterr().out.startswith("measured: ")


def test_attention_cells_are_kept_apart(table):
    """Heads x head_dim splits of one width are measured apart and read back exactly."""
    for h in (1, 2, 4):
        for j, d in enumerate(table.widths["attn_dims"]):
            assert float(table.attn_cell(128, h, d)) == pytest.approx(
                table.ms["attn_cells"][1][h - 1][j])
    got = table.attn_cell(128, torch.tensor([1, 4]), torch.tensor([32.0, 16.0]))
    assert got.shape == (2,)
    with pytest.raises(ValueError, match="heads"):
        table.attn_cell(128, 5, 16)
