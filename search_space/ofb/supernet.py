"""`SearchableViT`: a timm VisionTransformer turned into OFB's supernet, weights kept.

Attention and MLP modules are replaced by their searchable subclasses; the embedding width (the
residual stream) is searched by `SearchablePatchEmbed`. The wrapper owns the forward so that it
can (a) insert PMIM's mask token into the patch sequence, (b) mask the residual stream, and
(c) return the final-norm patch tokens for PMIM's decoder, all in one pass.

Embedding mask: as published, m_e applies only where tokens enter the network (patch-embed
output, pos-embed, cls and mask token); blocks never mask their outputs. Our option
`mask_branches` (OFB's `embed_mask_on_branches`) also applies it to every residual branch output
(attention proj, MLP fc2), so a masked channel is exactly zero in the stream at every depth.
Every mask is applied to weights, not activations (equal results, and the search step then
costs about what a dense step does). Slicing the embedding is not
exactly output-preserving, because LayerNorm then normalises over the kept channels only
(as published); attention and MLP slices are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from search_space import groups
from search_space.arch import BlockArch, ViTArch
from search_space.cost import attn_macs, mlp_macs, stem_head_macs
from search_space.ofb import bimask
from search_space.ofb.modules import SearchableAttention, SearchableMlp, embed_candidates
from search_space.ofb.searchable import SearchableMixin, VectorUnits, topk_units
from search_space.slicing import along, slice_param_


class SearchablePatchEmbed(VectorUnits, PatchEmbed):
    """Patch embedding whose output width (the whole residual stream) is searched."""

    kind = "embed"
    l1_coef = 1e-4

    @classmethod
    def from_dense(cls, pe: PatchEmbed, multiple: int = 1) -> SearchablePatchEmbed:
        dev = pe.proj.weight.device
        new = cls(img_size=pe.img_size, patch_size=pe.patch_size, in_chans=pe.proj.in_channels,
                  embed_dim=pe.proj.out_channels, bias=pe.proj.bias is not None,
                  flatten=pe.flatten, strict_img_size=pe.strict_img_size, device=dev)
        if not isinstance(pe.norm, nn.Identity):
            raise ValueError("searchable patch embedding does not support a norm layer")
        new.load_state_dict(pe.state_dict())
        D = pe.proj.out_channels
        new._init_widths(embed_candidates(D, multiple), dev)
        return new

    def _slice_units(self, optimizer) -> None:
        (w,) = self._widest()
        if w != self.proj.out_channels:
            self.owner_slice(topk_units(self.S, w), optimizer)

    def resize_(self, widths: tuple[int, ...]) -> None:
        (w,) = widths
        if w != self.proj.out_channels:
            self.owner_slice(torch.arange(w), None)

    owner_slice = None  # set by SearchableViT: slicing the stream touches the whole model


class SearchableViT(nn.Module):
    """OFB supernet around a timm VisionTransformer (class token, learned pos-embed)."""

    def __init__(self, vit: VisionTransformer, width_multiple: int = 1,
                 mask_branches: bool = False, freeze_finished: bool = False):
        """`width_multiple` > 1 keeps only candidate widths (head dims, MLP, embedding) that
        are multiples of it: such subnets realize more of their MACs saving as speed.
        `mask_branches`: the embedding mask on every branch output too (ours; see above).
        `freeze_finished`: a finished module's scale stays fixed (ours; published: it trains)."""
        super().__init__()
        self.mask_branches = mask_branches
        self.freeze_finished = freeze_finished
        _check_supported(vit)
        self.dense_arch = ViTArch.from_timm(vit)
        vit.patch_embed = SearchablePatchEmbed.from_dense(vit.patch_embed, width_multiple)
        for blk in vit.blocks:
            blk.attn = SearchableAttention.from_dense(blk.attn, width_multiple)
            blk.mlp = SearchableMlp.from_dense(blk.mlp, width_multiple)
        self.vit = vit
        D, p, C = vit.embed_dim, self.dense_arch.patch_size, self.dense_arch.in_chans
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        # PMIM decoder: a 1x1 conv D -> p*p*C (written as a Linear on the tokens: the same map,
        # and DDP-friendly gradient strides), then PixelShuffle(p) back to image resolution.
        self.decoder = nn.Linear(D, p * p * C)
        self.shuffle = nn.PixelShuffle(p)
        object.__setattr__(vit.patch_embed, "owner_slice", self._slice_embed)
        for m in self.searchable():
            m.freeze_finished = freeze_finished

    # --- the searchable modules ------------------------------------------------------------
    def searchable(self) -> list[SearchableMixin]:
        return [m for m in self.modules() if isinstance(m, SearchableMixin)]

    def named_searchable(self) -> list[tuple[str, SearchableMixin]]:
        return [(n, m) for n, m in self.named_modules() if isinstance(m, SearchableMixin)]

    def set_schedule(self, lam: float, temperature: float) -> None:
        for m in self.searchable():
            m.lam, m.temperature = lam, temperature

    @property
    def is_finished(self) -> bool:
        return all(m.is_finished for m in self.searchable())

    def arch_params(self) -> list[nn.Parameter]:
        return [m.alpha for m in self.searchable()]

    def importance_params(self) -> list[nn.Parameter]:
        return [m.S for m in self.searchable()]

    def scale_params(self) -> list[nn.Parameter]:
        """The finished modules' per-channel scales (never weight-decayed)."""
        return [m.channel_scale for m in self.searchable()]

    def decoder_params(self) -> list[nn.Parameter]:
        return [self.mask_token, *self.decoder.parameters()]

    # --- one step's terms ----------------------------------------------------------------------
    def step_terms(self) -> dict[SearchableMixin, tuple[torch.Tensor, torch.Tensor]]:
        """(p, sigmoid(S)) of every unfinished module, computed once per step: the forward's
        masks, the MACs loss and the search loss share them (each was computed up to three
        times a step, and a step's cost on small models is its count of small ops)."""
        return {m: (m.probs(), torch.sigmoid(m.S)) for m in self.searchable()
                if not m.is_finished}

    def pop_terms(self) -> dict[SearchableMixin, tuple[torch.Tensor, torch.Tensor]] | None:
        """The terms of the last training forward (once: they hold its graph), else None."""
        terms, self._last_terms = getattr(self, "_last_terms", None), None
        return terms

    def search_loss(self, one_hot_weight: Any = 1.0,
                    terms: dict[SearchableMixin, tuple[torch.Tensor, torch.Tensor]] | None = None
                    ) -> torch.Tensor:
        """sum_m w_m [one_hot_weight * one-hot(p_m) + c_m sum sigmoid(S_m)] over unfinished
        modules (each module's `search_loss`, summed), the one-hot terms batched."""
        terms = self.step_terms() if terms is None else terms
        if not terms:
            return self.mask_token.sum() * 0.0
        mods = list(terms)
        l1 = sum(m.loss_weight * m.l1_coef * sig.sum() for m, (_, sig) in terms.items())
        deciding = [m for m in mods if m.n_live() > 1]
        if not deciding:
            return l1
        keep, seg, n, w = self._one_hot_layout(deciding)
        if all(m.temperature == 1.0 for m in deciding):  # the step's p (published T = 1)
            p = torch.cat([terms[m][0] for m in deciding])  # (sum C_m,)
        else:  # the one-hot loss's own softmax(alpha / T)
            p = torch.cat([m.one_hot_probs() for m in deciding])
        oh = bimask.one_hot_losses(p, keep, seg, n)  # (M,)
        return l1 + (oh * w).sum() * one_hot_weight

    def _one_hot_layout(self, mods: list[SearchableMixin]):
        """Device constants of the batched one-hot loss, rebuilt only when a live set changes
        (an upload then, none per step)."""
        key = tuple((id(m), tuple(m._host_live)) for m in mods)
        cached = getattr(self, "_layout", None)
        if cached is None or cached[0] != key:
            # built from device tensors (fills and reductions): no host -> device copy
            keep = torch.cat([m.live for m in mods])
            seg = torch.cat([m.live.new_full(m.live.shape, i, dtype=torch.long)
                             for i, m in enumerate(mods)])
            n = torch.stack([m.live.sum() for m in mods])
            w = torch.stack([m.alpha.new_full((), m.loss_weight) for m in mods])
            self._layout = cached = (key, (keep, seg, n, w))
        return cached[1]

    # --- costs -------------------------------------------------------------------------------
    def current_arch(self) -> ViTArch:
        """The physical architecture now (the widest survivors)."""
        v = self.vit
        blocks = tuple(BlockArch(b.attn.num_heads, b.attn.head_dim, b.mlp.fc1.out_features)
                       for b in v.blocks)
        return ViTArch(**{**self.dense_arch.to_dict(), "embed_dim": v.patch_embed.proj.out_channels,
                          "blocks": blocks})

    def expected_macs(self, terms: dict[SearchableMixin, tuple[torch.Tensor, torch.Tensor]]
                      | None = None) -> torch.Tensor:
        """F(alpha): analytic MACs at the expected widths (differentiable in alpha); `terms`:
        this step's (`pop_terms`)."""
        terms = terms or {}
        return self.macs_at(lambda m: m.expected_width(terms[m][0] if m in terms else None))

    def expected_latency(self, table: Any, terms: dict[SearchableMixin, tuple[torch.Tensor,
                         torch.Tensor]] | None = None) -> torch.Tensor:
        """Expected latency from a measured table (search_space/latency.py; ms per batch),
        differentiable in alpha as `expected_macs` is: a latency budget's loss."""
        terms = terms or {}
        return self.latency_at(table, lambda m: terms[m][0] if m in terms else m.probs())

    def latency_at(self, table: Any, probs: Callable[[SearchableMixin], torch.Tensor]
                   ) -> torch.Tensor:
        """The table's latency under `probs(module)`, a distribution over the module's
        candidates (p while searching; one-hot for a choice). Attention and MLP take the
        expectation of each candidate's measured latency, not the latency at the expected
        width: heads x dims splits of one width run at different speeds. The embedding enters
        at its expected width."""
        pe = self.vit.patch_embed
        p = probs(pe)
        D = p @ pe.cand_widths.to(p.dtype)
        total = table.stem_head(D)
        for b in self.vit.blocks:
            a, m = b.attn, b.mlp
            pa, pm = probs(a), probs(m)
            total = total + pa @ table.attn_cell(D, a.cand_heads, a.cand_dims).to(pa.dtype)
            total = total + pm @ table.mlp(D, m.cand_widths).to(pm.dtype)
        return total

    def macs_at(self, width: Callable[[SearchableMixin], Any]) -> Any:
        """Analytic MACs with `width(module)` units in each searchable module (attention:
        heads x dims); the counter's formulas, so a choice of candidates costs what its
        exported subnet will."""
        a, T = self.dense_arch, self.dense_arch.num_tokens
        D = width(self.vit.patch_embed)
        total = stem_head_macs(a, D)
        for b in self.vit.blocks:
            total = total + attn_macs(T, D, width(b.attn), 1)
            total = total + mlp_macs(T, D, width(b.mlp))
        return total

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, patch_mask: torch.Tensor | None = None):
        """x: (B, C, H, W) -> logits (B, classes).

        With `patch_mask` ((B, N) bool, True = replaced by the mask token) returns
        (logits, the decoder's tokens (B, N, p*p*C)) for PMIM, all inside one forward
        (DDP-friendly); `to_image` turns those tokens into the reconstructed image.
        """
        terms = self.step_terms()
        for m, t in terms.items():
            m.step = t
        if torch.is_grad_enabled() and self.training:
            self._last_terms = terms
        try:
            return self._forward(x, patch_mask)
        finally:
            for m in terms:
                m.step = None

    def _forward(self, x: torch.Tensor, patch_mask: torch.Tensor | None):
        v = self.vit
        m_e = v.patch_embed.mask()  # (D,): folded into weights, never into activations
        pe = v.patch_embed
        bias = pe.proj.bias * m_e if pe.proj.bias is not None else None
        x = F.conv2d(x, pe.proj.weight * m_e[:, None, None, None], bias,
                     stride=pe.proj.stride)  # (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = (v.cls_token * m_e).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.pos_embed * m_e  # (B, 1+N, D)
        if patch_mask is not None:  # after the pos-embed, as published: no position on them
            w = F.pad(patch_mask, (1, 0)).unsqueeze(-1).to(x.dtype)  # (B, 1+N, 1), cls kept
            x = x * (1 - w) + (self.mask_token * m_e).to(x.dtype) * w
        x = v.norm_pre(v.pos_drop(x))
        for blk in v.blocks:
            blk.attn.stream_mask = blk.mlp.stream_mask = m_e if self.mask_branches else None
        try:
            for blk in v.blocks:
                x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
                x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        finally:
            for blk in v.blocks:
                blk.attn.stream_mask = blk.mlp.stream_mask = None
        x = v.norm(x)
        logits = v.forward_head(x)
        if patch_mask is None:
            return logits
        return logits, self.decoder(x[:, v.num_prefix_tokens:])  # (B, N, p*p*C)

    def to_image(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's tokens as the reconstructed image: (B, N, p*p*C) -> (B, C, H, W)."""
        B, N, _ = z.shape
        g = int(N**0.5)
        return self.shuffle(z.transpose(1, 2).reshape(B, -1, g, g))

    def freeze_decoder(self) -> None:
        for p in self.decoder_params():
            p.requires_grad_(False)

    def load_search_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a checkpointed supernet: shrink every module to its saved live set, then load.

        Physical widths follow from the live candidates (slicing happens with elimination), so
        the `live` buffers in the state dict are all the architecture state there is.
        """
        for name, m in self.named_searchable():
            m.live.copy_(state[f"{name}.live"])
            m._refresh_host()
            m.resize_(m._widest())
        self.load_state_dict(state)
        for m in self.searchable():
            m._set_trainable()
        if self.is_finished:
            self.freeze_decoder()

    # --- slicing the residual stream -------------------------------------------------------
    def _slice_embed(self, keep: torch.Tensor, optimizer) -> None:
        """Keep embedding channels `keep`: their group all over the model (groups.py)."""
        v, pe = self.vit, self.vit.patch_embed
        keep = keep.to(pe.S.device)
        names = [n for n, _ in self.named_parameters()]
        groups.slice_(self, groups.embed_members(names), keep, optimizer)
        slice_param_(pe, "S", along(0, keep), optimizer)
        slice_param_(pe, "channel_scale", along(0, keep), optimizer)
        v.embed_dim = v.num_features = len(keep)


def _check_supported(vit: VisionTransformer) -> None:
    problems = []
    if vit.cls_token is None:
        problems.append("class_token=False")
    if getattr(vit, "num_reg_tokens", 0):
        problems.append("reg_tokens > 0")
    if getattr(vit, "no_embed_class", False):
        problems.append("no_embed_class=True")
    if vit.pos_embed is None:
        problems.append("pos_embed other than 'learn'")
    if getattr(vit, "dynamic_img_size", False):
        problems.append("dynamic_img_size=True")
    if vit.global_pool not in ("token", "avg"):
        problems.append(f"global_pool={vit.global_pool!r}")
    if problems:
        raise ValueError("OFB search supports timm ViTs with a class token, learned pos-embed "
                         "and token/avg pooling; this model has " + ", ".join(problems))
