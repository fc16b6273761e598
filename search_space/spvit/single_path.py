"""SPViT's searchable modules: a single-path MSA whose 3x3 and 1x1 conv paths share the
attention's value and output projections, and an MLP with per-neuron gates.

Kernel layout (METHODS.md section 4): pi = softmax(P / 0.01) over heads, P (H, 9) one logit per
head and kernel position k = row + 3 col (centre 4);
    K3[o, i, row, col] = sum_h pi[h, k] W_v^h[o, i],   bias b3[o] = sum_k sum_h pi[h, k] b_v^h[o]
    W_out3 = sum_k sum_h pi[h, k] W_o^h  (D x d),       bias proj.bias
the 1x1 path takes the k = 4 slice of each. W_v^h is head h's d value rows of qkv, W_o^h its d
columns of proj. Each conv path: Conv2d(D -> d) -> BN(d) -> ReLU -> Linear(d -> D) on the
S x S grid; the prefix (cls) tokens bypass it: the branch returns its input there, so the cls
stream gets x + LN1(x) in that layer, as published.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn

from search_space.spvit import gates

MIX_TAU = 0.01  # softmax(P / 0.01): the head-to-position mixing, nearly one head per position


def _load_timm_keys(new: nn.Module, old: nn.Module) -> None:
    """Every weight of the timm module into its searchable subclass (which adds its own)."""
    res = new.load_state_dict(old.state_dict(), strict=False)
    if res.unexpected_keys:
        raise ValueError(f"{type(old).__name__} has weights the searchable module lacks: "
                         f"{res.unexpected_keys}")


class SinglePathMSA(Attention):
    """timm Attention (same state keys) plus theta (3,) gates, mixing logits P (H, 9) and one
    BatchNorm2d(d) per conv path. Train: one gate sample per forward; eval: thresholds."""

    @classmethod
    def from_attention(cls, attn: Attention, num_prefix_tokens: int, grid: int
                       ) -> SinglePathMSA:
        H, d = attn.num_heads, attn.head_dim
        dev = attn.qkv.weight.device
        # built on the CPU, then moved: factories on an accelerator stand-in (tests) must not
        # make data-less tensors (BatchNorm's num_batches_tracked is a torch.tensor(0))
        new = cls(attn.qkv.in_features, H, attn_head_dim=d, qkv_bias=attn.qkv.bias is not None)
        new.fused_attn = attn.fused_attn
        new.num_prefix_tokens, new.grid = num_prefix_tokens, grid
        new.theta = nn.Parameter(torch.full((3,), gates.THETA_INIT))
        new.P = nn.Parameter(torch.ones(H, 9))
        new.bn3, new.bn1 = nn.BatchNorm2d(d), nn.BatchNorm2d(d)
        _load_timm_keys(new.to(dev), attn)
        return new

    # --- shared weights ------------------------------------------------------------------------
    def conv_weights(self, kernel: int) -> tuple[torch.Tensor, ...]:
        """(conv weight (d, D, k, k), conv bias (d,), output weight (D, d)) of the 3x3 or 1x1
        path, built from W_v, b_v, W_o and P."""
        H, d, D = self.num_heads, self.head_dim, self.qkv.in_features
        A = H * d
        pi = F.softmax(self.P / MIX_TAU, dim=0)  # (H, 9)
        w_v = self.qkv.weight[2 * A:].view(H, d, D)  # (H, d, D)
        b_v = (self.qkv.bias[2 * A:].view(H, d) if self.qkv.bias is not None
               else w_v.new_zeros(H, d))
        w_o = self.proj.weight.view(D, H, d).permute(1, 0, 2)  # (H, D, d)
        if kernel == 1:
            p = pi[:, 4]  # (H,)
            k = torch.einsum("h,hoi->oi", p, w_v)[:, :, None, None]  # (d, D, 1, 1)
            return k, p @ b_v, torch.einsum("h,hDd->Dd", p, w_o)
        mixed = torch.einsum("hk,hoi->koi", pi, w_v)  # (9, d, D), k = row + 3 col
        k3 = mixed.view(3, 3, d, D).permute(2, 3, 1, 0)  # [o, i, row, col]
        return k3, torch.einsum("hk,ho->o", pi, b_v), torch.einsum("hk,hDd->Dd", pi, w_o)

    def conv_path(self, x: torch.Tensor, kernel: int) -> torch.Tensor:
        """x (B, P + N, D) -> (B, P + N, D): the conv path on the grid, prefix passed through."""
        P, S = self.num_prefix_tokens, self.grid
        w, b, w_out = self.conv_weights(kernel)
        g = x[:, P:].transpose(1, 2).unflatten(2, (S, S))  # (B, D, S, S)
        bn = self.bn3 if kernel == 3 else self.bn1
        y = F.relu(bn(F.conv2d(g, w, b, padding=(kernel - 1) // 2)))  # (B, d, S, S)
        y = F.linear(y.flatten(2).transpose(1, 2), w_out, self.proj.bias)  # (B, N, D)
        return torch.cat([x[:, :P], y], dim=1)

    # --- forward ---------------------------------------------------------------------------------
    def gates(self) -> torch.Tensor:
        """(3,) nested gates g0 (1x1), g1 (3x3), g2 (MSA) for this forward."""
        b = gates.sample(self.theta) if self.training else gates.hard(self.theta)
        return gates.nested(b)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        w = gates.path_weights(self.gates())  # (MSA, 3x3, 1x1), all computed as published
        return (w[0] * super().forward(x, attn_mask, is_causal)
                + w[1] * self.conv_path(x, 3) + w[2] * self.conv_path(x, 1))


class GatedMlp(Mlp):
    """timm Mlp (same state keys) with a gate theta_f (h,) per hidden neuron: one mask sample per
    forward (shared by batch and tokens) multiplies GELU(fc1 x); eval: 1[theta_f > 0]."""

    @classmethod
    def from_mlp(cls, mlp: Mlp) -> GatedMlp:
        new = cls(mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.out_features,
                  act_layer=type(mlp.act), bias=mlp.fc1.bias is not None)
        new.theta = nn.Parameter(torch.full((mlp.fc1.out_features,), gates.THETA_INIT))
        _load_timm_keys(new.to(mlp.fc1.weight.device), mlp)
        return new

    def mask(self) -> torch.Tensor:
        return gates.sample(self.theta) if self.training else gates.hard(self.theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x)) * self.mask().to(x.dtype)  # (B, T, h)
        return self.drop2(self.fc2(self.norm(self.drop1(x))))
