"""ViT-Slim (CVPR 2022) as a method of the shared search loop: a two-stage baseline.

Stage 1 (the search phase): weights and multipliers zeta train together for `search.epochs`
with CE + w1 sum|zeta_attn| + w2 sum|zeta_mlp| (+ w3 sum|tanh zeta_tok| with
`search.vit_slim.tokens=true`; weights `search.vit_slim.l1_attn`, `l1_mlp`, `l1_tok`;
one AdamW, lr `search.lr`, under the shared weight-decay policy: zeta, norms and biases not
decayed). Stage 2 (`extract`): zeta is folded into
the weights (the kept units keep their learned scale: the pruned model computes what the
searched one did, minus the pruned units), then one global threshold per unit type, at the
quantile that meets the MACs budget (counted by the shared analytic counter, not a parameter
fraction as published), picks the units; the subnet is physically sliced (the original only
masked) and exported like OFB's, then fine-tuned by the same fine-tune loop.

Why stage 2 gives every kept head of a block the same number of dims (the published mask keeps
an arbitrary (head, dim) set): zeta_attn scales q, k and v of a unit together, so a head's own
kept dims would need its own q/k width, and the exported attention has one q/k width per block
(timm's Attention, and METHODS.md section 7's settled arch.json, whose `v_dims` gives each head
its own value width only). As METHODS.md section 2 settles, a block keeps the heads with any unit
above the threshold, each keeping its own strongest dims (which dims is per head; only their
count is shared: the mean count above the threshold), and the search's note reports the choice:
the |zeta_attn| mass the export keeps over what the published mask would keep with as many
attention units. With token
multipliers, the token threshold shares the quantile, token keep-sets are monotone over depth,
and the subnet drops the pruned positions for good (search_space/tokens.py). Off by default:
on small inputs (16 patches here) one position is a coarse unit, and a token-pruned subnet runs
only with this project's hooks (it is no longer a plain timm ViT).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from search_space.arch import BlockArch, ViTArch
from search_space.models import unwrap
from search_space.prune import PrunePlan, apply_plan
from search_space.slim.multipliers import SlimViT
from search_space.two_stage.allocate import allocate_threshold
from search_space.widths import step
from trainers.methods.base import SearchMethod, register_method
from trainers.optim import decay_groups
from trainers.sections import Section


class ViTSlimOptions(Section):
    """`search.vit_slim.*`: the l1 weights of METHODS.md section 2, as effective weights.

    The published command (DeiT-S, 4 GPUs) passes 2e-4, 5e-5 and 1e-4; its `search.py` divides
    them by the world size and DDP averages the gradients, so what acts on zeta is 5e-5,
    1.25e-5 and 2.5e-5. Our loss is not divided by the worker count (DDP averages as there), so
    these effective values are the defaults whatever `scaling.num_workers` is;
    `configs/vit_slim_deit_s_reference.yaml` is the 4-GPU reference command in this form."""

    # ours, not of the published method: recorded with a trial that changes it
    ADDITIONS: ClassVar[dict[str, Any]] = {"width_multiple": 1}

    l1_attn: float = Field(5e-5, ge=0, description="l1 weight on |zeta_attn| (effective)")
    l1_mlp: float = Field(1.25e-5, ge=0, description="l1 weight on |zeta_mlp| (effective)")
    tokens: bool = Field(False, description="also search token positions (monotone over "
                         "depth; the subnet drops pruned positions)")
    l1_tok: float = Field(2.5e-5, ge=0, description="l1 weight on |tanh zeta_tok| (effective)")
    width_multiple: int = Field(1, ge=1, description="ours: stage 2 rounds each block's head "
                                "dim and MLP width to the nearest multiple of this where the "
                                "dense width is one (8: hardware-friendly); 1 = as published")


@register_method("vit_slim")
class ViTSlim(SearchMethod):
    section = "vit_slim"
    Options = ViTSlimOptions

    def wrap(self, dense: nn.Module) -> SlimViT:
        return SlimViT(dense, tokens=self.opts.tokens)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        sv: SlimViT = unwrap(model)
        return decay_groups(sv.named_parameters(), self.cfg.weight_decay, no_decay=sv.zetas())

    def losses(self, model, images, targets, logits, aux, step) -> dict[str, torch.Tensor]:
        o = self.opts
        return {"ce": self.task_loss(logits, targets),
                "l1": unwrap(model).l1(o.l1_attn, o.l1_mlp, o.l1_tok)}

    def finished(self, model: nn.Module) -> bool:
        return False  # searches for search.epochs, as published (50 epochs on ImageNet)

    def finalize(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
        """Stage 2's choice, told to the user (recorded as the search's note)."""
        sv: SlimViT = unwrap(model)
        plan, scores = self._plan(sv), sv.scores()
        kept = sum(float(a[h.to(a.device)].gather(1, d.to(a.device)).sum())
                   for a, h, d in zip(scores.attn, plan.heads, plan.dims, strict=True))
        n = sum(d.numel() for d in plan.dims)
        flat = torch.cat([a.flatten() for a in scores.attn])
        best = float(torch.topk(flat, n).values.sum())
        shape = ", ".join(f"{len(h)}x{d.shape[1]}" for h, d in zip(plan.heads, plan.dims,
                                                                     strict=True))
        return (f"stage 2 kept heads x dims per block {shape}: {kept / best:.1%} of the "
                f"|zeta_attn| the published per-(head, dim) mask keeps with as many units")

    def _plan(self, sv: SlimViT) -> PrunePlan:
        scales = sv.token_scales()
        plan = allocate_threshold(sv.scores(), self.dense_arch, self.target_macs,
                                  None if scales is None else [t.abs() for t in scales],
                                  multiple=self.opts.width_multiple)
        plan.token_scale = scales
        return plan

    def smallest_arch(self) -> ViTArch | None:
        """One head of one dim (a step of `width_multiple`) and one MLP unit per block, the
        embedding whole; None with token multipliers (dropped positions lower the floor
        further, by an amount the search decides)."""
        if self.opts.tokens:
            return None
        a, m = self.dense_arch, self.opts.width_multiple
        return replace(a, blocks=tuple(BlockArch(1, step(b.head_dim, m), step(b.mlp_hidden, m))
                                       for b in a.blocks))

    def extract(self, model: nn.Module) -> tuple[nn.Module, ViTArch]:
        sv: SlimViT = copy.deepcopy(unwrap(model))
        return apply_plan(sv.fold(), self._plan(sv))

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        sv: SlimViT = unwrap(model)
        with torch.no_grad():
            za = torch.cat([z.abs() for z in sv.zeta_attn])
            zm = torch.cat([z.abs() for z in sv.zeta_mlp])
        out = {"target_macs": self.target_macs, "zeta_attn_mean": float(za.mean()),
               "zeta_mlp_mean": float(zm.mean()),
               "zeta_attn_below_0.1": float((za < 0.1).float().mean()),
               "zeta_mlp_below_0.1": float((zm < 0.1).float().mean())}
        if sv.zeta_tok is not None:
            out["tanh_zeta_tok_mean"] = float(torch.cat(sv.token_scales()).abs().mean())
        return out
