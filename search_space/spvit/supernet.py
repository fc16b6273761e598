"""`SPViTSearch`: a timm ViT whose attentions are single-path MSA / 3x3 / 1x1 / off modules and
whose MLPs have per-neuron gates, the weights kept in place (state keys stay timm's, plus
`attn.theta`, `attn.P`, `attn.bn3`, `attn.bn1`, `mlp.theta`).

Complexity (METHODS.md section 4, project form): F from the thresholded gates through the
shared counter's formulas, F = stem + head + sum_l (attn_l + mlp_l) with
    attn_l = ghat0 c1 + ghat1 (c3 - c1) + ghat2 (c_msa - c3),  ghat = cumprod ST(theta_a)
    mlp_l = 2 T D sum_j ST(theta_f_j)
(c1, c3, c_msa the counter's MACs of a conv1 / conv3 mixer with d channels and of the dense
attention over T tokens), so F at the hard gates is the exported subnet's counted MACs.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from search_space.arch import BlockArch, ViTArch
from search_space.cost import block_macs, count_macs, mlp_macs, stem_head_macs
from search_space.spvit import gates
from search_space.spvit.single_path import GatedMlp, SinglePathMSA

KINDS = ("none", "conv1", "conv3", "attn")  # by the number of nested gates on


class SPViTSearch(nn.Module):
    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit
        self.dense_arch = a = ViTArch.from_timm(vit)
        if any(b.mixer != "attn" or b.v_dims is not None for b in a.blocks):
            raise ValueError(f"SPViT searches a dense ViT with attention blocks; got {a.blocks}")
        if a.tokens is not None:
            raise ValueError("SPViT's conv paths need the whole patch grid: no token pruning")
        grid = a.img_size // a.patch_size
        for blk in vit.blocks:
            blk.attn = SinglePathMSA.from_attention(blk.attn, a.num_prefix_tokens, grid)
            blk.mlp = GatedMlp.from_mlp(blk.mlp)
        self.dense_macs = count_macs(a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def msas(self) -> list[SinglePathMSA]:
        return [blk.attn for blk in self.vit.blocks]

    def thetas(self) -> list[nn.Parameter]:
        """The gate thresholds (their own optimizer group, no weight decay)."""
        return [p for blk in self.vit.blocks for p in (blk.attn.theta, blk.mlp.theta)]

    # --- complexity ------------------------------------------------------------------------------
    def path_macs(self, i: int) -> tuple[int, int, int]:
        """(c1, c3, c_msa) of block i: MACs of its mixer as conv1, conv3 and attention."""
        a, b = self.dense_arch, self.dense_arch.blocks[i]
        T, N, D, d = a.num_tokens, a.num_patches, a.embed_dim, b.head_dim
        mix = [block_macs(T, D, BlockArch(0, 0, 0, mixer=k, conv_dim=d), N)
               for k in ("conv1", "conv3")]
        return mix[0], mix[1], block_macs(T, D, BlockArch(b.num_heads, d, 0), N)

    def complexity(self) -> torch.Tensor:
        """F (MACs, a 0-d tensor) from the thresholds with the surrogate gradient."""
        a = self.dense_arch
        total = torch.zeros((), device=self.vit.blocks[0].attn.theta.device)
        total = total + stem_head_macs(a)
        for i, blk in enumerate(self.vit.blocks):
            c1, c3, cm = self.path_macs(i)
            g = torch.cumprod(gates.complexity_st(blk.attn.theta), 0)
            total = total + g[0] * c1 + g[1] * (c3 - c1) + g[2] * (cm - c3)
            total = total + mlp_macs(a.num_tokens, a.embed_dim,
                                     gates.complexity_st(blk.mlp.theta).sum())
        return total

    # --- decisions ------------------------------------------------------------------------------
    def kinds(self) -> list[str]:
        """Each block's mixer at the thresholds: attn, conv3, conv1 or none."""
        out = []
        for m in self.msas():
            g = torch.cumprod(gates.hard(m.theta.detach()), 0)
            out.append(KINDS[int(g.sum().item())])
        return out

    def kept_neurons(self) -> list[torch.Tensor]:
        return [(blk.mlp.theta.detach() > 0).nonzero().flatten().cpu()
                for blk in self.vit.blocks]

    def current_arch(self, kept_neurons: list[torch.Tensor] | None = None) -> ViTArch:
        """The architecture at the thresholds (`kept_neurons`: another choice of MLP units)."""
        a = self.dense_arch
        kept_neurons = self.kept_neurons() if kept_neurons is None else kept_neurons
        blocks = []
        for kind, b, kept in zip(self.kinds(), a.blocks, kept_neurons, strict=True):
            heads = (b.num_heads, b.head_dim) if kind == "attn" else (0, 0)
            blocks.append(BlockArch(*heads, len(kept), mixer=kind,
                                    conv_dim=b.head_dim if kind.startswith("conv") else 0))
        return ViTArch(**{**a.to_dict(), "blocks": tuple(blocks)})
