"""UVC as a method of the shared loop: KD loss, the primal-dual step's direction and sizes, the
gate optimiser, draws shared by workers, and what the trial records."""

from __future__ import annotations

import math

import pytest
import torch

from search_space.arch import ViTArch
from search_space.models import build_vit
from search_space.uvc.primal_dual import least_s
from tests.trainers.test_method_contract import CPU, _batches, _dense
from trainers.config import SearchConfig
from trainers.distill import soft_kd
from trainers.loop import train_one_epoch
from trainers.methods import get_method


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=3,
                     num_classes=4, embed_dim=48, depth=3, num_heads=4, mlp_ratio=2)


def _uvc(seed: int = 0, budget: float = 0.5, **uvc):
    cfg = SearchConfig(method="uvc", budget=budget, epochs=1, lr=1e-3, lr_warmup_epochs=0,
                       uvc={"gate_warmup_epochs": 0.25, **uvc})
    method = get_method("uvc")(cfg, 4, ViTArch.from_timm(_vit()), seed=seed)
    method.setup(CPU)
    model = method.wrap(_vit())
    return method, model, torch.optim.AdamW(method.param_groups(model), lr=1e-3)


def test_kd_loss_by_hand():
    s, t = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.0, 3.0, 1.0]])
    for T in (1.0, 2.0):
        ps, pt = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
        kl = (pt * (pt.log() - ps.log())).sum()
        assert soft_kd(s, t, T).item() == pytest.approx(kl.item() * T * T / 3, rel=1e-5)
    method, model, _ = _uvc()
    batch = _batches()[0]
    logits = model(batch[0])
    terms = method.losses(model, batch[0], batch[1], logits, None, 0)
    assert set(terms) == {"ce", "kd"}  # (1 - 0.1) CE + 0.1 KD, from the frozen dense model
    assert all(not p.requires_grad for p in method.teacher.parameters())


def test_primal_dual_moves_towards_the_budget_in_bounded_steps():
    method, model, opt = _uvc()
    batches = _batches()
    s0, z0 = model.s.clone(), float(model.z[0])
    st = train_one_epoch(model, batches[:1], opt, None, CPU, method=method)  # gate warm-up
    assert torch.equal(model.s, s0) and float(model.z[0]) == z0, "warm-up: no primal-dual step"
    for i in range(1, 5):
        before = model.s.clone(), model.r.clone()
        st = train_one_epoch(model, batches[i:i + 1], opt, None, CPU, method=method,
                             step_offset=i)
        assert (model.s - before[0]).abs().max() <= 0.02 + 1e-6  # the published count step
        assert (model.r - before[1]).abs().max() <= 0.02 + 1e-6
    assert st.loss > 0
    # dense R ~ 1 > B = 0.5: z ascends by ~ (R - B) per step and pulls the counts up
    assert float(model.z[0]) > z0 + 1.0
    assert (model.s > 0).all() and (model.r > 0).any()
    frac, fmodel, fopt = _uvc(count_step="fraction")
    train_one_epoch(fmodel, batches[:5], fopt, None, CPU, method=frac)
    # fraction: the same rule on s / ub, so the MLP count (ub 96) moves up to 96x further
    assert float(fmodel.s[:, 1].max()) > 10 * float(model.s[:, 1].max())
    assert frac.additions() == {"uvc.count_step": "fraction"}


def test_dual_step_by_hand():
    method, model, _ = _uvc()
    with torch.no_grad():
        model.s.copy_(torch.tensor([[1.0, 2.0]] * 3))
        model.r.fill_(3.0)
    imp = model.importance()
    y0, p0, z0 = model.y.clone(), model.p.clone(), model.z.clone()
    method._dual_step(model, torch.zeros(3, 2))
    torch.testing.assert_close(model.y[:, 0], y0[:, 0] + 1e-4 * least_s(torch.ones(3), imp.a))
    torch.testing.assert_close(model.y[:, 1], y0[:, 1] + 1e-4 * least_s(torch.full((3,), 2.0),
                                                                        imp.n))
    torch.testing.assert_close(model.p, p0 + 1e-4 * least_s(torch.full((3, 4), 3.0), imp.c))
    assert float(model.z[0]) > float(z0[0])  # R > B
    with torch.no_grad():
        model.s.zero_(), model.r.zero_()
        model.gate_logits.copy_(torch.tensor([[5.0, -5.0]] * 3))  # every block skipped: R < B
        model.z.fill_(0.01)
    method._dual_step(model, torch.zeros(3, 2))
    assert float(model.z[0]) == 0.0  # clamped at 0


def test_gate_window_mean_applied_by_sgd():
    method, model, _ = _uvc(gate_window=2)
    w0 = model.gate_logits.detach().clone()
    g_task, g_res = torch.tensor([[1.0, -1.0]] * 3), torch.tensor([[100.0, 300.0]] * 3)
    for step in (0, 1):  # t = 0 opens the window, (t + 1) % 2 == 0 applies its mean
        model.gate_logits.grad = g_task * (step + 1)
        method._gate_step(model, step, g_res)
    mean = g_task * 1.5 + 5e-4 * g_res
    torch.testing.assert_close(model.gate_logits.detach(), w0 - 0.1 * (mean + 1e-4 * w0))
    assert method.window_n == 0 and model.gate_logits.grad is None


def test_workers_with_the_same_seed_take_the_same_decisions():
    """Each worker draws the gates from a generator seeded by (seed, step): two workers (here
    two methods) that see different data still agree on the noise, so their counts and duals
    (which DDP does not average) stay equal when their gradients are equal."""
    a, ma, oa = _uvc(seed=3)
    b, mb, ob = _uvc(seed=3)
    c, mc, oc = _uvc(seed=4)
    batches = _batches()
    torch.manual_seed(0)  # a different global RNG state for b: it must not matter
    train_one_epoch(ma, batches[:4], oa, None, CPU, method=a)
    torch.manual_seed(99)
    train_one_epoch(mb, batches[:4], ob, None, CPU, method=b)
    train_one_epoch(mc, batches[:4], oc, None, CPU, method=c)
    for name in ("s", "r", "y", "p", "z", "gate_logits"):
        torch.testing.assert_close(getattr(ma, name), getattr(mb, name))
    assert not torch.equal(a._noise, c._noise)


def test_trial_records_the_budget_clamp_below_half_and_uses_the_published_clip():
    m, _, _ = _uvc(budget=0.3)
    assert m.additions() == {"uvc.resource_clamp": 0.7} and m.grad_clip() == 1.0
    m, _, _ = _uvc(budget=0.5)
    assert m.additions() == {} and m.clamp == 0.5
    cfg = SearchConfig(method="uvc", grad_clip=0.5)
    m = get_method("uvc")(cfg, 4, ViTArch.from_timm(_dense()))
    assert m.grad_clip() == 0.5 and m.additions() == {"grad_clip": 0.5}
    with pytest.raises(ValueError, match="count_step"):
        SearchConfig(method="uvc", uvc={"count_step": "fractions"})


def test_metrics_describe_the_subnet():
    method, model, _ = _uvc()
    with torch.no_grad():
        model.gate_logits.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0], [-1.0, 1.0]]))
        model.s.copy_(torch.tensor([[0.0, 0.0], [1.0, 3.0], [0.0, 0.0]]))
    m = method.metrics(model)
    assert m["kept_blocks"] == "1,2" and m["blocks_skipped"] == 1
    assert (m["heads_pruned"], m["neurons_pruned"], m["v_dims_pruned"]) == (1, 3, 0)
    assert m["current_macs"] < method.dense_macs and 0 < m["params_fraction"] < 1
    assert math.isfinite(m["expected_macs"]) and "1,2" in method.finalize(model, None)
