"""UVC's primal-dual arithmetic (METHODS.md section 3) on plain tensors, free of any model.

Counts are continuous (s: heads and MLP neurons to remove per block, r: value dims to remove per
head) and act through a straight-through ceil. "The K smallest" is a rank mask, never a slice,
so every function here stays on the device: a training step forces no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COUNT_EPS = 1e-8  # box: a count stays below ub - 1 (one head / dim / neuron always kept)


def ste_ceil(x: torch.Tensor) -> torch.Tensor:
    """ceil(x) forward, identity backward (the published straight-through ceil)."""
    return x + (torch.ceil(x) - x).detach()


def ranks(v: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim, ascending, ties by index: (..., n) -> (..., n)."""
    order = torch.sort(v.detach(), dim=-1, stable=True).indices
    pos = torch.arange(v.shape[-1], device=v.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, pos)


def smallest(v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool mask of the k smallest entries along the last dim; v (..., n), k (...) counts."""
    return ranks(v) < k.detach().round().long()[..., None]


class _LeastS(torch.autograd.Function):
    """LeastS(K, v) = sum of the K smallest entries of v (last dim).

    d/dK is the (K+1)-th smallest entry (the largest when K = n): the cost of removing one more
    group. d/dv is 1 on the K smallest entries, 0 elsewhere."""

    @staticmethod
    def forward(ctx, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = v.shape[-1]
        srt, order = torch.sort(v, dim=-1, stable=True)  # (..., n)
        kk = k.detach().round().long()
        take = torch.arange(n, device=v.device) < kk[..., None]  # (..., n) in sorted order
        value = (srt * take).sum(-1)
        ctx.save_for_backward(srt.gather(-1, kk.clamp(max=n - 1)[..., None]).squeeze(-1),
                              torch.empty_like(take).scatter_(-1, order, take))
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        next_smallest, mask = ctx.saved_tensors
        return grad * next_smallest, grad[..., None] * mask


def least_s(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """LeastS(K, v) over the last dim of v (K integer-valued; pass `ste_ceil(s)` for a count).
    v = [4, 1, 3, 2], K = 2: value 3, dK 3."""
    return _LeastS.apply(k, v)


def gate_probs(logits: torch.Tensor, noise: torch.Tensor | None, tau: float) -> torch.Tensor:
    """Soft Gumbel-softmax sample over the (skip, run) logits: (L, 2) -> (L, 2).

    `noise` is Gumbel(0, 1) noise of the logits' shape (drawn by the caller from a generator
    seeded by the step, so that every worker samples the same gates); None: the mean gate
    softmax(logits / tau)."""
    z = logits if noise is None else logits + noise.to(logits.dtype)
    return F.softmax(z / tau, dim=-1)


def hard_gates(logits: torch.Tensor) -> torch.Tensor:
    """Run block l iff logits[l, 1] > logits[l, 0]; if none would run, the block with the
    largest margin does (first on ties): at least one block is kept. (L, 2) -> (L,) bool."""
    margin = logits[:, 1] - logits[:, 0]
    run = margin > 0
    best = F.one_hot(margin.argmax(), margin.numel()).bool()
    return run | (best & ~run.any())


def resource_clamp(budget: float) -> float:
    """c in clamp(R - B, -c, c): 0.5 as published for B >= 0.5; 1 - B below (METHODS.md 6b)."""
    return max(0.5, 1.0 - budget)


def primal_step(x: torch.Tensor, g: torch.Tensor, ub: torch.Tensor, lr: float,
                fraction: bool = False) -> torch.Tensor:
    """One published primal step on counts `x` with gradient `g`, box [0, ub - 1 - 1e-8].

    At the top of the box the gradient is clamped to >= 0, at 0 to <= 0; one infinity-norm clip
    to 1 over the tensor; SGD step; back into the box; entries at the top before the step stay
    there. A count so moves at most `lr` per step. `fraction` (ours): the same rule on x / ub
    with gradient ub g, so any count can cross its range in 1 / lr steps."""
    top = ub - 1 - COUNT_EPS
    if fraction:
        x, g, top = x / ub, g * ub, top / ub
    at_top = x >= top
    g = torch.where(at_top, g.clamp(min=0), g)
    g = torch.where(x <= 0, g.clamp(max=0), g)
    g = g / g.abs().max().clamp(min=1.0)
    new = torch.where(at_top, top, (x - lr * g).clamp(min=0).minimum(top))
    if fraction:
        new = (new * ub).minimum(ub - 1 - COUNT_EPS)
    return new


def dual_ascent(d: torch.Tensor, step: torch.Tensor, lr: float) -> torch.Tensor:
    """d + lr * step, clamped at 0 (the duals are multipliers of >= 0 constraints)."""
    return (d + lr * step).clamp(min=0)


def prox_factors(c: torch.Tensor, a: torch.Tensor, n: torch.Tensor, s: torch.Tensor,
                 r: torch.Tensor, y: torch.Tensor, p: torch.Tensor,
                 lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Column factors of the proximal shrink, the exact prox of y LeastS / p LeastR for one
    gradient step of size lr: w -> w / (1 + 2 lr y) on the groups counted as removed.

    c (L, H, d) value-dim importance, a (L, H) head importance, n (L, h) neuron importance;
    s (L, 2) and r (L, H) counts; y (L, 2), p (L, H) duals. Returns the factors of the proj
    columns (L, H*d) and of the fc2 columns (L, h). A dim of a removed head takes both factors
    (inferred: the two penalties are applied one after the other)."""
    one = torch.ones((), device=c.device, dtype=c.dtype)
    dim_f = torch.where(smallest(c, torch.ceil(r)), 1 / (1 + 2 * lr * p[..., None]), one)
    head_f = torch.where(smallest(a, torch.ceil(s[:, 0])), 1 / (1 + 2 * lr * y[:, :1]), one)
    mlp_f = torch.where(smallest(n, torch.ceil(s[:, 1])), 1 / (1 + 2 * lr * y[:, 1:]), one)
    return (dim_f * head_f[..., None]).flatten(1), mlp_f
