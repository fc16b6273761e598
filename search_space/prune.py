"""Physical pruning of a plain timm ViT by kept unit indices: the two-stage methods' extraction.

Units (the same as OFB's search space): embedding channels (D,), per block attention units
(head, dim) shared by q, k and v, and MLP hidden units. A `PrunePlan` lists what survives; every
kept head keeps the same number of dims (timm's Attention has one head_dim), each head its own
dims. `apply_plan` slices the weights into a smaller timm ViT, exported like OFB's subnets.

Exactness: attention and MLP slicing is exact for the kept units (the softmax scale of the dense
head dim is folded into q's rows); slicing embedding channels changes LayerNorm statistics (over
the kept channels), as in OFB's embedding search. Dropping token positions (see
search_space/tokens.py) is not exact: a position masked to ~0 in a search still carried its
residual stream and k/v biases. That is ViT-Slim's binarisation, recovered by the fine-tune.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer

from search_space import groups
from search_space.arch import BlockArch, ViTArch
from search_space.cost import count_macs
from search_space.subnet import build_from_arch


@dataclass
class PrunePlan:
    embed: torch.Tensor  # (D',) kept embedding channels, sorted
    heads: list[torch.Tensor]  # per block (h',) kept heads, sorted
    dims: list[torch.Tensor]  # per block (h', d') kept dims of each kept head, sorted per row
    mlp: list[torch.Tensor]  # per block (m',) kept hidden units, sorted
    # token pruning (ViT-Slim): per block (k_l,) kept positions, monotone over depth, and the
    # dense per-position multipliers (T,) the kept ones carry into the subnet (None: all 1)
    tokens: list[torch.Tensor] | None = None
    token_scale: list[torch.Tensor] | None = None

    @classmethod
    def full(cls, arch: ViTArch) -> PrunePlan:
        return cls(torch.arange(arch.embed_dim),
                   [torch.arange(b.num_heads) for b in arch.blocks],
                   [torch.arange(b.head_dim).repeat(b.num_heads, 1) for b in arch.blocks],
                   [torch.arange(b.mlp_hidden) for b in arch.blocks])

    def arch(self, dense: ViTArch) -> ViTArch:
        blocks = tuple(BlockArch(len(h), d.shape[1], len(m))
                       for h, d, m in zip(self.heads, self.dims, self.mlp, strict=True))
        tokens = (None if self.tokens is None
                  else tuple(tuple(int(u) for u in t) for t in self.tokens))
        return ViTArch(**{**dense.to_dict(), "embed_dim": len(self.embed), "blocks": blocks,
                          "tokens": tokens})

    def macs(self, dense: ViTArch) -> int:
        return count_macs(self.arch(dense))


def keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, sorted (k >= 1)."""
    k = max(1, min(int(k), scores.numel()))
    return torch.sort(torch.topk(scores.detach().flatten(), k).indices).values


def attn_rows(heads: torch.Tensor, dims: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Flat q (or k, or v) output indices of the kept (head, dim) units: (h' * d',)."""
    return (heads[:, None] * head_dim + dims).reshape(-1)


@torch.no_grad()
def apply_plan(vit: VisionTransformer, plan: PrunePlan) -> tuple[VisionTransformer, ViTArch]:
    """A new, physically smaller timm ViT holding the kept units' weights."""
    dense = ViTArch.from_timm(vit)
    arch = plan.arch(dense)
    sd = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    dev = sd["cls_token"].device  # the plan's indices may come from the CPU (allocators)
    out = groups.take(sd, groups.embed_members(sd), plan.embed)
    for i, (blk_d, heads, dims, mlp) in enumerate(zip(dense.blocks, plan.heads, plan.dims,
                                                      plan.mlp, strict=True)):
        heads, dims = heads.to(dev), dims.to(dev)
        p = f"blocks.{i}."
        rows = attn_rows(heads, dims, blk_d.head_dim)  # (h' * d',) into H*d
        # the dense softmax scale 1/sqrt(d) kept with head_dim d': fold the ratio into q
        q_fix = (dims.shape[1] / blk_d.head_dim) ** 0.5
        members = groups.attn_members(p + "attn.", blk_d.attn_dim, p + "attn.qkv.bias" in out)
        out = groups.take(out, members, rows)
        groups.scale_(out, [m for m in members if m.role == "q"],
                      torch.full((len(rows),), q_fix))
        out = groups.take(out, groups.mlp_members(p + "mlp.", p + "mlp.fc1.bias" in out), mlp)
    if plan.tokens is not None:
        for i, kept in enumerate(plan.tokens):
            scale = (torch.ones(len(kept)) if plan.token_scale is None
                     else plan.token_scale[i].detach()[kept])
            out[f"blocks.{i}.token_scale"] = scale.to(dev, torch.float32)
    model = build_from_arch(arch, device=dev)
    model.load_state_dict(out, strict=True)
    return model.eval(), arch
