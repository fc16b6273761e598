"""The classic two-stage pruner: importance first (a fixed criterion), then sparsity.

Stage 1 scores every unit of the dense model: `two_stage_taylor` accumulates |w * grad| over
`search.score_batches` batches (weights are not updated: the optimizer runs at lr 0), and
`two_stage_magnitude` takes the weights' L2 norm (no batches). Stage 2 allocates the MACs budget
(`search.allocation`: global ranking across modules, or uniform per layer), then the subnet is
sliced, exported and fine-tuned exactly like OFB's. Scores are not checkpointed: a worker
restart scores again (stage 1 is the cheap part). With DDP the gradients are averaged over
workers before scoring, so every worker computes the same plan.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from search_space.allocate import allocate_global, allocate_uniform
from search_space.arch import ViTArch
from search_space.cost import count_macs
from search_space.importance import elementwise, finalize_scores, group_scores
from search_space.models import unwrap
from search_space.prune import apply_plan
from trainers.methods.base import SearchMethod, register_method


class TwoStage(SearchMethod):
    criterion = "taylor"

    def __init__(self, cfg: Any, steps_per_epoch: int, dense_arch: ViTArch):
        super().__init__(cfg, steps_per_epoch, dense_arch)
        self.dense_macs = count_macs(dense_arch)
        self.target_macs = (cfg.target_gmacs * 1e9 if cfg.target_gmacs
                            else cfg.budget * self.dense_macs)
        self.batches = 0
        self.acc: dict[str, torch.Tensor] | None = None  # per-weight |w * g|, summed

    def wrap(self, dense: nn.Module) -> nn.Module:
        return dense

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 0.0,
                 "weight_decay": 0.0}]  # stage 1 only measures: weights stay the dense ones

    def max_steps(self) -> int | None:
        return self.cfg.score_batches  # magnitude needs none: finished() holds from the start

    def finished(self, model: nn.Module) -> bool:
        return self.criterion != "taylor" or self.batches >= self.cfg.score_batches

    def after_step(self, model: nn.Module, step: int, optimizer) -> bool:
        if self.criterion == "taylor" and self.batches < self.cfg.score_batches:
            e = elementwise(unwrap(model), "taylor")
            self.acc = e if self.acc is None else {k: self.acc[k] + v for k, v in e.items()}
            self.batches += 1
        return False

    def extract(self, model: nn.Module) -> tuple[nn.Module, ViTArch]:
        vit = unwrap(model)
        per_weight = self.acc if self.criterion == "taylor" else elementwise(vit, "magnitude")
        scores = finalize_scores(group_scores(vit, per_weight), self.criterion)
        if self.cfg.allocation == "global":
            plan = allocate_global(scores, self.dense_arch, self.target_macs,
                                   self.cfg.prune_embed)
        else:
            plan = allocate_uniform(scores, self.dense_arch, self.target_macs,
                                    self.cfg.prune_embed)
        return apply_plan(vit, plan)

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        return {"target_macs": self.target_macs, "scored_batches": self.batches}


@register_method("two_stage_taylor")
class TwoStageTaylor(TwoStage):
    criterion = "taylor"


@register_method("two_stage_magnitude")
class TwoStageMagnitude(TwoStage):
    criterion = "magnitude"
