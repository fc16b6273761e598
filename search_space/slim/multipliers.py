"""ViT-Slim's searchable ViT (CVPR 2022, METHODS.md section 2): learnable l1-regularised
multipliers zeta (init 1) on a plain timm ViT.

- attention: zeta_attn (H*d,) per block scales the q, k and v features of unit (head, dim) alike
  (a forward hook on qkv's output: the same as scaling qkv's rows and bias);
- MLP: zeta_mlp (h,) per block scales the hidden activations after GELU (a pre-hook on fc2);
- tokens (optional, `tokens=True`): zeta_tok (T,) per block, over every position of the dense
  sequence (prefix tokens included); tanh(zeta_tok) scales the inputs of the block's attention
  and MLP (after norm1 / norm2), as published. Init 3 as published (`TOKEN_INIT`; tanh 3 =
  0.995, so the search starts from the dense function; init 1 damped every input to 0.76).

`fold()` multiplies the attention and MLP multipliers into the weights, giving back a plain ViT
computing the same function; token multipliers cannot be folded into weights (they scale
positions, after a LayerNorm): `token_scales()` hands them to the pruner, and the exported
subnet keeps the kept positions' values as `token_scale` buffers (search_space/tokens.py).
ViT-Slim's stage 2 then prunes it (search_space/two_stage/allocate.py, prune.py).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from search_space.two_stage.importance import UnitScores

TOKEN_INIT = 3.0  # zeta_tok's start (`models/layers.py` of the published code)


class SlimViT(nn.Module):
    def __init__(self, vit: VisionTransformer, tokens: bool = False):
        super().__init__()
        self.vit = vit
        dev = vit.cls_token.device if vit.cls_token is not None else vit.pos_embed.device
        self.zeta_attn = nn.ParameterList(
            nn.Parameter(torch.ones(b.attn.num_heads * b.attn.head_dim, device=dev))
            for b in vit.blocks)
        self.zeta_mlp = nn.ParameterList(
            nn.Parameter(torch.ones(b.mlp.fc2.in_features, device=dev)) for b in vit.blocks)
        n_tok = vit.patch_embed.num_patches + vit.num_prefix_tokens
        self.zeta_tok = nn.ParameterList(
            # init 3 as published (tanh 3 = 0.995: the search starts from the dense function)
            nn.Parameter(torch.full((n_tok,), TOKEN_INIT, device=dev)) for _ in vit.blocks) \
            if tokens else None
        self._hooks = []
        for i, b in enumerate(vit.blocks):
            self._hooks.append(b.attn.qkv.register_forward_hook(self._qkv_hook(i)))
            self._hooks.append(b.mlp.fc2.register_forward_pre_hook(self._fc2_hook(i)))
            if tokens:
                self._hooks.append(b.attn.register_forward_pre_hook(self._tok_hook(i)))
                self._hooks.append(b.mlp.register_forward_pre_hook(self._tok_hook(i)))

    def _qkv_hook(self, i: int):
        def hook(module, args, out):  # out: (B, N, 3*H*d)
            return out * self.zeta_attn[i].repeat(3)
        return hook

    def _fc2_hook(self, i: int):
        def hook(module, args):  # args[0]: (B, N, h) after GELU
            return (args[0] * self.zeta_mlp[i],)
        return hook

    def _tok_hook(self, i: int):
        def hook(module, args):  # args[0]: (B, T, D) after norm1 / norm2
            return (args[0] * torch.tanh(self.zeta_tok[i])[:, None], *args[1:])
        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def zetas(self) -> list[nn.Parameter]:
        return [*self.zeta_attn, *self.zeta_mlp, *(self.zeta_tok or [])]

    def l1(self, w_attn: float, w_mlp: float, w_tok: float = 0.0) -> torch.Tensor:
        """w1 sum|zeta_attn| + w2 sum|zeta_mlp| + w3 sum|tanh zeta_tok| (the sparsity terms)."""
        out = (w_attn * sum(z.abs().sum() for z in self.zeta_attn)
               + w_mlp * sum(z.abs().sum() for z in self.zeta_mlp))
        if self.zeta_tok is not None:
            out = out + w_tok * sum(torch.tanh(z).abs().sum() for z in self.zeta_tok)
        return out

    def scores(self) -> UnitScores:
        """|zeta| per unit; embedding channels are not searched by ViT-Slim (all kept)."""
        attn = [z.detach().abs().reshape(b.attn.num_heads, b.attn.head_dim)
                for z, b in zip(self.zeta_attn, self.vit.blocks, strict=True)]
        return UnitScores(torch.ones(self.vit.embed_dim, device=self.zeta_attn[0].device),
                          attn, [z.detach().abs() for z in self.zeta_mlp])

    def token_scales(self) -> list[torch.Tensor] | None:
        """Per block (T,) tanh(zeta_tok): the multipliers; their absolute values are the scores."""
        if self.zeta_tok is None:
            return None
        return [torch.tanh(z.detach()) for z in self.zeta_tok]

    @torch.no_grad()
    def fold(self) -> VisionTransformer:
        """Multiply zeta_attn and zeta_mlp into the weights and drop every hook: a plain ViT
        (the same function when there are no token multipliers)."""
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
