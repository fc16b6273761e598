"""OFB's bi-mask and adaptive one-hot loss: the math, free of any module.

Notation (METHODS.md section 1): a module has candidate widths w_c with architecture logits alpha
and per-unit importance logits S. p = softmax(alpha / T) over the live candidates;
W[k] = sum_c p_c [k < w_c] is the probability that the unit of rank k survives; a unit u's
survival value is V_u = W[rank(u)] with units ranked by S; its mask is
m_u = lambda * sigmoid(S_u) + (1 - lambda) * V_u.

Decisions where the paper leaves a choice:
- One-hot temperature T (our knob, not in the published code) divides alpha in the one-hot loss
  only; the masks, the MACs loss and elimination use softmax(alpha). T = 1 is published.
- Units that no live candidate keeps get a hard 0 mask. The published code removes them by
  slicing at the same moment, so this changes nothing in the method, and it makes slicing
  exactly output-preserving.
- The cot term of the one-hot loss is +inf at uniform p and -inf at one-hot p. As the published
  code (tan(pi/2 - pi r) / n, no clamp) we guard only those exact endpoints, clamping the ratio
  r = var/var_max to [RATIO_EPS, 1 - RATIO_EPS]; the cot value is never clamped (at +-10 it
  zeroed the gradient for every r below 0.032, i.e. from the U[0,1) alpha start).
"""

from __future__ import annotations

import math

import torch

RATIO_EPS = 1e-4


def probs(alpha: torch.Tensor, live: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(alpha / T) with dead candidates at exactly 0. Shapes: (C,) -> (C,)."""
    logits = (alpha / temperature).masked_fill(~live, float("-inf"))
    return torch.softmax(logits, dim=-1)


def survival(p: torch.Tensor, widths: torch.Tensor, n_units: int) -> torch.Tensor:
    """W[k] = P(width > k) for ranks k = 0..n_units-1. (C,), (C,) -> (n_units,)."""
    ranks = torch.arange(n_units, device=p.device)
    keeps = (ranks[None, :] < widths[:, None]).to(p.dtype)  # (C, n_units)
    return p @ keeps


def rank_of(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry (0 = highest score) along the last dim; not differentiated."""
    order = torch.argsort(scores.detach(), dim=-1, descending=True)
    return torch.argsort(order, dim=-1)


def unit_mask(S: torch.Tensor, V: torch.Tensor, lam: float, alive: torch.Tensor | None,
              sig: torch.Tensor | None = None) -> torch.Tensor:
    """m = lam * sigmoid(S) + (1 - lam) * V, hard 0 where no live candidate keeps the unit.

    `alive` None: every unit is kept by some candidate (the module is sliced to its widest).
    `sig`: sigmoid(S) when the caller has it already."""
    m = lam * (torch.sigmoid(S) if sig is None else sig) + (1.0 - lam) * V
    return m if alive is None else m * alive.to(S.dtype)


def one_hot_loss(p: torch.Tensor, live: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Adaptive one-hot loss H(p) + cot(pi * var(p) / var_max) / n over live candidates.

    var(p) = sum_i (p_i - mean p)^2 and var_max = 1 - 1/n (its one-hot value), n = live count:
    var_max shrinks as candidates are eliminated, which is what makes the loss adaptive. With
    one live candidate the module is decided and the loss is 0.

    Computed over all candidates with the dead ones masked out (their p is exactly 0), not by
    boolean indexing, so a step needs no device -> host sync; pass the live count `n` when the
    caller knows it (else it is read from `live`, a sync).
    """
    n = int(live.sum()) if n is None else n
    if n <= 1:
        return p.sum() * 0.0
    keep = live.to(p.dtype)
    entropy = -(p * torch.log(p.clamp_min(1e-12)) * keep).sum()
    var = (((p - 1.0 / n) ** 2) * keep).sum()  # the live p sum to 1: their mean is 1/n
    var_max = 1.0 - 1.0 / n
    ratio = (var / var_max).clamp(RATIO_EPS, 1 - RATIO_EPS)
    cot = torch.cos(math.pi * ratio) / torch.sin(math.pi * ratio)
    return entropy + cot / n


def one_hot_losses(p_flat: torch.Tensor, keep: torch.Tensor, seg: torch.Tensor,
                   n: torch.Tensor) -> torch.Tensor:
    """`one_hot_loss` of M modules at once, their probabilities concatenated (one-hot loss of
    every module in ~20 ops instead of ~20 per module: a step's many small ops cost more than
    their arithmetic).

    p_flat: (sum C_m,) the modules' p; keep: (sum C_m,) their live flags; seg: (sum C_m,) the
    module index of each entry; n: (M,) live counts, each >= 2. Returns (M,).
    """
    M = n.shape[0]
    keep = keep.to(p_flat.dtype)
    n_of = n.to(p_flat.dtype)
    ent = -p_flat.new_zeros(M).index_add(0, seg, p_flat * torch.log(p_flat.clamp_min(1e-12))
                                         * keep)
    var = p_flat.new_zeros(M).index_add(0, seg, (p_flat - 1.0 / n_of[seg]) ** 2 * keep)
    ratio = (var / (1.0 - 1.0 / n_of)).clamp(RATIO_EPS, 1 - RATIO_EPS)
    return ent + torch.cos(math.pi * ratio) / torch.sin(math.pi * ratio) / n_of


def linear_schedule(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear from `start` to `end` over the warm-up (per step), then held at `end`."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def candidates_to_drop(p: torch.Tensor, live: torch.Tensor, factor: float = 0.2) -> torch.Tensor:
    """Live candidates with p <= factor / n_live (never all of them: the argmax survives)."""
    n = int(live.sum())
    if n <= 1:
        return torch.zeros_like(live)
    drop = live & (p <= factor / n)
    if bool((live & ~drop).sum() == 0):
        drop[torch.argmax(p)] = False
    return drop
