"""The mixer registry: one entry per block kind, which builds, costs and reads back its module.

A subnet's block is timm's `Block` with its token mixer (`block.attn`) swapped for the kind named
by `BlockArch.mixer` (METHODS.md section 7): timm's `Attention`, our value-pruned attention
(UVC: heads of unequal value width), a 3x3 / 1x1 conv on the patch grid (SPViT), or nothing.
`build_from_arch`, `count_macs` / `count_params` and `ViTArch.from_timm` all dispatch here, so a
new kind is one registered class and nothing else asks which kind it holds.

MACs are what FlopCounterMode counts (matmuls, convolutions; /2); BatchNorm, softmax,
activations, LayerNorms and concatenation are free, as in the literature. The formulas are plain
arithmetic so that 0-d tensors (OFB's expected widths) pass through them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.layers import Mlp, use_fused_attn
from timm.models.vision_transformer import Attention
from torch import nn

from search_space.arch import BlockArch

Number = Any  # int, float or a 0-d tensor (expected widths)


# --- plain formulas (also fed tensors by the OFB supernet) ---------------------------------
def attn_macs(tokens: int, embed_dim: Number, heads: Number, head_dim: Number) -> Number:
    """qkv projection + q @ k^T + attn @ v + output projection, for one image."""
    inner = heads * head_dim
    qkv = tokens * embed_dim * 3 * inner  # (T, D) @ (D, 3*H*d)
    scores = tokens * tokens * inner  # H x (T, d) @ (d, T)
    mix = tokens * tokens * inner  # H x (T, T) @ (T, d)
    proj = tokens * inner * embed_dim  # (T, H*d) @ (H*d, D)
    return qkv + scores + mix + proj


def mlp_macs(tokens: int, embed_dim: Number, hidden: Number) -> Number:
    """fc1 + fc2, for one image."""
    return 2 * tokens * embed_dim * hidden


def mlp_params(embed_dim: int, hidden: int) -> int:
    """fc1 + fc2 with biases, and norm2 (2D); 0 when the MLP branch is removed."""
    if hidden == 0:
        return 0
    return 2 * embed_dim * hidden + hidden + embed_dim + 2 * embed_dim


# --- modules ---------------------------------------------------------------------------------
class _NoMask(nn.Module):
    """Base of our mixers: timm's Block passes `attn_mask` / `is_causal`, which they cannot use."""

    @staticmethod
    def _refuse_mask(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("attn_mask / is_causal are not supported by this mixer")


class ValuePrunedAttention(_NoMask):
    """Attention whose kept heads have their own value width (UVC), q and k of `head_dim`.

    Rows of `qkv`: q of all heads, k of all heads, then each head's v rows (widths `v_dims`).
    Fused (inference, training): one attention call over all heads with each head's v padded
    to the head_dim of q and k by a gather from a zero column (per-head calls cost UVC's subnets
    ~25% of their speed at batch 1; the padding adds T^2 (H d - V) multiply-adds of zeros).
    Unfused (`measure_macs`, ONNX export): one batched matmul for the scores, attn @ v per
    head, so FlopCounterMode sees exactly T^2 (H d + V) there.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, v_dims: tuple[int, ...],
                 qkv_bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim, self.v_dims = num_heads, head_dim, tuple(v_dims)
        self.attn_dim = num_heads * head_dim  # q / k width, as timm names it
        self.v_dim = sum(self.v_dims)
        self.scale = head_dim**-0.5
        self.fused_attn = use_fused_attn()  # measure_macs / export_onnx switch it off
        self.qkv = nn.Linear(dim, 2 * self.attn_dim + self.v_dim, bias=qkv_bias)
        self.proj = nn.Linear(self.v_dim, dim)
        # padded layout: head h's column j < v_h reads v column offset_h + j, the rest the
        # zero column V; `real` picks the V real columns back out of the H * max(v) padded ones
        # padded to q/k's head_dim as well: one width for q, k and v is what keeps SDPA on its
        # fused kernel (v at 31 of 32 wide took the math path: 1.8x slower here)
        vmax = max(max(self.v_dims), head_dim)
        offsets = [sum(self.v_dims[:h]) for h in range(num_heads)]
        pad = [offsets[h] + j if j < v else self.v_dim for h, v in enumerate(self.v_dims)
               for j in range(vmax)]
        real = [h * vmax + j for h, v in enumerate(self.v_dims) for j in range(v)]
        self._layout, self._on = (pad, real), {}  # host lists; tensors per device, built once

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        self._refuse_mask(attn_mask, is_causal)
        q, k, v = self.qkv(x).split([self.attn_dim, self.attn_dim, self.v_dim], dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, d)
        k = k.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, d)
        if self.fused_attn:
            B, T, _ = v.shape
            vz = F.pad(v, (0, 1))  # (B, T, V + 1): the last column is the zero one
            pad, real = self._indices(v.device)
            vp = vz.index_select(-1, pad).unflatten(-1, (self.num_heads, -1))  # (B, T, H, vmax)
            o = F.scaled_dot_product_attention(q, k, vp.transpose(1, 2), scale=self.scale)
            out = o.transpose(1, 2).flatten(2).index_select(-1, real)  # (B, T, V)
            return self.proj(out)
        vs = v.split(list(self.v_dims), dim=-1)  # H x (B, T, v_h)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, T, T)
        outs = [attn[:, h] @ v_h for h, v_h in enumerate(vs)]  # H x (B, T, v_h)
        return self.proj(torch.cat(outs, dim=-1))  # (B, T, V) -> (B, T, D)


    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded layout's index tensors on `device` (not buffers: a module built on the
        meta device and materialised with `to_empty` would hold garbage in them)."""
        if device not in self._on:
            self._on[device] = tuple(torch.tensor(i).to(device) for i in self._layout)
        return self._on[device]


class ConvMixer(_NoMask):
    """SPViT's conv token mixer: conv k x k -> BN -> ReLU -> Linear back to D on the patch grid.

    The prefix (cls / register) tokens have no grid position; they leave as they came in.
    """

    def __init__(self, dim: int, conv_dim: int, kernel: int, num_prefix_tokens: int, grid: int):
        super().__init__()
        self.num_prefix_tokens, self.grid = num_prefix_tokens, grid
        self.conv = nn.Conv2d(dim, conv_dim, kernel, padding=(kernel - 1) // 2)
        self.bn = nn.BatchNorm2d(conv_dim)
        self.proj = nn.Linear(conv_dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        self._refuse_mask(attn_mask, is_causal)
        P, S = self.num_prefix_tokens, self.grid
        g = x[:, P:].transpose(1, 2).unflatten(2, (S, S))  # (B, N, D) -> (B, D, S, S)
        y = torch.relu(self.bn(self.conv(g)))  # (B, c, S, S)
        y = self.proj(y.flatten(2).transpose(1, 2))  # (B, N, c) -> (B, N, D)
        return torch.cat([x[:, :P], y], dim=1)  # (B, P + N, D)


class Zeros(_NoMask):
    """A removed branch (mixer "none", or mlp_hidden 0): adds nothing to the residual stream."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        self._refuse_mask(attn_mask, is_causal)
        return torch.zeros_like(x)


# --- the registry ------------------------------------------------------------------------------
class MixerKind:
    """One block kind. Subclass, set `name`, implement the five methods, and register::

        @register_mixer
        class Pool(MixerKind):  # PoolFormer-style: no weights, no MACs
            name = "pool"
            def build(self, dim, blk, qkv_bias, num_prefix_tokens, grid):
                return PoolMixer(num_prefix_tokens, grid)  # forward(x, attn_mask=None, ...)
            def macs(self, tokens, patches, dim, blk): return 0
            def params(self, dim, blk, qkv_bias): return 0
            def owns(self, module): return isinstance(module, PoolMixer)
            def read(self, module): return {"num_heads": 0, "head_dim": 0}

    (`BlockArch` validates `mixer` against `arch.MIXER_KINDS`: add the name and its rule there.)
    """

    name: ClassVar[str] = ""
    pre_norm: ClassVar[bool] = True  # whether the block keeps norm1 (2D params) before it

    def build(self, dim: int, blk: BlockArch, qkv_bias: bool, num_prefix_tokens: int,
              grid: int) -> nn.Module:
        """The inference module for `blk` on a D-wide stream of prefix + grid x grid tokens."""
        raise NotImplementedError

    def macs(self, tokens: int, patches: int | None, dim: Number, blk: BlockArch) -> Number:
        """MACs per image of the mixer alone (T tokens, N of them patches; None if unknown)."""
        raise NotImplementedError

    def params(self, dim: int, blk: BlockArch, qkv_bias: bool) -> int:
        """Parameters of the mixer alone (norm1 is counted by the caller if `pre_norm`)."""
        raise NotImplementedError

    def owns(self, module: nn.Module) -> bool:
        """Whether a built module is of this kind (for reading a model back)."""
        raise NotImplementedError

    def read(self, module: nn.Module) -> dict[str, Any]:
        """The `BlockArch` fields (all but mixer and mlp_hidden) of a module this kind owns."""
        raise NotImplementedError


_MIXERS: dict[str, MixerKind] = {}


def register_mixer(cls: type[MixerKind]) -> type[MixerKind]:
    """Class decorator: register one instance of `cls` under `cls.name` (no duplicates)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: set the class attribute `name` before registering")
    if cls.name in _MIXERS:
        raise ValueError(f"mixer {cls.name!r} is already registered "
                         f"({type(_MIXERS[cls.name]).__name__}); pick another name")
    _MIXERS[cls.name] = cls()
    return cls


def list_mixers() -> list[str]:
    return sorted(_MIXERS)


def get_mixer(name: str) -> MixerKind:
    if name not in _MIXERS:
        raise ValueError(f"unknown mixer {name!r}; registered: {list_mixers()}")
    return _MIXERS[name]


@register_mixer
class AttnKind(MixerKind):
    """timm's Attention (state-dict keys attn.qkv.*, attn.proj.*), or value-pruned with v_dims."""

    name = "attn"

    def build(self, dim: int, blk: BlockArch, qkv_bias: bool, num_prefix_tokens: int,
              grid: int) -> nn.Module:
        if blk.v_dims is None:
            return Attention(dim, blk.num_heads, attn_head_dim=blk.head_dim, qkv_bias=qkv_bias)
        return ValuePrunedAttention(dim, blk.num_heads, blk.head_dim, blk.v_dims, qkv_bias)

    def macs(self, tokens: int, patches: int | None, dim: Number, blk: BlockArch) -> Number:
        if blk.v_dims is None:
            return attn_macs(tokens, dim, blk.num_heads, blk.head_dim)
        qk, v = blk.attn_dim, sum(blk.v_dims)
        return tokens * dim * (2 * qk + v) + tokens * tokens * (qk + v) + tokens * v * dim

    def params(self, dim: int, blk: BlockArch, qkv_bias: bool) -> int:
        qk = blk.attn_dim
        v = qk if blk.v_dims is None else sum(blk.v_dims)
        return dim * (2 * qk + v) + (2 * qk + v) * int(qkv_bias) + v * dim + dim

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, (Attention, ValuePrunedAttention))

    def read(self, module: nn.Module) -> dict[str, Any]:
        heads = module.num_heads
        if isinstance(module, ValuePrunedAttention):
            return {"num_heads": heads, "head_dim": module.head_dim, "v_dims": module.v_dims}
        return {"num_heads": heads, "head_dim": module.qkv.out_features // 3 // heads}


class _ConvKind(MixerKind):
    kernel: ClassVar[int] = 0

    def build(self, dim: int, blk: BlockArch, qkv_bias: bool, num_prefix_tokens: int,
              grid: int) -> nn.Module:
        return ConvMixer(dim, blk.conv_dim, self.kernel, num_prefix_tokens, grid)

    def macs(self, tokens: int, patches: int | None, dim: Number, blk: BlockArch) -> Number:
        if patches is None:
            raise ValueError(f"mixer {self.name!r} needs patches (N, the grid's positions)")
        # every padded output position counts k*k*D*c; then proj (N, c) @ (c, D)
        return self.kernel**2 * patches * blk.conv_dim * dim + patches * blk.conv_dim * dim

    def params(self, dim: int, blk: BlockArch, qkv_bias: bool) -> int:
        c = blk.conv_dim
        return self.kernel**2 * dim * c + c + 2 * c + c * dim + dim  # conv, BN affine, proj

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, ConvMixer) and module.conv.kernel_size[0] == self.kernel

    def read(self, module: nn.Module) -> dict[str, Any]:
        return {"num_heads": 0, "head_dim": 0, "conv_dim": module.conv.out_channels}


@register_mixer
class Conv3Kind(_ConvKind):
    name, kernel = "conv3", 3


@register_mixer
class Conv1Kind(_ConvKind):
    name, kernel = "conv1", 1


@register_mixer
class NoneKind(MixerKind):
    """The attention branch removed: zeros into the residual, and no norm1 in front of it."""

    name, pre_norm = "none", False

    def build(self, dim: int, blk: BlockArch, qkv_bias: bool, num_prefix_tokens: int,
              grid: int) -> nn.Module:
        return Zeros()

    def macs(self, tokens: int, patches: int | None, dim: Number, blk: BlockArch) -> Number:
        return 0

    def params(self, dim: int, blk: BlockArch, qkv_bias: bool) -> int:
        return 0

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, Zeros)

    def read(self, module: nn.Module) -> dict[str, Any]:
        return {"num_heads": 0, "head_dim": 0}


# --- whole blocks --------------------------------------------------------------------------------
def build_block_(block: nn.Module, dim: int, blk: BlockArch, qkv_bias: bool,
                 num_prefix_tokens: int, grid: int) -> nn.Module:
    """Give a timm `Block` the mixer and MLP of `blk`; a removed branch becomes `Zeros` and the
    norm in front of it Identity (no params)."""
    kind = get_mixer(blk.mixer)
    block.attn = kind.build(dim, blk, qkv_bias, num_prefix_tokens, grid)
    block.mlp = Zeros() if blk.mlp_hidden == 0 else Mlp(dim, blk.mlp_hidden)
    if not kind.pre_norm:
        block.norm1 = nn.Identity()
    if blk.mlp_hidden == 0:
        block.norm2 = nn.Identity()
    return block


def read_block(block: nn.Module) -> BlockArch:
    """The `BlockArch` of a built timm `Block`, whichever registered mixer it holds."""
    for kind in _MIXERS.values():
        if kind.owns(block.attn):
            mlp = 0 if isinstance(block.mlp, Zeros) else block.mlp.fc1.out_features
            return BlockArch(mlp_hidden=mlp, mixer=kind.name, **kind.read(block.attn))
    raise ValueError(f"block.attn is a {type(block.attn).__name__}, which no registered mixer "
                     f"owns (registered: {list_mixers()})")
