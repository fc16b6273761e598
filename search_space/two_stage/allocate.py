"""Stage 2 of the two-stage methods: from unit scores to a `PrunePlan` that meets a MACs budget.

Three allocators, all measured with the shared analytic counter (search_space/cost.py):
- `allocate_global`: Torch-Pruning-style global ranking, made budget-aware: repeatedly take the
  cheapest move (lowest score lost per MAC saved) among: drop the weakest embedding channel, the
  weakest MLP unit of a block, the weakest head of a block, or one dim from every kept head of
  a block (their weakest each: timm's Attention needs one head_dim). Moves that would undershoot
  the target by more than `tol` are skipped while others remain, so the result lands in
  [target * (1 - tol), target].
- `allocate_uniform`: every module keeps the same fraction r of its units (all heads kept, r of
  the dims of each), r bisected to the largest value that meets the budget.
- `allocate_threshold` (ViT-Slim's stage 2): one global threshold per unit type (attention,
  MLP, optionally token positions), all at the same quantile of their type's scores, the
  quantile bisected to meet the budget. A block keeps the heads with any unit above the
  threshold and, in each, the mean count of units above it (rounded) as its head_dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from search_space.arch import BlockArch, ViTArch
from search_space.cost import count_macs
from search_space.prune import PrunePlan, keep_top
from search_space.tokens import monotone_keep
from search_space.two_stage.importance import UnitScores
from search_space.widths import round_count
from search_space.widths import step as _step

Cost = Callable[[ViTArch], float]  # an architecture's cost in the budget's unit


def _plan_from_counts(s: UnitScores, k_embed: int, heads: list[torch.Tensor],
                      k_dims: list[int], k_mlp: list[int]) -> PrunePlan:
    dims = [torch.sort(torch.topk(a[h], max(1, kd), dim=1).indices, dim=1).values
            for a, h, kd in zip(s.attn, heads, k_dims, strict=True)]
    return PrunePlan(keep_top(s.embed, k_embed), [torch.sort(h).values for h in heads], dims,
                     [keep_top(m, k) for m, k in zip(s.mlp, k_mlp, strict=True)])


class _Counts:
    """Kept-unit counts during the greedy search; a move changes one count by one."""

    def __init__(self, s: UnitScores, dense: ViTArch, cost: Cost = count_macs,
                 multiple: int = 1):
        self.s, self.dense, self.cost = s, dense, cost
        # units per move: `multiple` where the module's dense width is a multiple of it (its
        # kept widths then stay multiples: hardware-friendly), else 1
        self.e_step = _step(dense.embed_dim, multiple)
        self.m_step = [_step(m.numel(), multiple) for m in s.mlp]
        self.d_step = [_step(a.shape[1], multiple) for a in s.attn]
        self.e_order = torch.argsort(s.embed).tolist()  # weakest first
        self.m_order = [torch.argsort(m).tolist() for m in s.mlp]
        self.dim_rank = [torch.argsort(a, dim=1) for a in s.attn]  # per head, weakest first
        self.e_cut, self.m_cut = 0, [0] * len(s.attn)
        self.heads = [list(range(a.shape[0])) for a in s.attn]
        self.k_dims = [a.shape[1] for a in s.attn]

    def macs(self) -> int:
        blocks = tuple(BlockArch(len(h), kd, len(o) - c) for h, kd, o, c in zip(
            self.heads, self.k_dims, self.m_order, self.m_cut, strict=True))
        return self.cost(replace(self.dense, embed_dim=self.dense.embed_dim - self.e_cut,
                                 blocks=blocks))

    def head_score(self, i: int, h: int) -> float:
        a, d = self.s.attn[i], self.s.attn[i].shape[1]
        return float(a[h, self.dim_rank[i][h, d - self.k_dims[i]:]].sum())

    def moves(self, prune_embed: bool) -> list[tuple[float, tuple]]:
        """(score lost, move) for every legal move; a module keeps at least one unit."""
        s, out = self.s, []
        e, st = self.e_cut, self.e_step
        if prune_embed and self.dense.embed_dim - e > st:
            out.append((float(s.embed[self.e_order[e:e + st]].sum()), ("embed",)))
        for i, a in enumerate(s.attn):
            c, st = self.m_cut[i], self.m_step[i]
            if len(self.m_order[i]) - c > st:
                out.append((float(s.mlp[i][self.m_order[i][c:c + st]].sum()), ("mlp", i)))
            if len(self.heads[i]) > 1:
                h = min(self.heads[i], key=lambda h, i=i: self.head_score(i, h))
                out.append((self.head_score(i, h), ("head", i, h)))
            st, d = self.d_step[i], a.shape[1]
            if self.k_dims[i] > st:
                weakest = self.dim_rank[i][:, d - self.k_dims[i]:d - self.k_dims[i] + st]
                out.append((float(sum(a[h, weakest[h]].sum() for h in self.heads[i])),
                            ("dim", i)))  # weakest: (H, st)
        return out

    def apply(self, mv: tuple, sign: int = 1) -> None:
        if mv[0] == "embed":
            self.e_cut += sign * self.e_step
        elif mv[0] == "mlp":
            self.m_cut[mv[1]] += sign * self.m_step[mv[1]]
        elif mv[0] == "dim":
            self.k_dims[mv[1]] -= sign * self.d_step[mv[1]]
        elif sign > 0:
            self.heads[mv[1]].remove(mv[2])
        else:
            self.heads[mv[1]].append(mv[2])

    def plan(self) -> PrunePlan:
        return _plan_from_counts(
            self.s, self.dense.embed_dim - self.e_cut, [torch.tensor(h) for h in self.heads],
            self.k_dims, [len(o) - c for o, c in zip(self.m_order, self.m_cut, strict=True)])


def allocate_global(s: UnitScores, dense: ViTArch, target_macs: float, prune_embed: bool = True,
                    tol: float = 0.02, cost: Cost = count_macs, multiple: int = 1) -> PrunePlan:
    """`cost`: what the budget counts (MACs; a latency table's `of_arch` for a latency budget,
    `target_macs` then in its unit). `multiple`: widths move in steps of it (see `_Counts`)."""
    c = _Counts(s, dense, cost, multiple)
    macs = c.macs()
    while macs > target_macs:
        scored = []  # (score lost per MAC saved, MACs after, move)
        for loss, mv in c.moves(prune_embed):
            c.apply(mv)
            after = c.macs()
            c.apply(mv, -1)
            if after < macs:
                scored.append((loss / (macs - after), after, mv))
        if not scored:
            break  # every module is down to one unit
        fits = [m for m in scored if m[1] >= target_macs * (1 - tol)]
        _, macs, mv = min(fits or scored, key=lambda m: m[0])
        c.apply(mv)
    return c.plan()


def allocate_uniform(s: UnitScores, dense: ViTArch, target_macs: float,
                     prune_embed: bool = True, cost: Cost = count_macs,
                     multiple: int = 1) -> PrunePlan:
    def plan(r: float) -> PrunePlan:
        def k(n: int) -> int:
            st = _step(n, multiple)  # rounded down to a multiple where n is one
            return max(st, math.floor(r * n / st + 1e-9) * st)

        return _plan_from_counts(
            s, k(dense.embed_dim) if prune_embed else dense.embed_dim,
            [torch.arange(a.shape[0]) for a in s.attn], [k(a.shape[1]) for a in s.attn],
            [k(m.numel()) for m in s.mlp])

    return plan(_bisect(lambda r: cost(plan(r).arch(dense)) <= target_macs))


def allocate_threshold(s: UnitScores, dense: ViTArch, target_macs: float,
                       token_scores: list[torch.Tensor] | None = None,
                       multiple: int = 1) -> PrunePlan:
    """ViT-Slim's stage 2. With `token_scores` (per block (T,), e.g. |tanh zeta_tok|) tokens are
    a third type: positions above the token threshold, kept only while every earlier block kept
    them too (monotone over depth), prefix tokens always (search_space/tokens.py).
    `multiple` > 1: each block's head_dim and MLP count is rounded to the nearest multiple
    (search_space/widths.py) before the budget is checked, so the bisection still meets it."""
    flat_a = torch.cat([a.flatten() for a in s.attn])
    flat_m = torch.cat([m.flatten() for m in s.mlp])
    n_pre = dense.num_prefix_tokens
    flat_t = (torch.cat([t[n_pre:].flatten() for t in token_scores])
              if token_scores is not None else None)

    def attn_part(keep: float) -> tuple[list[torch.Tensor], list[int]]:
        ta = torch.quantile(flat_a, 1.0 - keep)
        heads, k_dims = [], []
        for a in s.attn:
            above = (a > ta).sum(1)  # (H,)
            h = torch.nonzero(above).flatten()
            if len(h) == 0:
                h = a.max(1).values.argmax().reshape(1)
            heads.append(h)
            k = max(1, round(float(above[h].float().mean())))
            k_dims.append(round_count(k, a.shape[1], multiple))
        return heads, k_dims

    def plan(keep: float, keep_mlp: float) -> PrunePlan:
        tm = torch.quantile(flat_m, 1.0 - keep_mlp)
        k_mlp = [round_count(max(1, int((m > tm).sum())), m.numel(), multiple) for m in s.mlp]
        p = _plan_from_counts(s, dense.embed_dim, *attn_part(keep), k_mlp)
        if flat_t is not None:
            p.tokens = monotone_keep(token_scores, torch.quantile(flat_t, 1.0 - keep), n_pre)
        return p

    keep = _bisect(lambda k: plan(k, k).macs(dense) <= target_macs)
    # One head_dim per block makes the attention side move in steps of a whole row of dims;
    # the MLP threshold alone then takes up the slack those steps leave below the target.
    keep_mlp = _bisect(lambda k: plan(keep, max(k, keep)).macs(dense) <= target_macs)
    return plan(keep, max(keep_mlp, keep))


def _bisect(ok, iters: int = 40) -> float:
    """The largest x in (0, 1] with ok(x), assuming ok holds below some point."""
    if ok(1.0):
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return max(lo, 1e-6)
