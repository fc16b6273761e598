"""Searchable attention and MLP: timm's modules plus OFB's bi-mask, keeping the trained weights.

Candidate lists (METHODS.md section 1, with our choice for small head counts):
- attention, joint mode: heads in range(2, H+1, 2) when H >= 4 (as published), else
  range(1, H+1) (the published list is [2] for DeiT-T's H=3); dims per head in
  range(d/4, d+1, max(d/8, 1)). One alpha per (heads, dims) cell. S has shape (H, d); the same
  (H, d) mask scales q, k and v.
- MLP hidden: range(h/4, h+1, h/8). As published (`MAESparseMlp.forward`) the mask multiplies
  fc1's output before GELU: GELU(m (W x + b)) = GELU((m W) x + m b), so a frozen mask folds
  exactly into fc1's rows and bias.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention

from search_space import groups
from search_space.arch import BlockArch, ViTArch
from search_space.ofb import bimask
from search_space.ofb.searchable import SearchableMixin, VectorUnits, linear_candidates, topk_units
from search_space.slicing import along, slice_param_


def head_candidates(H: int) -> list[int]:
    """range(2, H+1, 2) as published for H >= 4; for H < 4 (where it gives [2] or nothing)
    range(1, H+1)."""
    return list(range(2, H + 1, 2)) if H >= 4 else list(range(1, H + 1))


def dim_candidates(d: int, multiple: int = 1) -> list[int]:
    return linear_candidates(d, 0.25, max(d // 8, 1), multiple)


def mlp_candidates(h: int, multiple: int = 1) -> list[int]:
    return linear_candidates(h, 0.25, h // 8, multiple)


def embed_candidates(D: int, multiple: int = 1) -> list[int]:
    return linear_candidates(D, 0.5, min(max(D // 32, 1), 12), multiple)


def smallest_arch(dense: ViTArch, multiple: int = 1) -> ViTArch:
    """Every module at its narrowest candidate: the smallest subnet OFB can reach (its budget
    floor), from the same candidate rules the supernet is built with."""
    blocks = tuple(BlockArch(min(head_candidates(b.num_heads)),
                             min(dim_candidates(b.head_dim, multiple)),
                             min(mlp_candidates(b.mlp_hidden, multiple))) for b in dense.blocks)
    return replace(dense, embed_dim=min(embed_candidates(dense.embed_dim, multiple)),
                   blocks=blocks)


class SearchableAttention(SearchableMixin, Attention):
    kind = "attn"
    l1_coef = 4e-4

    @classmethod
    def from_dense(cls, attn: Attention, multiple: int = 1) -> SearchableAttention:
        for bad in ("gate",):
            if getattr(attn, bad, None) is not None:
                raise ValueError(f"searchable attention does not support timm's {bad!r} option")
        if not isinstance(attn.q_norm, torch.nn.Identity) or not isinstance(
                attn.norm, torch.nn.Identity):
            raise ValueError("searchable attention does not support qk_norm / scale_norm")
        dev = attn.qkv.weight.device
        dim = attn.qkv.in_features
        new = cls(dim, attn.num_heads, attn_head_dim=attn.head_dim, dim_out=attn.proj.out_features,
                  qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None,
                  attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p, device=dev)
        new.load_state_dict(attn.state_dict())
        heads, dims = head_candidates(attn.num_heads), dim_candidates(attn.head_dim, multiple)
        cells = [(h, d) for h in heads for d in dims]
        new.register_buffer("cand_heads", torch.tensor([c[0] for c in cells]).to(dev))
        new.register_buffer("cand_dims", torch.tensor([c[1] for c in cells]).to(dev))
        # the same cells as a grid (row-major: heads, then dims), for the survival products
        new.register_buffer("cand_head_list", torch.tensor(heads).to(dev), persistent=False)
        new.register_buffer("cand_dim_list", torch.tensor(dims).to(dev), persistent=False)
        new._cells, new._heads, new._dims = cells, heads, dims
        new._init_search((attn.num_heads, attn.head_dim), len(cells), dev)
        return new  # self.scale (1/sqrt(dense head dim)) is kept through every slice

    def candidate_widths(self) -> list[int]:
        return [h * d for h, d in self._cells]

    def _widest(self) -> tuple[int, int]:
        cells = self._live_values(self._cells)
        return max(h for h, _ in cells), max(d for _, d in cells)

    def _ranks(self, sig: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # ranks are not differentiated: one detached sort per level
        return bimask.rank_of(sig.detach().sum(-1)), bimask.rank_of(self.S)  # (H,), (H, d)

    def _survival(self, p: torch.Tensor, sig: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # V[h, c] = P(heads > r_h and dims > r_c) = sum_ij P[i, j] [r_h < heads_i] [r_c < dims_j]
        # with the cells a grid of head x dim candidates: two small products, no einsum
        rh, rc = self._ranks(sig)
        P = p.view(len(self._heads), len(self._dims))  # (nH, nD)
        keep_h = (rh[:, None] < self.cand_head_list).to(p.dtype)  # (H, nH)
        keep_d = (rc[..., None] < self.cand_dim_list).to(p.dtype)  # (H, d, nD)
        V = (keep_d * (keep_h @ P)[:, None, :]).sum(-1)  # (H, d)
        wh, wd = self._widest()
        if (wh, wd) == (self.num_heads, self.head_dim):
            return V, None
        return V, (rh[:, None] < wh) & (rc < wd)

    def expected_width(self, p: torch.Tensor | None = None) -> torch.Tensor:
        """E[heads * dims]: the expected q/k/v width, for the MACs loss."""
        if self.is_finished:
            return self.S.new_full((), float(self.attn_dim)).detach()  # a fill: no host copy
        p = self.probs() if p is None else p
        return p @ (self.cand_heads * self.cand_dims).to(self.S.dtype)

    def _slice_units(self, optimizer) -> None:
        wh, wd = self._widest()
        H, d = self.num_heads, self.head_dim
        if (wh, wd) == (H, d):
            return
        heads = topk_units(torch.sigmoid(self.S).sum(-1), wh)  # (wh,)
        chans = torch.stack([topk_units(self.S[h], wd) for h in heads.tolist()])  # (wh, wd)
        flat = (heads[:, None] * d + chans).reshape(-1)  # indices into H*d
        groups.slice_(self, groups.attn_members("", H * d, self.qkv.bias is not None), flat,
                      optimizer)
        def cut(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1).index_select(0, flat.to(t.device)).reshape(wh, wd).contiguous()

        slice_param_(self, "S", cut, optimizer)
        slice_param_(self, "channel_scale", cut, optimizer)
        self.num_heads, self.head_dim, self.attn_dim = wh, wd, wh * wd

    def resize_(self, widths: tuple[int, ...]) -> None:
        wh, wd = widths
        if (wh, wd) == (self.num_heads, self.head_dim):
            return
        keep = (torch.arange(wh)[:, None] * self.head_dim + torch.arange(wd)).reshape(-1)
        groups.slice_(self, groups.attn_members("", self.attn_dim, self.qkv.bias is not None),
                      keep)
        for name in ("S", "channel_scale"):
            slice_param_(self, name, lambda t: t.reshape(-1)[keep.to(t.device)]
                         .reshape(wh, wd).contiguous())
        self.num_heads, self.head_dim, self.attn_dim = wh, wd, wh * wd

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        # Masks scale weights, not activations: (W x + b) * m == (m W) x + m b, and a weight
        # has far fewer entries than B*N activations, so the search step costs ~ a dense step.
        m = self.mask().reshape(-1)  # (H*d,): the same mask on q, k and v
        row = torch.cat([m, m, m])[:, None]  # (3*H*d, 1)
        bias = self.qkv.bias * row[:, 0] if self.qkv.bias is not None else None
        qkv = F.linear(x, self.qkv.weight * row, bias)
        qkv = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, d)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)  # (B, N, H*d)
        return self.proj_drop(_linear_out(self.proj, x, self.stream_mask))


def _linear_out(lin: torch.nn.Linear, x: torch.Tensor, out_mask: torch.Tensor | None,
                in_mask: torch.Tensor | None = None) -> torch.Tensor:
    """lin(x * in_mask) * out_mask, with both masks folded into the weight and bias."""
    w, b = lin.weight, lin.bias
    if in_mask is not None:
        w = w * in_mask[None, :]
    if out_mask is not None:
        w = w * out_mask[:, None]
        b = b * out_mask if b is not None else None
    return F.linear(x, w, b)


class SearchableMlp(VectorUnits, Mlp):
    kind = "mlp"
    l1_coef = 1e-4

    @classmethod
    def from_dense(cls, mlp: Mlp, multiple: int = 1) -> SearchableMlp:
        if not isinstance(mlp.norm, torch.nn.Identity):
            raise ValueError("searchable MLP does not support timm's norm-in-MLP option")
        dev = mlp.fc1.weight.device
        new = cls(mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.out_features,
                  act_layer=type(mlp.act), bias=mlp.fc1.bias is not None, drop=mlp.drop1.p,
                  device=dev)
        new.load_state_dict(mlp.state_dict())
        h = mlp.fc1.out_features
        new._init_widths(mlp_candidates(h, multiple), dev)
        return new

    def _slice_units(self, optimizer) -> None:
        (w,) = self._widest()
        if w == self.fc1.out_features:
            return
        keep = topk_units(self.S, w)
        groups.slice_(self, groups.mlp_members("", self.fc1.bias is not None), keep, optimizer)
        slice_param_(self, "S", along(0, keep), optimizer)
        slice_param_(self, "channel_scale", along(0, keep), optimizer)

    def resize_(self, widths: tuple[int, ...]) -> None:
        (w,) = widths
        if w != self.fc1.out_features:
            keep = torch.arange(w)
            groups.slice_(self, groups.mlp_members("", self.fc1.bias is not None), keep)
            slice_param_(self, "S", along(0, keep))
            slice_param_(self, "channel_scale", along(0, keep))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(_linear_out(self.fc1, x, self.mask())))  # (B, N, h)
        return self.drop2(_linear_out(self.fc2, x, self.stream_mask))
