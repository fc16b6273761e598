"""GPU-path decisions checked without a GPU: bf16 only where it is native, and every trainable
parameter gets a gradient at every step (DDP raises at the next step otherwise, on NCCL and gloo
alike)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from search_space.arch import ViTArch
from search_space.models import unwrap
from tests.trainers.test_method_contract import CPU, _batches, _dense
from trainers.config import SearchConfig
from trainers.loop import native_bf16, resolve_precision, train_one_epoch
from trainers.methods import get_method, list_methods


@pytest.mark.parametrize("cap,native", [((6, 1), False), ((7, 0), False), ((7, 5), False),
                                        ((8, 0), True), ((8, 9), True), ((9, 0), True)])
def test_bf16_only_from_ampere(cap, native):
    assert native_bf16(cap) is native


def test_precision_auto_on_the_cpu_is_fp32_and_explicit_wins():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"


VARIANTS = [(name, {}) for name in list_methods()] + [
    ("ofb", {"ofb": {"mask_ratio_start": 0.0}}),  # PMIM idle at step 0, on later
    ("ofb", {"ofb": {"mask_ratio_start": 0.0, "mask_ratio": 0.0}}),  # PMIM off
    ("vit_slim", {"vit_slim": {"tokens": True}}),
]


def _method(name: str, extra: dict):
    cfg = SearchConfig(method=name, budget=0.5, epochs=1, lr=1e-3, lr_warmup_epochs=0,
                       **{"two_stage": {"score_batches": 4}, **extra})
    if name == "ofb":
        cfg = SearchConfig.model_validate({**cfg.model_dump(), "ofb": {
            **cfg.ofb.model_dump(), "ramp_epochs": 1, **extra.get("ofb", {})}})
    method = get_method(name)(cfg, 4, ViTArch.from_timm(_dense()))
    method.setup(CPU)
    return method, method.wrap(_dense())


@pytest.mark.parametrize("name,extra", VARIANTS, ids=lambda v: str(v))
def test_every_trainable_parameter_gets_a_gradient(name, extra):
    method, model = _method(name, extra)
    if method.finished(model):
        return
    opt = torch.optim.AdamW(method.param_groups(model), lr=1e-3)
    for step, batch in enumerate(_batches()[:2]):
        train_one_epoch(model, [batch], opt, None, CPU, method=method, step_offset=step)
        missing = [n for n, p in unwrap(model).named_parameters()
                   if p.requires_grad and p.grad is None]
        assert not missing, f"{name} {extra} step {step}: no gradient for {missing[:5]}"


def test_ddp_accepts_a_pmim_ratio_that_starts_at_zero(tmp_path):
    """mask_ratio_start=0: PMIM's decoder is idle at step 0 and in use at step 1. DDP (gloo,
    one rank) used to raise at step 1 for the parameters that had no gradient at step 0."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        method, model = _method("ofb", {"ofb": {"mask_ratio_start": 0.0}})
        ddp = DDP(model, **method.ddp_kwargs)
        opt = torch.optim.AdamW(method.param_groups(ddp), lr=1e-3)
        for step, batch in enumerate(_batches()[:3]):
            st = train_one_epoch(ddp, [batch], opt, None, CPU, method=method, step_offset=step)
            assert st.loss > 0
    finally:
        dist.destroy_process_group()
