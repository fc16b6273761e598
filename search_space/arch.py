"""The shape of a (possibly non-uniform) ViT: what the cost counter and subnet export share.

A searched subnet is a ViT whose blocks each keep their own number of heads, per-head q/k/v
width and MLP hidden width, on a residual stream that may be narrower than the dense one. Every
method in this project ends at a `ViTArch`; costs are computed from it and from nothing else, so
OFB and the baselines are measured by one ruler.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class BlockArch:
    """Widths of one transformer block. q, k and v share `num_heads * head_dim` (OFB joint mode)."""

    num_heads: int
    head_dim: int
    mlp_hidden: int

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class ViTArch:
    """Architecture of a timm-style VisionTransformer with per-block widths.

    Attributes mirror timm's `VisionTransformer` keywords so a dense timm model maps onto it
    one-to-one (`from_timm`), and a subnet can be rebuilt from its JSON alone.
    """

    img_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    embed_dim: int
    blocks: tuple[BlockArch, ...]
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    global_pool: str = "token"
    qkv_bias: bool = True
    layer_scale: bool = False
    fc_norm: bool = False
    pre_norm: bool = False
    # Token pruning (ViT-Slim's token multipliers): per block, the positions (into the dense
    # token sequence: prefix tokens first, then patches) that block still sees. None = all.
    # Monotone over depth: block l's positions are a subset of block l-1's.
    tokens: tuple[tuple[int, ...], ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    def block_tokens(self, i: int) -> int:
        """Tokens block i processes."""
        return self.num_tokens if self.tokens is None else len(self.tokens[i])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTArch:
        d = dict(d)
        d["blocks"] = tuple(BlockArch(**b) for b in d["blocks"])
        if d.get("tokens") is not None:
            d["tokens"] = tuple(tuple(int(u) for u in t) for t in d["tokens"])
        return cls(**d)

    @classmethod
    def from_timm(cls, model: nn.Module) -> ViTArch:
        """Read the architecture of a timm `VisionTransformer` (dense or already narrowed)."""
        pe = model.patch_embed
        img = pe.img_size[0] if isinstance(pe.img_size, (tuple, list)) else pe.img_size
        patch = pe.patch_size[0] if isinstance(pe.patch_size, (tuple, list)) else pe.patch_size
        if pe.img_size[0] != pe.img_size[1] or pe.patch_size[0] != pe.patch_size[1]:
            raise ValueError(
                f"only square images and patches are supported, got img_size={pe.img_size}, "
                f"patch_size={pe.patch_size}"
            )
        blocks = []
        for blk in model.blocks:
            attn = blk.attn
            qkv_out = attn.qkv.out_features
            heads = attn.num_heads
            blocks.append(BlockArch(heads, qkv_out // 3 // heads, blk.mlp.fc1.out_features))
        first = model.blocks[0]
        return cls(
            img_size=int(img),
            patch_size=int(patch),
            in_chans=pe.proj.in_channels,
            num_classes=model.num_classes,
            embed_dim=pe.proj.out_channels,
            blocks=tuple(blocks),
            class_token=model.cls_token is not None,
            reg_tokens=getattr(model, "num_reg_tokens", 0),
            no_embed_class=getattr(model, "no_embed_class", False),
            global_pool=model.global_pool or "token",
            qkv_bias=first.attn.qkv.bias is not None,
            layer_scale=not isinstance(first.ls1, nn.Identity),
            fc_norm=not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity),
            pre_norm=not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity),
            tokens=getattr(model, "token_positions", None),  # set by tokens.install_token_pruning
        )
