"""Hardware-friendly widths: kept unit counts in steps of a multiple (8: what matmul kernels
tile by), for the methods whose search decides widths unit by unit.

Odd widths (head dims 8-13, MLPs of 97 units, value dims of 30) waste what the MACs saved: a
subnet with them runs slower than a uniform one of the same MACs (bench/realized_speed.py).
Every method's `width_multiple` option (ours, off by default) goes through `step` and
`round_keep`, so one rule decides which widths move by the multiple and how a count rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

Rounding = Literal["nearest", "floor"]


def step(n: int, multiple: int) -> int:
    """`multiple` if a width of n units can move in steps of it (n a larger multiple), else 1:
    a dense width that is not a multiple keeps its unit-by-unit choice."""
    return multiple if multiple > 1 and n % multiple == 0 and n > multiple else 1


def round_count(k: int, n: int, multiple: int, how: Rounding = "nearest") -> int:
    """k of n units rounded to a multiple of `step(n, multiple)`, at least one step, at most n.
    Nearest rounds halves up (fewer, slower-than-promised subnets are what the option fixes)."""
    st = step(n, multiple)
    if st == 1:
        return k
    q = math.floor(k / st + 0.5) if how == "nearest" else k // st
    return min(n, max(st, q * st))


def round_keep(scores: torch.Tensor, kept: torch.Tensor, multiple: int,
               how: Rounding = "nearest") -> torch.Tensor:
    """Sorted indices of the units kept after rounding the kept count of a (n,) score vector.

    `kept`: indices the method chose. Rounding down drops the weakest of them; rounding up adds
    the strongest of the others, so the result contains or is contained in `kept`."""
    n = scores.numel()
    k = round_count(len(kept), n, multiple, how)
    if k == len(kept):
        return torch.sort(kept.to(torch.long)).values
    rank = scores.detach().float().clone()
    # chosen units first: every kept score above every other (a finite shift, no inf arithmetic)
    span = float(rank.max() - rank.min()) + 1.0 if n else 1.0
    rank[kept.to(torch.long)] += span
    return torch.sort(torch.topk(rank, k).indices).values


def round_within(scores: list[torch.Tensor], kept: list[torch.Tensor], multiple: int,
                 cost: Callable[[list[torch.Tensor]], float], limit: float
                 ) -> list[torch.Tensor]:
    """Round every module's kept units (`round_keep`) to the nearest multiple, then, while the
    result costs more than `limit`, round down instead the module that rounded up with the least
    score lost per cost saved. At worst every module is rounded down (never above the unrounded
    cost then). `cost` prices a list of kept indices, one per module (MACs or ms)."""
    near = [round_keep(s, k, multiple) for s, k in zip(scores, kept, strict=True)]
    floor = [round_keep(s, k, multiple, "floor") for s, k in zip(scores, kept, strict=True)]
    cur, total = list(near), cost(near)
    if total <= limit:
        return cur
    ranked = []  # (score lost per cost saved, module) for modules that rounded up
    for i, (s, n, f) in enumerate(zip(scores, near, floor, strict=True)):
        if len(n) > len(f):
            saved = total - cost(cur[:i] + [f] + cur[i + 1:])
            lost = float(s[n].sum() - s[f].sum())
            ranked.append((lost / max(saved, 1e-12), i))
    for _, i in sorted(ranked):
        cur[i] = floor[i]
        if cost(cur) <= limit:
            break
    return cur
