"""The method contract, checked for every registered method (as timm tests every model).

Each method runs on a tiny ViT on the CPU: wrap; a few steps of the shared loop; a checkpoint
through the real checkpoint files; a restore into a freshly built model and method, whose next
step's loss equals the uninterrupted run's; finish; extract; export; `load_subnet` in a fresh
process gives the same logits; analytic MACs equal FlopCounterMode; params equal. A new method
gets all of this by registering.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from search_space.arch import ViTArch
from search_space.cost import count_macs, count_params, measure_macs
from search_space.models import build_vit, unwrap
from search_space.subnet import export_subnet
from trainers.checkpoint import save_checkpoint
from trainers.config import DataConfig, SearchConfig
from trainers.data import build_splits, make_loader
from trainers.loop import train_one_epoch
from trainers.methods import SearchMethod, get_method, list_methods
from trainers.search import _restore

CPU = torch.device("cpu")
STEPS = 5  # steps before the checkpoint (OFB has sliced by then)


def _dense() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=3,
                     num_classes=4, embed_dim=48, depth=2, num_heads=4)


def _batches() -> list:
    s = build_splits(DataConfig(dataset="synthetic", synthetic_size=128, val_fraction=0.0))
    return list(make_loader(s.train, 16, shuffle=False, drop_last=True))[:STEPS + 1]


def _build(name: str, dense_arch: ViTArch, dense: torch.nn.Module | None = None):
    cfg = SearchConfig(method=name, budget=0.5, epochs=1, lr=1e-3, lr_warmup_epochs=0,
                       # OFB eliminates (and slices) before the checkpoint: the restore must
                       # reshape the supernet first
                       ofb={"ramp_epochs": 0, "eliminations_per_epoch": 2, "alpha_lr": 0.5,
                            "macs_tolerance": None, "elimination_factor": 0.9},
                       two_stage={"score_batches": STEPS},
                       # UVC: primal-dual from step 2, a gate SGD step (with momentum) at
                       # steps 3 and 5, so the gate optimiser's state crosses the checkpoint
                       uvc={"gate_warmup_epochs": 0.5, "gate_window": 2})
    method = get_method(name)(cfg, 4, dense_arch, seed=7)  # as the search loop builds it
    method.setup(CPU)
    model = method.wrap(_dense() if dense is None else dense)

    def make_optimizer(m):
        return torch.optim.AdamW(method.param_groups(m), lr=cfg.lr), None

    return method, model, make_optimizer


def _step(method, model, optimizer, batch, step: int) -> float:
    torch.manual_seed(1234)  # the same PMIM mask (and any other draw) in both runs
    st = train_one_epoch(model, [batch], optimizer, None, CPU, grad_clip=5.0, method=method,
                         step_offset=step)
    return st.loss


@pytest.mark.parametrize("name", list_methods())
def test_method_contract(name, tmp_path):
    batches = _batches()
    dense_arch = ViTArch.from_timm(_dense())
    method, model, make_opt = _build(name, dense_arch)
    opt, _ = make_opt(model)
    if not method.finished(model):
        train_one_epoch(model, batches[:STEPS], opt, None, CPU, grad_clip=5.0, method=method)
    ckpt = save_checkpoint(tmp_path / "ckpt", unwrap(model), {"epoch": 0, "elapsed_s": 0.0},
                           opt, method_state=method.state_dict())

    # a restarted worker: a fresh model and method, restored from the checkpoint files
    method2, model2, make_opt2 = _build(name, dense_arch)
    opt2, _, state = _restore(ckpt, method2, model2, make_opt2)
    assert state["epoch"] == 0
    assert method2.state_dict().keys() == method.state_dict().keys()
    shapes = {k: v.shape for k, v in unwrap(model).state_dict().items()}
    assert {k: v.shape for k, v in unwrap(model2).state_dict().items()} == shapes
    if not method.finished(model):
        a = _step(method, model, opt, batches[STEPS], STEPS)
        b = _step(method2, model2, opt2, batches[STEPS], STEPS)
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7), "a resumed step must equal the original"

    note = method.finalize(model, opt)
    assert isinstance(note, str)
    method2.finalize(model2, opt2)
    subnet, arch = method.extract(model)
    subnet2, arch2 = method2.extract(model2)
    assert arch2 == arch, "the restored method extracts the same subnet"

    # the subnet is what it says it is
    assert ViTArch.from_timm(subnet) == arch
    assert count_macs(arch) == measure_macs(subnet, arch)
    assert count_params(arch) == sum(p.numel() for p in subnet.parameters())
    assert count_macs(arch) <= method.dense_macs

    # export, then load in a fresh process: the same logits
    folder = export_subnet(subnet, arch, tmp_path / "subnet")
    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    code = textwrap.dedent(f"""
        import torch
        from search_space.subnet import load_subnet
        m = load_subnet({str(folder)!r})
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        with torch.no_grad():
            torch.save(m(x), {str(tmp_path / 'y.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with torch.no_grad():
        expected = subnet.eval()(x)
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_two_stage_resume_after_its_last_checkpoint_extracts(tmp_path):
    """Taylor scoring ends inside the first epoch; a worker restarted after that epoch's
    checkpoint goes straight to extraction. Its scores come back from the method state (they
    used to live only in memory: extraction crashed on None)."""
    batches = _batches()
    dense_arch = ViTArch.from_timm(_dense())
    method, model, make_opt = _build("two_stage_taylor", dense_arch)
    opt, _ = make_opt(model)
    train_one_epoch(model, batches[:STEPS], opt, None, CPU, method=method)
    assert method.finished(model)
    ckpt = save_checkpoint(tmp_path / "ckpt", unwrap(model), {"epoch": 0, "elapsed_s": 0.0},
                           opt, method_state=method.state_dict())
    method2, model2, make_opt2 = _build("two_stage_taylor", dense_arch)
    _restore(ckpt, method2, model2, make_opt2)
    assert method2.finished(model2) and method2.batches == STEPS
    assert method2.extract(model2)[1] == method.extract(model)[1]
    method3, model3, _ = _build("two_stage_taylor", dense_arch)  # no state: a clear error
    with pytest.raises(RuntimeError, match="without scores"):
        method3.extract(model3)


def test_contract_requires_the_three_hooks():
    class Half(SearchMethod):
        def wrap(self, dense):
            return dense

    with pytest.raises(TypeError, match="abstract"):
        Half(SearchConfig(), 1, ViTArch.from_timm(_dense()))


def test_one_weight_decay_policy():
    """Norms, biases, tokens and search logits are never decayed, whatever the method."""
    dense_arch = ViTArch.from_timm(_dense())
    for name in list_methods():
        method, model, _ = _build(name, dense_arch)
        names = {id(p): n for n, p in unwrap(model).named_parameters()}
        for g in method.param_groups(model):
            if g["weight_decay"] == 0:
                continue
            for p in g["params"]:
                n = names[id(p)]
                assert p.ndim >= 2, (name, n)
                assert not n.endswith(("pos_embed", "cls_token", "mask_token", "alpha", ".S")), \
                    (name, n)
                assert "zeta" not in n, (name, n)


@pytest.mark.parametrize("name", [n for n in list_methods() if (o := get_method(n).Options)
                                  is not None and "width_multiple" in o.model_fields])
def test_width_multiple_is_recorded_and_rounds_the_extracted_widths(name):
    """Every method that decides widths offers `width_multiple` (ours, off by default): with 8,
    every width whose dense value is a multiple of 8 stays one, and the trial records it."""
    torch.manual_seed(0)
    dense = build_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=3,
                      num_classes=4, embed_dim=64, depth=2, num_heads=4)  # head_dim 16
    dense_arch = ViTArch.from_timm(dense)
    method = get_method(name)(SearchConfig(method=name, budget=0.5, epochs=1, **{
        get_method(name).section: {"width_multiple": 8}}), 4, dense_arch, seed=7)
    assert method.additions()[f"{method.section}.width_multiple"] == 8
    method.setup(CPU)
    model = method.wrap(dense)
    opt = torch.optim.AdamW(method.param_groups(model), lr=1e-3)
    if not method.finished(model):
        train_one_epoch(model, _batches()[:STEPS], opt, None, CPU, grad_clip=5.0, method=method)
    method.finalize(model, opt)
    subnet, arch = method.extract(model)
    widths = [arch.embed_dim] + [w for b in arch.blocks for w in (
        b.head_dim, b.mlp_hidden, *(b.v_dims or ())) if w]
    assert all(w % 8 == 0 for w in widths), (name, arch)
    assert count_macs(arch) == measure_macs(subnet, arch)
