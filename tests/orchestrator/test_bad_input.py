"""The bad-input catalogue (issue 17): every case gives one clear message naming the bad value
and what is allowed, before expensive work. Config cases go through the real command
(`python -m orchestrator.run ... --dry-run`, in process): exit code 2, one `error:` line, and
no Ray and no run folder. File cases load what a user would hand us: subnets, checkpoints,
weights."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.run import main
from search_space.arch import ViTArch
from search_space.models import build_vit
from search_space.subnet import export_subnet, load_subnet
from trainers.checkpoint import load_checkpoint, load_method_state, save_checkpoint
from trainers.config import SearchConfig
from trainers.methods import get_method, list_methods

BASE = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2"]

# (overrides, what the message must say): one row per out-of-range value of every section
CONFIG_CASES = [
    (["data.dataset=foo"], r"data.dataset: .*'fashion_mnist'.*got 'foo'"),
    (["data.val_fraction=1.5"], r"data.val_fraction: .*less than 1 \(got 1.5\)"),
    (["data.batch_size=0"], r"data.batch_size: .*greater than or equal to 1 \(got 0\)"),
    (["model.name=nope"], r"model.name='nope' is not a timm model"),
    (["model.patch_size=5"], r"not divisible by patch size 5.*model.patch_size=4"),
    (["model.num_heads=3"], r"model.embed_dim=32 is not divisible by model.num_heads=3"),
    (["model.depth=0"], r"model.depth: .*greater than or equal to 1 \(got 0\)"),
    (["pretrain.epochs=-1"], r"pretrain.epochs: .*greater than or equal to 0 \(got -1\)"),
    (["pretrain.lr=0"], r"pretrain.lr: .*greater than 0 \(got 0\)"),
    (["search.method=foo"], r"search.method='foo'; allowed: \['dense_control', 'ofb'"),
    (["search.budget=1.5"], r"search.budget: .*less than or equal to 1 \(got 1.5\)"),
    (["search.epochs=0"], r"search.epochs: .*greater than 0 \(got 0\)"),
    (["search.ofb.mask_ratio=1.5"], r"search.ofb.mask_ratio: .*less than 1 \(got 1.5\)"),
    (["search.uvc.kd_alpha=2"], r"search.uvc.kd_alpha: .*less than or equal to 1 \(got 2\)"),
    (["search.spvit.arc_lr=0"], r"search.spvit.arc_lr: .*greater than 0 \(got 0\)"),
    (["search.vit_slim.width_multiple=0"], r"search.vit_slim.width_multiple: .*got 0"),
    (["search.two_stage.allocation=best"], r"search.two_stage.allocation: .*got 'best'"),
    (["search.method=uvc", "search.budget_metric=latency"],
     r"budget_metric='latency' is not supported by search.method='uvc'"),
    (["finetune.lr=-1"], r"finetune.lr: .*greater than 0 \(got -1\)"),
    (["scaling.num_workers=0"], r"scaling.num_workers: .*got 0"),
    (["scaling.num_workers=64"], r"scaling.num_workers=64 .* needs 64 CPUs; this machine has"),
    (["scaling.precision=fp16"], r"scaling.precision: .*'bf16' \(got 'fp16'\)"),
    (["ray.health_check_interval_s=0"], r"ray.health_check_interval_s: .*got 0"),
    (["sweep.num_samples=0"], r"sweep.num_samples: .*got 0"),
    (["search.foo=1"], r"search.foo: unknown key"),
    (["name=a b"], r"name: .*pattern"),
    # budgets a method cannot reach: below its smallest subnet, above the dense model
    (["sweep=null", "search.budget=0.01"], r"search.budget=0.01 asks for .* below the "
     r"smallest subnet search.method='ofb' can reach .*allowed: search.budget in \[0\.\d+, 1\]"),
    (["sweep=null", "search.method=uvc", "search.budget=0.001"], r"below the smallest subnet "
     r"search.method='uvc'"),
    (["sweep=null", "search.target_gmacs=1"],
     r"search.target_gmacs=1 asks for .* above the dense model's"),
    # schedules: a cron that never fires, a zone that does not exist
    (["schedule.cron=0 0 30 2 *"], r"cron '0 0 30 2 \*' never fires"),
    (["schedule.cron=61 * * * *"], r"cron '61 \* \* \* \*' is not a valid 5-field cron"),
    (["schedule.cron=0 2 * * *", "schedule.timezone=Mars/Base"],
     r"schedule.timezone='Mars/Base' is not an IANA time zone"),
]


def _refused(capsys, argv: list[str], pattern: str, tmp_path: Path) -> None:
    out_dir = tmp_path / "runs"
    code = main([*argv, f"output_dir={out_dir}", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("error:") == 1, err
    assert re.search(pattern, err, re.S), err
    assert not out_dir.exists()  # nothing written before the refusal


@pytest.mark.parametrize(("overrides", "pattern"), CONFIG_CASES,
                         ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_config_case_is_refused_before_ray(overrides, pattern, capsys, tmp_path, fmnist_dir):
    _refused(capsys, [*BASE, f"data.root={fmnist_dir}", *overrides], pattern, tmp_path)


def test_a_sweep_space_budget_below_a_method_floor_is_refused(capsys, tmp_path, fmnist_dir):
    space = "sweep.space={search.budget: {type: uniform, low: 0.005, high: 0.5}}"
    _refused(capsys, [*BASE, f"data.root={fmnist_dir}", space, "sweep.points_to_evaluate=[]"],
             r"sweep.space search.budget=0.005 with search.method='ofb': search.budget=0.005 "
             r"asks for", tmp_path)


@pytest.mark.parametrize("name", [n for n in list_methods() if n != "dense_control"])
def test_every_method_refuses_budgets_outside_its_range(name):
    """Each method's floor is a subnet it can reach: the floor's budget passes, just below it
    fails, and a target above the dense model fails."""
    vit = build_vit("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                    num_classes=10, embed_dim=64, depth=3, num_heads=4, device="meta")
    arch = ViTArch.from_timm(vit)
    m = get_method(name)
    floor = m(SearchConfig(method=name, budget=0.5), 1, arch).smallest_arch()
    from search_space.cost import count_macs

    f = count_macs(floor) / count_macs(arch)
    m(SearchConfig(method=name, budget=f + 1e-6), 1, arch).check_budget()
    with pytest.raises(ValueError, match=rf"search.budget={f * 0.9:g} .*search.method='{name}'"):
        m(SearchConfig(method=name, budget=f * 0.9), 1, arch).check_budget()
    with pytest.raises(ValueError, match="above the dense model"):
        m(SearchConfig(method=name, target_gmacs=1.0), 1, arch).check_budget()


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(path)


def _folder(root: Path, kind: str) -> Path:
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            if kind == "no_classes":
                shutil.rmtree(d)
            elif kind == "empty_class" and c == "b":
                continue
            else:
                for i in range(3):
                    _png(d / f"{i}.png")
            if kind == "unreadable" and c == "b":
                (d / "broken.png").write_bytes(b"not an image")
    return root


@pytest.mark.parametrize(("kind", "pattern"), [
    ("missing", r"data.root='.*/missing' must hold train/<class>/"),
    ("no_classes", r"train/ Couldn't find any class folder"),
    ("empty_class", r"Found no valid file for the classes b"),
    ("unreadable", r"2 of 14 image file\(s\) cannot be read as images: .*train/b/broken.png"),
])
def test_image_folder_case_is_refused(kind, pattern, capsys, tmp_path):
    root = tmp_path / kind if kind == "missing" else _folder(tmp_path / kind, kind)
    _refused(capsys, [*BASE, "data.dataset=imagefolder", f"data.root={root}",
                      "model.num_classes=2", "model.img_size=28", "model.patch_size=7"],
             pattern, tmp_path)


def _subnet(tmp_path: Path) -> Path:
    vit = build_vit("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                    num_classes=10, embed_dim=32, depth=2, num_heads=2)
    return export_subnet(vit, ViTArch.from_timm(vit), tmp_path / "subnet")


def _edit(block: int, key: str, value):
    def go(f: Path) -> None:
        blob = json.loads((f / "arch.json").read_text())
        blob["arch"]["blocks"][block][key] = value
        (f / "arch.json").write_text(json.dumps(blob))
    return go


def _write(name: str, data: bytes | None = None, cut: int | None = None):
    def go(f: Path) -> None:
        p = f / name
        p.write_bytes(p.read_bytes()[:cut] if cut is not None else data)
    return go


def _newer(f: Path) -> None:
    blob = json.loads((f / "arch.json").read_text())
    (f / "arch.json").write_text(json.dumps({**blob, "format": 99}))


SUBNET_CASES = {
    "truncated weights": (_write("model.safetensors", cut=100),
                          r"model.safetensors: not a readable safetensors weights file"),
    "foreign weights": (_write("model.safetensors", b"PK\x03\x04" + b"\0" * 64),
                        r"model.safetensors: not a readable safetensors weights file"),
    "edited width": (_edit(1, "mlp_hidden", 100), r"'blocks.1.mlp.fc1.weight' is \[128, 32\] "
                     r"in the file but the architecture needs \[100, 32\]; it follows "
                     r"blocks\[1\] \(mlp_hidden"),
    "edited type": (_edit(0, "num_heads", "two"), r"arch.blocks\[0\] = .* num_heads must be an "
                    r"integer, got 'two'"),
    "unknown field": (_edit(0, "heads", 2), r"arch.blocks\[0\] .*unknown field\(s\) \['heads'\]"),
    "zero head_dim": (_edit(1, "head_dim", 0), r"arch.blocks\[1\] .*head_dim must be >= 1"),
    "not json": (_write("arch.json", b"{oops"), r"arch.json: not a readable arch.json"),
    "newer format": (_newer, r"arch.json format 99 is newer than this version reads"),
}


@pytest.mark.parametrize("case", list(SUBNET_CASES))
def test_subnet_folder_case_names_file_block_and_field(case, tmp_path):
    corrupt, pattern = SUBNET_CASES[case]
    folder = _subnet(tmp_path)
    corrupt(folder)
    with pytest.raises(ValueError, match=pattern) as e:
        load_subnet(folder)
    assert str(folder) in str(e.value)


@pytest.mark.parametrize(("name", "pattern"), [
    ("model.safetensors", r"model.safetensors: not a readable safetensors"),
    ("optimizer.pt", r"optimizer.pt: cannot read this checkpoint file"),
    ("state.json", r"state.json: cannot read this checkpoint's state"),
    ("method.pt", r"method.pt: cannot read this checkpoint file"),
])
def test_a_truncated_checkpoint_file_is_named(name, pattern, tmp_path):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    ckpt = save_checkpoint(tmp_path / "ckpt", model, {"epoch": 0}, opt,
                           method_state={"x": torch.ones(3)})
    p = ckpt / name
    p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 3)])
    with pytest.raises(ValueError, match=pattern):
        if name == "method.pt":
            load_method_state(ckpt)
        else:
            load_checkpoint(ckpt, torch.nn.Linear(4, 2), torch.optim.AdamW(model.parameters()))


@pytest.mark.parametrize(("content", "pattern"), [
    (b"x" * 100, r"model.pretrained_file='.*bad.safetensors' cannot be loaded into "
     r"model.name='vit_tiny_patch16_224'"),
    (None, r"model.pretrained_file='.*bad.safetensors' cannot be loaded .*'cls_token' is "
     r"\[1, 1, 64\] in the file but \[1, 1, 32\] in the model"),
])
def test_a_bad_pretrained_file_is_named_before_ray(content, pattern, capsys, tmp_path,
                                                   fmnist_dir):
    bad = tmp_path / "bad.safetensors"
    if content is None:  # weights of another model: 64 wide, not 32
        from safetensors.torch import save_file

        other = build_vit("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                          num_classes=10, embed_dim=64, depth=2, num_heads=2)
        save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(bad))
    else:
        bad.write_bytes(content)
    _refused(capsys, [*BASE, f"data.root={fmnist_dir}", f"model.pretrained_file={bad}"],
             pattern, tmp_path)
