"""Fixed importance criteria of the classic two-stage pruner, per unit of a plain timm ViT.

A unit's score sums its group: every weight that disappears with it (Torch-Pruning's
dependency groups, written out once for a ViT in search_space/groups.py):
- MLP hidden unit j: fc1 row j (+ bias j) and fc2 column j;
- attention unit (head h, dim i): the q, k and v rows h*d+i (+ biases) and proj column h*d+i;
- embedding channel c: patch-embed row c, cls/pos entries, every LayerNorm's c, column c of
  qkv and fc1, row c of proj and fc2 (+ biases), column c of the head.

Criteria: "taylor" = |w * dL/dw| (first-order Taylor estimate of the loss change when w is
removed), accumulated over batches as a sum of per-batch |w * g| (a sum of signed gradients
first would let batches cancel); "magnitude" = the group's L2 norm (Torch-Pruning's default p=2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer

from search_space import groups
from search_space.arch import ViTArch

CRITERIA = ("taylor", "magnitude")


@dataclass
class UnitScores:
    embed: torch.Tensor  # (D,)
    attn: list[torch.Tensor]  # per block (H, d)
    mlp: list[torch.Tensor]  # per block (h,)

    def add_(self, other: UnitScores) -> UnitScores:
        self.embed += other.embed
        for a, b in zip(self.attn + self.mlp, other.attn + other.mlp, strict=True):
            a += b
        return self

    def to_list(self) -> list[torch.Tensor]:
        return [self.embed, *self.attn, *self.mlp]

    @classmethod
    def from_list(cls, ts: list[torch.Tensor], depth: int) -> UnitScores:
        return cls(ts[0], list(ts[1:1 + depth]), list(ts[1 + depth:]))


def elementwise(vit: VisionTransformer, criterion: str) -> dict[str, torch.Tensor]:
    """Per-weight contributions: |w * grad| (taylor, needs .grad) or w^2 (magnitude)."""
    if criterion not in CRITERIA:
        raise ValueError(f"importance criterion {criterion!r}; allowed: {CRITERIA}")
    out = {}
    for name, p in vit.named_parameters():
        if criterion == "taylor":
            out[name] = ((p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                         ).detach()
        else:
            out[name] = p.detach() ** 2
    return out


@torch.no_grad()
def group_scores(vit: VisionTransformer, per_weight: dict[str, torch.Tensor]) -> UnitScores:
    """Sum per-weight contributions over each unit's group (search_space/groups.py)."""
    arch = ViTArch.from_timm(vit)
    embed = groups.unit_sums(per_weight, groups.embed_members(per_weight), arch.embed_dim)
    attn, mlp = [], []
    for i, b in enumerate(arch.blocks):
        p = f"blocks.{i}."
        a = groups.unit_sums(per_weight, groups.attn_members(
            p + "attn.", b.attn_dim, p + "attn.qkv.bias" in per_weight), b.attn_dim)  # (H*d,)
        attn.append(a.reshape(b.num_heads, b.head_dim))
        mlp.append(groups.unit_sums(per_weight, groups.mlp_members(
            p + "mlp.", p + "mlp.fc1.bias" in per_weight), b.mlp_hidden))
    return UnitScores(embed, attn, mlp)


def finalize_scores(scores: UnitScores, criterion: str) -> UnitScores:
    """Magnitude groups summed squares: take the L2 norm. Taylor sums stay sums."""
    if criterion == "magnitude":
        return UnitScores.from_list([t.sqrt() for t in scores.to_list()], len(scores.attn))
    return scores
