"""Token pruning by position (ViT-Slim's third unit type): monotone keep-sets and the subnet side.

ViT-Slim learns one multiplier per token position and block, input-independent, so a pruned
position can be dropped from the stream for good: block l sees the positions `arch.tokens[l]`,
a subset of block l-1's (monotone over depth), with the prefix (cls/register) tokens always kept
so that `global_pool="token"` still finds the cls token at index 0.

In an exported subnet this is a plain timm ViT plus, per block that prunes tokens,
- a forward pre-hook on the block that gathers the surviving positions of the stream
  (`token_index`, a non-persistent buffer: derived from arch.json, not stored), and
- `token_scale` (k_l,), a persistent buffer (saved in model.safetensors): the learned multiplier
  of each kept position, applied to the attention and MLP inputs as in the search, so the
  subnet computes what the searched model computed on the kept positions.
Both are rebuilt by `install_token_pruning` from the architecture alone.
"""

from __future__ import annotations

import torch
from torch import nn

from search_space.arch import ViTArch


def monotone_keep(scores: list[torch.Tensor], threshold: float | torch.Tensor,
                  num_prefix: int) -> list[torch.Tensor]:
    """Per block, the sorted positions with score > threshold that every earlier block kept too.

    scores: per block (T,) token scores over the dense sequence. Prefix tokens are always kept;
    a block with no prefix token and nothing above the threshold keeps its best survivor.
    """
    alive = torch.ones(scores[0].numel(), dtype=torch.bool, device=scores[0].device)
    out = []
    for s in scores:  # (T,)
        keep = alive & (s > threshold)
        keep[:num_prefix] = True
        if not keep.any():
            keep[torch.where(alive, s, torch.full_like(s, -torch.inf)).argmax()] = True
        alive = keep
        out.append(torch.nonzero(keep).flatten())
    return out


def _gather(block: nn.Module, args: tuple) -> tuple:
    """Pre-hook on a block: keep the surviving positions of the stream (B, k_{l-1}, D)."""
    return (args[0].index_select(1, block.token_index), *args[1:])


def install_token_pruning(model: nn.Module, arch: ViTArch) -> None:
    """Give a timm ViT built from `arch` its per-block token selection and `token_scale`."""
    if arch.tokens is None:
        return
    model.token_positions = arch.tokens  # read back by ViTArch.from_timm
    prev = list(range(arch.num_tokens))
    dev = next(model.parameters()).device  # not norm1's: a block may have none (mixer "none")
    for blk, kept in zip(model.blocks, arch.tokens, strict=True):
        pos = {u: j for j, u in enumerate(prev)}
        if not set(kept) <= pos.keys():
            raise ValueError(f"arch.tokens: block positions {sorted(set(kept) - pos.keys())} "
                             "were dropped by an earlier block (token keep-sets must shrink "
                             "over depth)")
        if list(kept) != prev:
            blk.register_buffer("token_index",
                                torch.tensor([pos[u] for u in kept]).to(dev),
                                persistent=False)
            blk.register_forward_pre_hook(_gather)
        blk.register_buffer("token_scale", torch.ones(len(kept), device=dev))
        for part in (blk.attn, blk.mlp):
            # the hook reads the block's buffer, so .to(), load_state_dict and slicing keep it
            object.__setattr__(part, "_token_owner", blk)  # not a submodule: no cycle
            part.register_forward_pre_hook(_scale_inputs)
        prev = list(kept)


def _scale_inputs(module: nn.Module, args: tuple) -> tuple:
    """Pre-hook on attn / mlp: inputs (B, k_l, D) times the block's `token_scale` (k_l,)."""
    return (args[0] * module._token_owner.token_scale[:, None], *args[1:])
