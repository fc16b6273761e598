"""The shape of a (possibly non-uniform) ViT: what the cost counter and subnet export share.

A searched subnet is a ViT whose blocks each keep their own number of heads, per-head q/k/v
width and MLP hidden width, on a residual stream that may be narrower than the dense one. Every
method in this project ends at a `ViTArch`; costs are computed from it and from nothing else, so
OFB and the baselines are measured by one ruler.

A block's token mixer need not be attention (METHODS.md section 7): UVC keeps per-head value
widths (`v_dims`) and skips whole blocks (fewer blocks than the dense model), SPViT turns
attention into a 3x3 / 1x1 conv (`conv_dim`), and a mixer or MLP may be removed outright. This
module only describes and validates; building, costing and reading modules back is
search_space/mixers.py's job (mixers imports arch, never the other way round at import time).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

MIXER_KINDS = ("attn", "conv3", "conv1", "none")  # one registry entry each in mixers.py
CONV_MIXERS = ("conv3", "conv1")


def _block_at(i: int, b: Any) -> BlockArch:
    try:
        return BlockArch.from_dict(b)
    except (TypeError, ValueError) as e:
        raise ValueError(f"blocks[{i}] = {b!r} is not a valid block: {e}") from None


@dataclass(frozen=True)
class BlockArch:
    """Widths of one transformer block.

    q and k keep `num_heads * head_dim`; v does too unless `v_dims` gives each kept head its own
    value width (UVC). Conv mixers have no heads but `conv_dim` bottleneck channels; "none" has
    no token mixer at all; `mlp_hidden` 0 drops the MLP branch. The new fields come after the
    original three, with defaults, so `BlockArch(h, d, m)` and older arch.json files still load.
    Widths may be 0-d tensors (OFB's expected widths go through the cost formulas).
    """

    num_heads: int
    head_dim: int
    mlp_hidden: int
    mixer: str = "attn"
    v_dims: tuple[int, ...] | None = None
    conv_dim: int = 0

    def __post_init__(self) -> None:
        if self.v_dims is not None:  # JSON lists and user lists become a hashable tuple
            object.__setattr__(self, "v_dims", tuple(int(v) for v in self.v_dims))
        where = f"BlockArch(mixer={self.mixer!r})"
        if self.mixer not in MIXER_KINDS:
            raise ValueError(f"BlockArch: mixer must be one of {MIXER_KINDS}, got {self.mixer!r}")
        if self.mlp_hidden < 0:
            raise ValueError(f"{where}: mlp_hidden must be >= 0 (0 = no MLP branch), "
                             f"got {self.mlp_hidden}")
        if self.mixer == "attn":
            if isinstance(self.head_dim, int) and self.head_dim < 1:
                raise ValueError(f"{where}: head_dim must be >= 1, got {self.head_dim}")
            if self.num_heads < 1:
                raise ValueError(f"{where}: num_heads must be >= 1, got {self.num_heads} "
                                 "(use mixer='none' to remove the attention branch)")
            if self.conv_dim != 0:
                raise ValueError(f"{where}: conv_dim must be 0 for attention, got "
                                 f"{self.conv_dim} (conv_dim is for mixer='conv3' / 'conv1')")
            if self.v_dims is not None and (
                    len(self.v_dims) != self.num_heads
                    or not all(1 <= v <= self.head_dim for v in self.v_dims)):
                raise ValueError(f"{where}: v_dims must be None or num_heads={self.num_heads} "
                                 f"values in [1, head_dim={self.head_dim}], got {self.v_dims}")
            return
        if self.v_dims is not None:
            raise ValueError(f"{where}: v_dims must be None, got {self.v_dims} "
                             "(value widths exist only for mixer='attn')")
        if self.num_heads != 0 or self.head_dim != 0:
            raise ValueError(f"{where}: num_heads and head_dim must be 0, got "
                             f"num_heads={self.num_heads}, head_dim={self.head_dim}")
        if self.mixer in CONV_MIXERS and self.conv_dim < 1:
            raise ValueError(f"{where}: conv_dim must be >= 1, got {self.conv_dim}")
        if self.mixer == "none" and self.conv_dim != 0:
            raise ValueError(f"{where}: conv_dim must be 0, got {self.conv_dim}")

    @classmethod
    def from_dict(cls, b: dict[str, Any]) -> BlockArch:
        """A block from arch.json, refusing unknown fields and non-integer widths by name."""
        if not isinstance(b, dict):
            raise ValueError(f"a block must be a JSON object, got {b!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(b) - fields)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(fields)}")
        for k in ("num_heads", "head_dim", "mlp_hidden", "conv_dim"):
            if k in b and (not isinstance(b[k], int) or isinstance(b[k], bool)):
                raise ValueError(f"{k} must be an integer, got {b[k]!r}")
        v = b.get("v_dims")
        if v is not None and (not isinstance(v, list | tuple) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in v)):
            raise ValueError(f"v_dims must be null or a list of integers, got {v!r}")
        return cls(**{**b, "v_dims": None if v is None else tuple(v)})

    @property
    def attn_dim(self) -> int:
        """q / k width (and v width without `v_dims`); 0 for conv and "none" blocks."""
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

    def __post_init__(self) -> None:
        if len(self.blocks) < 1:
            raise ValueError("ViTArch: blocks must hold at least one block, got none")
        if self.tokens is not None:
            conv = [i for i, b in enumerate(self.blocks) if b.mixer in CONV_MIXERS]
            if conv:
                raise ValueError(f"ViTArch: token pruning (tokens not None) is not allowed with "
                                 f"conv mixers (blocks {conv}): a conv needs the whole patch "
                                 "grid; set tokens=None or use attention there")

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
        blocks = d.get("blocks")
        if not isinstance(blocks, list | tuple) or not blocks:
            raise ValueError(f"blocks must be a non-empty list of blocks, got {blocks!r}")
        d["blocks"] = tuple(_block_at(i, b) for i, b in enumerate(blocks))
        if d.get("tokens") is not None:
            d["tokens"] = tuple(tuple(int(u) for u in t) for t in d["tokens"])
        return cls(**d)

    @classmethod
    def from_timm(cls, model: nn.Module) -> ViTArch:
        """Read the architecture of a timm `VisionTransformer` (dense or already narrowed).

        Each block is read back by the mixer registry, so subnets with conv / value-pruned /
        removed mixers round-trip: `from_timm(build_from_arch(a)) == a`.
        """
        from search_space.mixers import read_block  # mixers imports arch: import here only

        pe = model.patch_embed
        img = pe.img_size[0] if isinstance(pe.img_size, (tuple, list)) else pe.img_size
        patch = pe.patch_size[0] if isinstance(pe.patch_size, (tuple, list)) else pe.patch_size
        if pe.img_size[0] != pe.img_size[1] or pe.patch_size[0] != pe.patch_size[1]:
            raise ValueError(
                f"only square images and patches are supported, got img_size={pe.img_size}, "
                f"patch_size={pe.patch_size}"
            )
        blocks = tuple(read_block(blk) for blk in model.blocks)
        qkv = [blk.attn.qkv for blk in model.blocks if hasattr(blk.attn, "qkv")]
        first = model.blocks[0]
        return cls(
            img_size=int(img),
            patch_size=int(patch),
            in_chans=pe.proj.in_channels,
            num_classes=model.num_classes,
            embed_dim=pe.proj.out_channels,
            blocks=blocks,
            class_token=model.cls_token is not None,
            reg_tokens=getattr(model, "num_reg_tokens", 0),
            no_embed_class=getattr(model, "no_embed_class", False),
            global_pool=model.global_pool or "token",
            qkv_bias=qkv[0].bias is not None if qkv else True,  # no attention: moot
            layer_scale=not isinstance(first.ls1, nn.Identity),
            fc_norm=not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity),
            pre_norm=not isinstance(getattr(model, "norm_pre", nn.Identity()), nn.Identity),
            tokens=getattr(model, "token_positions", None),  # set by tokens.install_token_pruning
        )
