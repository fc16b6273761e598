"""Analytic MACs and params of a ViT with per-block widths: the one cost counter every method uses.

MACs are multiply-accumulates (what ViT papers call "FLOPs"); we count exactly what
`torch.utils.flop_counter.FlopCounterMode` counts (matmuls and convolutions, /2), so the two agree
on real modules. Norms, softmax, GELU and residual adds are not counted, as in the literature.
Each block's mixer (attention, value-pruned attention, conv, none) is costed by its entry in the
mixer registry (search_space/mixers.py); this module adds stem, head, MLPs and token pruning.

The per-block formulas are plain arithmetic, so they also accept tensors: OFB's MACs loss feeds
them *expected* widths (differentiable sums of survival probabilities) through the same code.

Command line::

    python -m search_space.cost deit_small_patch16_224
    python -m search_space.cost vit_tiny_patch16_224 --img-size 32 --patch-size 4 --check
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from search_space.arch import BlockArch, ViTArch
from search_space.mixers import attn_macs as attn_macs  # re-exported: the OFB supernet's API
from search_space.mixers import get_mixer, mlp_params
from search_space.mixers import mlp_macs as mlp_macs

Number = Any  # float, int or a 0-d tensor (expected widths)


def block_macs(tokens: int, embed_dim: Number, blk: BlockArch,
               patches: int | None = None) -> Number:
    """Mixer (by `blk.mixer`, from the registry) + MLP, for one image.

    `patches` (N, the grid's positions) is needed by conv mixers only: they see the whole grid.
    """
    mixer = get_mixer(blk.mixer).macs(tokens, patches, embed_dim, blk)
    return mixer + mlp_macs(tokens, embed_dim, blk.mlp_hidden)


def stem_head_macs(arch: ViTArch, embed_dim: Number | None = None) -> Number:
    """Patch-embedding convolution and classifier head (one pooled token)."""
    d = arch.embed_dim if embed_dim is None else embed_dim
    patch = arch.num_patches * d * arch.in_chans * arch.patch_size**2
    head = d * arch.num_classes
    return patch + head


def count_macs(arch: ViTArch) -> int:
    """MACs of one forward pass of one image."""
    total = stem_head_macs(arch)
    for i, blk in enumerate(arch.blocks):  # token pruning: attention / none blocks only
        total += block_macs(arch.block_tokens(i), arch.embed_dim, blk, arch.num_patches)
    return int(total)


def count_params(arch: ViTArch) -> int:
    """Number of parameters, matching `sum(p.numel() for p in model.parameters())` for timm."""
    d = arch.embed_dim
    n = d * arch.in_chans * arch.patch_size**2 + d  # patch conv + bias
    n += d * arch.num_prefix_tokens  # cls + register tokens
    pos_tokens = arch.num_patches if arch.no_embed_class else arch.num_tokens
    n += pos_tokens * d
    if arch.pre_norm:
        n += 2 * d
    for blk in arch.blocks:
        kind = get_mixer(blk.mixer)
        n += 2 * d if kind.pre_norm else 0  # norm1
        n += kind.params(d, blk, arch.qkv_bias)
        n += mlp_params(d, blk.mlp_hidden)  # with norm2
        if arch.layer_scale:  # ls1 and ls2, kept even on a removed branch
            n += 2 * d
    n += 2 * d  # final norm (or fc_norm: timm keeps exactly one of them)
    if arch.num_classes > 0:
        n += d * arch.num_classes + arch.num_classes
    return int(n)


@dataclass(frozen=True)
class Cost:
    macs: int
    params: int

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def mparams(self) -> float:
        return self.params / 1e6


def cost_of(arch: ViTArch) -> Cost:
    return Cost(count_macs(arch), count_params(arch))


def measure_macs(model: nn.Module, arch: ViTArch, batch: int = 1) -> int:
    """MACs of one image measured by PyTorch's FlopCounterMode.

    Fused attention (SDPA) counts as 0 on the CPU, so attention modules are switched to their
    explicit matmul path for the measurement and restored afterwards.
    """
    from torch.utils.flop_counter import FlopCounterMode

    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    for m, _ in fused:
        m.fused_attn = False
    p = next(model.parameters())
    x = torch.zeros(batch, arch.in_chans, arch.img_size, arch.img_size, device=p.device)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    try:
        with torch.no_grad(), counter:
            model.eval()(x)
    finally:
        model.train(was_training)
        for m, f in fused:
            m.fused_attn = f
    return counter.get_total_flops() // 2 // batch


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m search_space.cost",
        description="Print the MACs (G) and params (M) of a timm ViT, analytically.",
    )
    p.add_argument("model", help="timm model name, e.g. deit_small_patch16_224")
    p.add_argument("--img-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--in-chans", type=int)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--embed-dim", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument(
        "--check", action="store_true", help="also measure with FlopCounterMode (runs a forward)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from search_space.models import build_vit

    overrides = {
        k: v
        for k, v in vars(args).items()
        if k not in ("model", "check") and v is not None
    }
    model = build_vit(args.model, device="cpu" if args.check else "meta", **overrides)
    arch = ViTArch.from_timm(model)
    c = cost_of(arch)
    print(f"{args.model}: {c.gmacs:.4f} GMACs  {c.mparams:.3f} M params  "
          f"({arch.num_tokens} tokens, embed {arch.embed_dim}, depth {arch.depth})")
    if args.check:
        measured = measure_macs(model, arch)
        print(f"FlopCounterMode: {measured / 1e9:.4f} GMACs "
              f"(analytic/measured = {c.macs / measured:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
