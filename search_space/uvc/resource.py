"""UVC's resource ratio R: MACs of the compressed model over the dense model's, differentiable
in the counts (through the straight-through ceil) and in the block gates.

R uses the corrected qkv term T D (2 H'd + V) (METHODS.md 6b): at integer counts and hard gates
it equals the shared counter's MACs of the exported subnet, patch embedding and classifier
included, over the dense model's. (The published R puts 3 T D H'd on qkv and leaves the
classifier out; the tests keep it as a reference.)
"""

from __future__ import annotations

import torch

from search_space.arch import ViTArch
from search_space.cost import count_macs, stem_head_macs
from search_space.uvc.primal_dual import smallest, ste_ceil


def block_macs(arch: ViTArch, heads: torch.Tensor, v: torch.Tensor,
               hidden: torch.Tensor) -> torch.Tensor:
    """MACs per image of value-pruned blocks: kept heads H' (q/k width H'd), total value width V,
    MLP width h'; each (L,) -> (L,). The counter's formula for mixer "attn" with v_dims."""
    T, D, d = arch.num_tokens, arch.embed_dim, arch.blocks[0].head_dim
    qk = heads * d
    return T * D * (2 * qk + v) + T * T * (qk + v) + T * v * D + 2 * T * D * hidden


def kept_widths(arch: ViTArch, s: torch.Tensor, r: torch.Tensor,
                head_importance: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(H', V, h') per block from the counts: s (L, 2), r (L, H); the heads removed are the
    ceil(s[:, 0]) least important ones (head_importance (L, H)), and only kept heads' value
    dims count in V = H'd - sum over kept heads of ceil r."""
    b = arch.blocks[0]
    heads = b.num_heads - ste_ceil(s[:, 0])
    kept = ~smallest(head_importance, torch.ceil(s[:, 0]))  # (L, H)
    v = heads * b.head_dim - (kept * ste_ceil(r)).sum(-1)
    return heads, v, b.mlp_hidden - ste_ceil(s[:, 1])


def resource_ratio(arch: ViTArch, s: torch.Tensor, r: torch.Tensor,
                   head_importance: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """R = (stem + head + sum_l run_l MACs_l) / dense MACs; run (L,) gate weights (a soft
    Gumbel sample's run probability, or hard 0/1)."""
    per_block = block_macs(arch, *kept_widths(arch, s, r, head_importance))
    return (stem_head_macs(arch) + (run * per_block).sum()) / count_macs(arch)
