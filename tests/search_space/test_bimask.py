"""OFB's formulas pinned: survival probabilities, the bi-mask, the adaptive one-hot loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from search_space.ofb.bimask import (
    RATIO_EPS,
    candidates_to_drop,
    linear_schedule,
    one_hot_loss,
    probs,
    rank_of,
    survival,
    unit_mask,
)


def test_survival_is_probability_that_unit_survives():
    torch.manual_seed(0)
    alpha = torch.randn(4)
    widths = torch.tensor([2, 3, 5, 6])
    live = torch.ones(4, dtype=torch.bool)
    p = probs(alpha, live)
    W = survival(p, widths, 6)
    # Enumerate: sample a candidate c with prob p_c; unit of rank k survives iff k < w_c.
    for k in range(6):
        expected = sum(float(p[c]) for c in range(4) if k < int(widths[c]))
        assert float(W[k]) == pytest.approx(expected, abs=1e-6)
    assert float(W[0]) == pytest.approx(1.0)  # every candidate keeps the top unit
    assert torch.all(W[:-1] >= W[1:])  # monotone in rank


def test_V_follows_rank_of_S_and_dead_candidates_have_zero_probability():
    S = torch.tensor([0.1, 2.0, -1.0, 0.5])
    r = rank_of(S)
    assert r.tolist() == [2, 0, 3, 1]
    live = torch.tensor([True, False, True])
    p = probs(torch.tensor([0.0, 5.0, 0.0]), live)
    assert float(p[1]) == 0.0 and float(p.sum()) == pytest.approx(1.0)
    W = survival(p, torch.tensor([1, 2, 4]), 4)
    V = W[r]
    # unit 1 is the best: survives under every live candidate; unit 2 only with width 4.
    assert float(V[1]) == pytest.approx(1.0) and float(V[2]) == pytest.approx(0.5)


def test_temperature_one_is_plain_softmax_and_lower_sharpens():
    alpha = torch.tensor([0.3, -0.2, 1.0])
    live = torch.ones(3, dtype=torch.bool)
    assert torch.allclose(probs(alpha, live, 1.0), torch.softmax(alpha, 0))
    assert probs(alpha, live, 0.5).max() > probs(alpha, live, 1.0).max()


def test_unit_mask_blend_and_hard_zero():
    S = torch.zeros(3)
    V = torch.tensor([1.0, 0.5, 0.0])
    alive = torch.tensor([True, True, False])
    m = unit_mask(S, V, 0.99, alive)
    assert m.tolist() == pytest.approx([0.99 * 0.5 + 0.01, 0.99 * 0.5 + 0.005, 0.0])
    m = unit_mask(S, V, 0.1, alive)
    assert m.tolist() == pytest.approx([0.05 + 0.9, 0.05 + 0.45, 0.0])


def test_one_hot_loss_falls_as_p_sharpens_and_is_finite_at_the_ends():
    live = torch.ones(5, dtype=torch.bool)
    losses = []
    for sharp in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 50.0):
        p = torch.softmax(torch.tensor([sharp, 0, 0, 0, 0.0]), 0)
        losses.append(float(one_hot_loss(p, live)))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(a > b for a, b in itertools.pairwise(losses)), losses
    # exactly uniform and exactly one-hot stay finite (the ratio is guarded at the endpoints)
    assert torch.isfinite(one_hot_loss(torch.full((5,), 0.2), live))
    assert torch.isfinite(one_hot_loss(torch.tensor([1.0, 0, 0, 0, 0]), live))


def test_one_hot_loss_is_adaptive_and_differentiable():
    alpha = torch.zeros(4, requires_grad=True)
    live = torch.tensor([True, True, True, False])
    p = probs(alpha + torch.tensor([0.5, 0, 0, 0]), live)
    loss = one_hot_loss(p, live)
    loss.backward()
    assert alpha.grad is not None and float(alpha.grad[0]) < 0  # pushes the leader up
    assert float(alpha.grad[3]) == 0.0
    assert float(one_hot_loss(torch.tensor([0.0, 1.0]), torch.tensor([False, True]))) == 0.0


def test_schedules_and_elimination_rule():
    assert linear_schedule(0, 100, 0.99, 0.1) == pytest.approx(0.99)
    assert linear_schedule(50, 100, 0.99, 0.1) == pytest.approx(0.545)
    assert linear_schedule(500, 100, 0.99, 0.1) == pytest.approx(0.1)
    live = torch.ones(4, dtype=torch.bool)
    p = torch.tensor([0.6, 0.3, 0.05, 0.05])  # 0.2 / 4 = 0.05
    assert candidates_to_drop(p, live).tolist() == [False, False, True, True]
    one = torch.tensor([False, True, False, False])
    assert not candidates_to_drop(torch.tensor([0, 1.0, 0, 0]), one).any()


def _published_one_hot(p: torch.Tensor) -> torch.Tensor:
    """The authors' `get_sparsity_loss` term over live p: H(p) + tan(pi/2 - pi r) / n."""
    n = p.numel()
    var = ((p - p.mean()) ** 2).sum()
    r = var / (1 - 1 / n)
    return -(p * torch.log(p)).sum() + torch.tan(math.pi / 2 - math.pi * r) / n


@pytest.mark.parametrize("spread", [1e-3, 3e-3, 1e-2, 0.1, 0.5, 1.0, 3.0, 8.0])
def test_one_hot_gradient_equals_the_published_formula(spread):
    """Where the published term is finite its gradient is ours, down to tiny var/var_max (a
    clamp of the cot value at +-10 used to zero it below r = 0.032: the U[0,1) start)."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(7, generator=g, dtype=torch.float64) * spread
    grads = []
    for f in (lambda p: one_hot_loss(p, torch.ones(7, dtype=torch.bool)), _published_one_hot):
        a = base.clone().requires_grad_(True)
        f(torch.softmax(a, 0)).backward()
        grads.append(a.grad)
    p = torch.softmax(base, 0)
    r = float(((p - p.mean()) ** 2).sum() / (1 - 1 / 7))
    if r > RATIO_EPS:  # inside the guard both are the same function
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-9)
        assert grads[0].abs().sum() > 0


def test_batched_one_hot_losses_equal_the_per_module_loss():
    from search_space.ofb.bimask import one_hot_losses

    g = torch.Generator().manual_seed(0)
    ps, lives = [], []
    for c, dead in [(5, [1]), (3, []), (8, [0, 6, 7])]:
        live = torch.ones(c, dtype=torch.bool)
        live[dead] = False
        ps.append(probs(torch.randn(c, generator=g, requires_grad=True), live))
        lives.append(live)
    seg = torch.cat([torch.full((len(p),), i) for i, p in enumerate(ps)])
    n = torch.stack([lv.sum() for lv in lives])
    got = one_hot_losses(torch.cat(ps), torch.cat(lives), seg, n)
    want = torch.stack([one_hot_loss(p, lv) for p, lv in zip(ps, lives, strict=True)])
    assert torch.allclose(got, want, atol=1e-6)
