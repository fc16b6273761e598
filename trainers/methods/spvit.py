"""SPViT, Pruning Self-attentions into Convolutional Layers in Single Path (TPAMI 2024): each
MSA may become a 3x3 conv, a 1x1 conv or nothing, with kernels built from its own value and
output projections; MLP neurons are gated too (METHODS.md section 4).

Loss: CE + w ((F - F_target) / F_dense)^2, F the MACs of the thresholded gates with the
surrogate gradient (search_space/spvit/supernet.py). The published loss is
lambda (T - F / 1e9)^2 in GMACs, which vanishes on small models; on ratios the same pull is
w = lambda F_dense_G^2: DeiT-T 20 x 1.251^2 = 31.3, DeiT-S 3.0 x 4.587^2 = 63.1, DeiT-B
0.06-0.08 x 17.5^2 = 18.4-24.5. `complexity_weight` is w, default 31.3 (DeiT-T's, the
published setting of the size nearest the models searched here), and one setting serves every
model size. The target is `search.budget` / `target_gmacs` like every other method's.

Optimisers as published: the weights at a constant lr during the search (the shared warm-up,
then no decay: min_lr = lr), the thresholds theta in their own AdamW group at `arc_lr`
without weight decay, no gradient clipping. Decision: the mixing logits P follow the shared
weight-decay policy (search logits: not decayed; published: decayed with the weights).
Extraction is automatic (METHODS.md 6c): mixer kinds and kept neurons from the thresholds, the
conv paths folded from the searched weights (search_space/spvit/extract.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from search_space.arch import BlockArch, ViTArch
from search_space.cost import cost_of, count_macs, count_params
from search_space.models import unwrap
from search_space.spvit.extract import extract_subnet, rounded_neurons
from search_space.spvit.supernet import SPViTSearch
from trainers.methods.base import SearchMethod, register_method
from trainers.optim import decay_groups
from trainers.sections import Section


class SPViTOptions(Section):
    """`search.spvit.*` (SPViT_DeiT/main_pruning.py, config/*.json).

    `arc_lr` other than 1e-3 is recorded with the trial: Adam moves a threshold by at most about
    arc_lr per step, and theta starts at 1.5, so at 1e-3 no gate can flip in fewer than 1,500
    steps (published searches run 25k+ steps; a 3-epoch search here has ~1,300). Short searches
    scale it (configs/compare_methods.yaml: 0.01), and the report names that variant."""

    ADDITIONS: ClassVar[dict[str, Any]] = {"arc_lr": 1e-3, "width_multiple": 1}

    arc_lr: float = Field(1e-3, gt=0, description="AdamW lr of the gate thresholds theta "
                          "(published: 1e-3 DeiT-T/-B, 5e-4 DeiT-S)")
    complexity_weight: float = Field(31.3, ge=0, description="w in w ((F - target) / F_dense)^2"
                                     "; = the published lambda x dense GMACs^2 (DeiT-T: 31.3)")
    width_multiple: int = Field(1, ge=1, description="ours: the export rounds each block's "
                                "gated-on MLP neurons to the nearest multiple of this (then down "
                                "where it would cost more MACs than the budget); 1 = as published")


@register_method("spvit")
class SPViT(SearchMethod):
    section = "spvit"
    Options = SPViTOptions

    def wrap(self, dense: nn.Module) -> SPViTSearch:
        return SPViTSearch(dense)

    def min_lr(self) -> float:
        return self.cfg.lr  # constant during the search, as published

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        sn: SPViTSearch = unwrap(model)
        thetas = sn.thetas()
        ids = {id(p) for p in thetas}
        weights = [(n, p) for n, p in sn.named_parameters() if id(p) not in ids]
        return [*decay_groups(weights, self.cfg.weight_decay, no_decay=[m.P for m in sn.msas()]),
                {"params": thetas, "lr": self.opts.arc_lr, "weight_decay": 0.0,
                 "name": "theta"}]

    def losses(self, model, images, targets, logits, aux, step) -> dict[str, torch.Tensor]:
        sn: SPViTSearch = unwrap(model)
        rel = (sn.complexity() - self.target_macs) / self.dense_macs
        return {"ce": self.task_loss(logits, targets),
                "complexity": self.opts.complexity_weight * rel**2}

    def finished(self, model: nn.Module) -> bool:
        return False  # searches search.epochs (published: at most 21, architectures from 10)

    def extract(self, model: nn.Module):
        sn: SPViTSearch = unwrap(model)
        if self.opts.width_multiple == 1:
            return extract_subnet(sn)
        limit = max(self.target_macs, count_macs(sn.current_arch()))
        return extract_subnet(sn, rounded_neurons(sn, self.opts.width_multiple, limit))

    def smallest_arch(self) -> ViTArch:
        """Every mixer off and every neuron gated off: stem and head only."""
        a = self.dense_arch
        return replace(a, blocks=tuple(BlockArch(0, 0, 0, mixer="none") for _ in a.blocks))

    def finalize(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
        m = self.metrics(model)
        return (f"mixers per block {m['mixers']}; MLP neurons kept {m['neurons_kept']}; "
                f"{m['current_macs'] / self.dense_macs:.1%} of the dense MACs")

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        sn: SPViTSearch = unwrap(model)
        arch = sn.current_arch()
        kinds = [b.mixer for b in arch.blocks]
        with torch.no_grad():
            t_attn = float(torch.stack([m.theta for m in sn.msas()]).mean())
            t_mlp = float(torch.cat([b.mlp.theta for b in sn.vit.blocks]).mean())
        return {"target_macs": self.target_macs, "current_macs": cost_of(arch).macs,
                "mixers": ",".join(kinds),
                **{f"mixers_{k}": kinds.count(k) for k in ("attn", "conv3", "conv1", "none")},
                "neurons_kept": sum(b.mlp_hidden for b in arch.blocks),
                "params_fraction": count_params(arch) / count_params(self.dense_arch),
                "theta_attn_mean": t_attn, "theta_mlp_mean": t_mlp}
