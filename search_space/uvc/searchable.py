"""`UVCViT`: a timm VisionTransformer with UVC's search state, weights kept in place.

State (METHODS.md section 3), buffers so they travel with the weights in every checkpoint:
s (L, 2) heads and MLP neurons to remove per block, r (L, H) value dims to remove per head,
duals y (L, 2), p (L, H), z (1,); and the block-gate logits (L, 2) (index 1 = run), a parameter.

Training forward: x <- g1 Block(x) + g0 x with g a soft Gumbel sample per block (the method
hands in the noise), or g = (0.5, 0.5) during the gate warm-up. Nothing is masked: the search
shrinks the least important groups' weights (the prox) instead. Eval forward is the exported
subnet's: hard gates (a skipped block computes x -> x) and the removed groups masked at the
inputs of attn.proj and mlp.fc2, which is exact (a value dim is one proj column, a head its d
columns, a neuron one fc2 column). Validation during the search so measures the subnet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from search_space.arch import ViTArch
from search_space.uvc.primal_dual import gate_probs, hard_gates, smallest

DUAL_INIT = 1e-3


class ColumnMaskedLinear(nn.Linear):
    """nn.Linear whose input columns can be masked (eval: removed groups); same state keys."""

    in_mask: torch.Tensor | None = None  # (in_features,), set only around an eval forward

    @classmethod
    def wrap(cls, lin: nn.Linear) -> ColumnMaskedLinear:
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
                  device="meta")
        new.weight, new.bias = lin.weight, lin.bias  # the same parameters, not copies
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_mask is not None:
            x = x * self.in_mask.to(x.dtype)
        return super().forward(x)


@dataclass
class Importance:
    """Squared column norms of the current weights: value dims c (L, H, d), heads a (L, H),
    MLP neurons n (L, h)."""

    c: torch.Tensor
    a: torch.Tensor
    n: torch.Tensor


class UVCViT(nn.Module):
    def __init__(self, vit: VisionTransformer, gate_init: tuple[float, float] = (-1.0, 1.0)):
        super().__init__()
        self.vit = vit
        self.dense_arch = ViTArch.from_timm(vit)
        if any(b.mixer != "attn" or b.v_dims is not None for b in self.dense_arch.blocks) or \
                len(set(self.dense_arch.blocks)) != 1:
            raise ValueError("UVC searches a dense ViT with equal blocks; got "
                             f"{self.dense_arch.blocks}")
        b, L = self.dense_arch.blocks[0], self.dense_arch.depth
        self.H, self.d, self.h = b.num_heads, b.head_dim, b.mlp_hidden
        dev = vit.cls_token.device if vit.cls_token is not None else vit.pos_embed.device
        for blk in vit.blocks:  # attn.proj / mlp.fc2 get maskable inputs (same parameters)
            blk.attn.proj = ColumnMaskedLinear.wrap(blk.attn.proj)
            blk.mlp.fc2 = ColumnMaskedLinear.wrap(blk.mlp.fc2)
        logits = torch.empty(L, 2, device=dev)  # fills, not a host list: device-clean
        logits[:, 0], logits[:, 1] = gate_init
        self.gate_logits = nn.Parameter(logits)
        self.register_buffer("s", torch.zeros(L, 2, device=dev))
        self.register_buffer("r", torch.zeros(L, self.H, device=dev))
        self.register_buffer("y", torch.full((L, 2), DUAL_INIT, device=dev))
        self.register_buffer("p", torch.full((L, self.H), DUAL_INIT, device=dev))
        self.register_buffer("z", torch.full((1,), DUAL_INIT, device=dev))
        self.tau = 0.5
        self.gate_noise: torch.Tensor | None = None  # (L, 2) Gumbel noise for the next forward
        self.half_strength = False  # gate warm-up: every block at (0.5, 0.5)

    # --- importance and the plan ---------------------------------------------------------------
    def importance(self) -> Importance:
        proj = torch.stack([blk.attn.proj.weight for blk in self.vit.blocks])  # (L, D, H*d)
        fc2 = torch.stack([blk.mlp.fc2.weight for blk in self.vit.blocks])  # (L, D, h)
        c = proj.detach().float().pow(2).sum(1).unflatten(-1, (self.H, self.d))  # (L, H, d)
        return Importance(c=c, a=c.sum(-1), n=fc2.detach().float().pow(2).sum(1))

    def keep_masks(self, imp: Importance | None = None) -> tuple[torch.Tensor, ...]:
        """What the subnet keeps, on the device: run (L,) bool, proj columns (L, H*d) bool
        (kept heads' kept value dims), fc2 columns (L, h) bool."""
        imp = self.importance() if imp is None else imp
        heads = ~smallest(imp.a, torch.ceil(self.s[:, 0]))  # (L, H)
        dims = ~smallest(imp.c, torch.ceil(self.r))  # (L, H, d)
        cols = (heads[..., None] & dims).flatten(1)  # (L, H*d)
        neurons = ~smallest(imp.n, torch.ceil(self.s[:, 1]))  # (L, h)
        return hard_gates(self.gate_logits.detach()), cols, neurons

    def gates(self) -> torch.Tensor:
        """(L, 2) gate weights for a training forward: (0.5, 0.5) in the warm-up, else a soft
        Gumbel sample (the mean gate without noise)."""
        if self.half_strength:  # constant, but through the logits: DDP sees them used
            return torch.full_like(self.gate_logits, 0.5) + 0 * self.gate_logits
        return gate_probs(self.gate_logits, self.gate_noise, self.tau)

    # --- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> logits (B, classes)."""
        v = self.vit
        if self.training:
            g = self.gates()  # (L, 2)
            run, skip = g[:, 1], g[:, 0]
        else:
            run_b, cols, neurons = self.keep_masks()
            run = run_b.to(x.dtype)
            skip = 1 - run
            for blk, c, n in zip(v.blocks, cols, neurons, strict=True):
                blk.attn.proj.in_mask, blk.mlp.fc2.in_mask = c, n
        try:
            x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))  # (B, T, D)
            for i, blk in enumerate(v.blocks):
                x = run[i] * blk(x) + skip[i] * x
            return v.forward_head(v.norm(x))
        finally:
            for blk in v.blocks:
                blk.attn.proj.in_mask = blk.mlp.fc2.in_mask = None

    # --- the prox ------------------------------------------------------------------------------
    @torch.no_grad()
    def shrink_(self, proj_f: torch.Tensor, mlp_f: torch.Tensor) -> None:
        """Scale attn.proj columns by proj_f (L, H*d) and fc2 columns by mlp_f (L, h)."""
        for blk, pf, mf in zip(self.vit.blocks, proj_f, mlp_f, strict=True):
            blk.attn.proj.weight.mul_(pf.to(blk.attn.proj.weight.dtype))
            blk.mlp.fc2.weight.mul_(mf.to(blk.mlp.fc2.weight.dtype))


def gumbel_noise(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """Gumbel(0, 1) noise from a generator seeded by `seed`: the same on every worker.

    Drawn on the device where it has its own generator (CUDA, CPU); elsewhere on the CPU and
    copied without blocking."""
    if device.type in ("cuda", "cpu"):
        gen = torch.Generator(device=device).manual_seed(seed)
        u = torch.rand(shape, generator=gen, device=device)
    else:
        gen = torch.Generator().manual_seed(seed)
        u = torch.rand(shape, generator=gen).to(device, non_blocking=True)
    return -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))
