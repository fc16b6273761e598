"""The mixer registry: every block kind's MACs / params against the built module, round trips."""

from __future__ import annotations

import json

import pytest
import torch

from search_space.arch import MIXER_KINDS, BlockArch, ViTArch
from search_space.cost import count_macs, count_params, measure_macs
from search_space.mixers import (
    ConvMixer,
    MixerKind,
    ValuePrunedAttention,
    get_mixer,
    list_mixers,
    register_mixer,
)
from search_space.subnet import ARCH_FILE, build_from_arch, export_onnx, export_subnet, load_subnet


def _arch(blocks: list[BlockArch], embed_dim: int = 64, **kw) -> ViTArch:
    args = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=embed_dim,
                blocks=tuple(blocks))
    return ViTArch(**{**args, **kw})


def A(h: int, d: int, m: int, v: tuple[int, ...] | None = None) -> BlockArch:  # noqa: N802
    return BlockArch(h, d, m, v_dims=v)


def C(kind: str, c: int, m: int) -> BlockArch:  # noqa: N802
    return BlockArch(0, 0, m, mixer=kind, conv_dim=c)


NONE = BlockArch(0, 0, 96, mixer="none")
DENSE = [A(4, 16, 128)] * 4

CASES = {
    "attn": _arch([A(4, 16, 128), A(2, 24, 96)]),
    "attn_v_dims": _arch([A(3, 32, 192, (32, 20, 27)), A(2, 16, 64, (1, 16))], 96),
    "conv3": _arch([C("conv3", 16, 128), C("conv3", 8, 64)]),
    "conv1": _arch([C("conv1", 16, 128), C("conv1", 5, 64)]),
    "none": _arch([NONE, A(4, 16, 128)]),
    "no_mlp": _arch([A(4, 16, 0), C("conv3", 16, 0), BlockArch(0, 0, 0, mixer="none")]),
    "mixed": _arch([A(4, 32, 256, (32, 8, 17, 1)), C("conv3", 32, 512), C("conv1", 32, 128),
                    NONE], 128),
    "mixed_reg_ls_nobias": _arch([C("conv3", 8, 64), A(2, 16, 64, (5, 16)), NONE, A(2, 8, 32)],
                                 32, reg_tokens=2, layer_scale=True, qkv_bias=False,
                                 global_pool="avg", fc_norm=True),
    "fewer_blocks": _arch(DENSE[:2]),
    "tokens": _arch([A(4, 16, 128), NONE, A(2, 16, 64, (3, 16))],
                    tokens=(tuple(range(17)), (0, 1, 2, 5, 7, 9, 16), (0, 2, 7, 16))),
}


def _randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and weights, so round trips compare something."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("name", list(CASES))
def test_count_matches_flop_counter_params_and_reads_back(name):
    arch = CASES[name]
    model = build_from_arch(arch)
    assert count_macs(arch) == measure_macs(model, arch)  # exact: fused attention off
    assert count_params(arch) == sum(p.numel() for p in model.parameters())
    assert ViTArch.from_timm(model) == arch
    assert len(model.blocks) == arch.depth
    with torch.no_grad():
        assert _randomize_(model)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_fewer_blocks_cost_less_by_their_share():
    dense, shallow = _arch(DENSE), CASES["fewer_blocks"]
    per_block = (count_macs(dense) - count_macs(shallow)) / 2
    assert per_block == count_macs(_arch(DENSE[:3])) - count_macs(shallow)


def test_methods_section_7_figures():
    """28x28, patch 7, D 128, 4 blocks of 4 heads x 32, MLP 512 (METHODS.md section 7)."""
    dense = _arch([A(4, 32, 512)] * 4, 128)
    ratio = {k: count_macs(_arch([C(k, 32, 512)] * 4, 128)) / count_macs(dense)
             for k in ("conv3", "conv1")}
    assert round(ratio["conv3"], 2) == 0.85 and round(ratio["conv1"], 2) == 0.69
    assert round(1 - count_macs(_arch([A(4, 32, 512)] * 3, 128)) / count_macs(dense), 2) == 0.25


def test_value_pruned_attention_by_hand_and_fused_equals_explicit():
    torch.manual_seed(0)
    m = ValuePrunedAttention(48, 3, 8, (8, 3, 5), qkv_bias=True).eval()
    x = torch.randn(2, 10, 48)
    q, k, v = m.qkv(x).split([24, 24, 16], dim=-1)
    outs, start = [], 0
    for h, w in enumerate((8, 3, 5)):
        qh, kh = q[..., 8 * h:8 * h + 8], k[..., 8 * h:8 * h + 8]  # (B, T, d)
        a = torch.softmax(qh @ kh.transpose(1, 2) / 8**0.5, dim=-1)  # (B, T, T)
        outs.append(a @ v[..., start:start + w])
        start += w
    want = m.proj(torch.cat(outs, dim=-1))
    with torch.no_grad():
        m.fused_attn = False
        torch.testing.assert_close(m(x), want)
        m.fused_attn = True
        torch.testing.assert_close(m(x), want)


def test_conv_mixer_reads_the_grid_row_major_and_passes_the_prefix():
    """Output at patch (r, c) = input at (r, c - 1) with a kernel that picks the left neighbour."""
    m = ConvMixer(dim=2, conv_dim=1, kernel=3, num_prefix_tokens=1, grid=3).eval()
    with torch.no_grad():
        m.conv.weight.zero_()
        m.conv.weight[0, 0, 1, 0] = 1.0
        m.conv.bias.zero_()
        m.bn.eps = 0.0
        m.proj.weight.copy_(torch.tensor([[1.0], [0.0]]))
        m.proj.bias.zero_()
        x = torch.zeros(1, 10, 2)
        x[0, :, 0] = torch.arange(10.0) + 1  # cls = 1, patch n = n + 2
        y = m(x)
    assert torch.equal(y[:, :1], x[:, :1])  # the cls token leaves unchanged
    want = [0.0 if c == 0 else (r * 3 + c - 1) + 2.0 for r in range(3) for c in range(3)]
    assert y[0, 1:, 0].tolist() == want


def test_export_load_round_trip_mixed(tmp_path):
    arch = CASES["mixed_reg_ls_nobias"]
    model = _randomize_(build_from_arch(arch), seed=1)
    x = torch.randn(3, 1, 28, 28)
    folder = export_subnet(model, arch, tmp_path / "sub", extra={"macs": count_macs(arch)})
    back = load_subnet(folder)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    assert ViTArch.from_timm(back) == arch
    blob = json.loads((folder / ARCH_FILE).read_text())
    assert blob["arch"]["blocks"][1]["v_dims"] == [5, 16]  # JSON list, read back as a tuple


def test_load_subnet_accepts_a_bare_arch_dict(tmp_path):
    arch = CASES["mixed"]
    model = _randomize_(build_from_arch(arch), seed=2)
    folder = export_subnet(model, arch, tmp_path / "sub")
    (folder / ARCH_FILE).write_text(arch.to_json())  # older dense-cache layout: no "arch" key
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(load_subnet(folder)(x), model(x), rtol=0, atol=0)
    (folder / ARCH_FILE).write_text(json.dumps({"macs": 1}))
    with pytest.raises(ValueError, match="expected .*'arch'.* got keys \\['macs'\\]"):
        load_subnet(folder)


def test_onnx_export_with_value_dims_and_convs(tmp_path):
    import onnxruntime as ort

    arch = _arch([A(3, 32, 64, (32, 20, 27)), C("conv3", 16, 64), C("conv1", 8, 0), NONE], 96)
    model = _randomize_(build_from_arch(arch), seed=3)
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    path = export_onnx(model, arch, tmp_path / "model.onnx")
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == fused
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 28, 28)  # another batch size than exported: the batch axis is dynamic
    (out,) = sess.run(None, {"images": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=2, head_dim=16, mixer="conv3", conv_dim=8), r"num_heads=2, head_dim=16"),
    (dict(num_heads=0, head_dim=0, mixer="conv1"), r"conv_dim must be >= 1, got 0"),
    (dict(num_heads=0, head_dim=0, mixer="none", conv_dim=3), r"conv_dim must be 0, got 3"),
    (dict(num_heads=0, head_dim=0, mixer="conv3", conv_dim=4, v_dims=(1,)),
     r"v_dims must be None, got \(1,\)"),
    (dict(num_heads=3, head_dim=32, v_dims=(32, 33, 1)), r"\[1, head_dim=32\], got \(32, 33, 1\)"),
    (dict(num_heads=3, head_dim=32, v_dims=(32,)), r"num_heads=3 values"),
    (dict(num_heads=0, head_dim=16), r"num_heads must be >= 1, got 0"),
    (dict(num_heads=4, head_dim=16, conv_dim=8), r"conv_dim must be 0 for attention, got 8"),
    (dict(num_heads=4, head_dim=16, mlp_hidden=-1), r"mlp_hidden must be >= 0 .*got -1"),
    (dict(num_heads=4, head_dim=16, mixer="mlp"), r"one of \('attn'.*got 'mlp'"),
])
def test_block_validation_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockArch(**{"mlp_hidden": 64, **kwargs})


def test_arch_validation_and_json():
    with pytest.raises(ValueError, match=r"token pruning .* conv mixers \(blocks \[1\]\)"):
        _arch([A(4, 16, 64), C("conv3", 8, 64)], tokens=(tuple(range(17)), tuple(range(17))))
    with pytest.raises(ValueError, match="at least one block"):
        _arch([])
    arch = CASES["mixed"]
    back = ViTArch.from_dict(json.loads(arch.to_json()))
    assert back == arch and back.blocks[0].v_dims == (32, 8, 17, 1)
    old = {**arch.to_dict(), "blocks": [{"num_heads": 2, "head_dim": 8, "mlp_hidden": 16}]}
    assert ViTArch.from_dict(old).blocks == (BlockArch(2, 8, 16, "attn", None, 0),)


def test_registry():
    assert list_mixers() == sorted(MIXER_KINDS)
    with pytest.raises(ValueError, match="'attn' is already registered"):
        @register_mixer
        class Again(MixerKind):
            name = "attn"
    with pytest.raises(ValueError, match=r"unknown mixer 'lstm'; registered: \['attn'"):
        get_mixer("lstm")
    with pytest.raises(ValueError, match="needs patches"):
        get_mixer("conv3").macs(17, None, 64, C("conv3", 8, 64))
