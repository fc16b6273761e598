"""ViT-Slim's searchable ViT (CVPR 2022, METHODS.md section 2): learnable l1-regularised
multipliers zeta (init 1) on a plain timm ViT.

- attention: zeta_attn (H*d,) per block scales the q, k and v features of unit (head, dim) alike
  (a forward hook on qkv's output: the same as scaling qkv's rows and bias);
- MLP: zeta_mlp (h,) per block scales the hidden activations after GELU (a pre-hook on fc2).

Patch-token multipliers (the optional third kind) are not implemented: a subnet that drops
tokens per block is not a plain timm ViT, and our exports are plain timm ViTs.
`fold()` multiplies the multipliers into the weights, giving back a plain ViT computing the
same function; ViT-Slim's stage 2 then prunes it (search_space/allocate.py, prune.py).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from search_space.importance import UnitScores


class SlimViT(nn.Module):
    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit
        dev = vit.cls_token.device
        self.zeta_attn = nn.ParameterList(
            nn.Parameter(torch.ones(b.attn.num_heads * b.attn.head_dim, device=dev))
            for b in vit.blocks)
        self.zeta_mlp = nn.ParameterList(
            nn.Parameter(torch.ones(b.mlp.fc2.in_features, device=dev)) for b in vit.blocks)
        self._hooks = []
        for i, b in enumerate(vit.blocks):
            self._hooks.append(b.attn.qkv.register_forward_hook(self._qkv_hook(i)))
            self._hooks.append(b.mlp.fc2.register_forward_pre_hook(self._fc2_hook(i)))

    def _qkv_hook(self, i: int):
        def hook(module, args, out):  # out: (B, N, 3*H*d)
            return out * self.zeta_attn[i].repeat(3)
        return hook

    def _fc2_hook(self, i: int):
        def hook(module, args):  # args[0]: (B, N, h) after GELU
            return (args[0] * self.zeta_mlp[i],)
        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def zetas(self) -> list[nn.Parameter]:
        return [*self.zeta_attn, *self.zeta_mlp]

    def l1(self, w_attn: float, w_mlp: float) -> torch.Tensor:
        """w1 * sum |zeta_attn| + w2 * sum |zeta_mlp| (the sparsity term of the search loss)."""
        return (w_attn * sum(z.abs().sum() for z in self.zeta_attn)
                + w_mlp * sum(z.abs().sum() for z in self.zeta_mlp))

    def scores(self) -> UnitScores:
        """|zeta| per unit; embedding channels are not searched by ViT-Slim (all kept)."""
        attn = [z.detach().abs().reshape(b.attn.num_heads, b.attn.head_dim)
                for z, b in zip(self.zeta_attn, self.vit.blocks, strict=True)]
        return UnitScores(torch.ones(self.vit.embed_dim, device=self.vit.cls_token.device),
                          attn, [z.detach().abs() for z in self.zeta_mlp])

    @torch.no_grad()
    def fold(self) -> VisionTransformer:
        """Multiply zeta into the weights and drop the hooks: a plain ViT, same function."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for b, za, zm in zip(self.vit.blocks, self.zeta_attn, self.zeta_mlp, strict=True):
            z3 = za.repeat(3)
            b.attn.qkv.weight.mul_(z3[:, None])
            if b.attn.qkv.bias is not None:
                b.attn.qkv.bias.mul_(z3)
            b.mlp.fc2.weight.mul_(zm[None, :])
        return self.vit
