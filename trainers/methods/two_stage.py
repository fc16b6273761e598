"""The classic two-stage pruner: importance first (a fixed criterion), then sparsity.

Stage 1 scores every unit of the dense model: `two_stage_taylor` accumulates |w * grad| over
`search.two_stage.score_batches` batches (weights are not updated: the optimizer runs at lr 0),
and `two_stage_magnitude` takes the weights' L2 norm (no batches). Stage 2 allocates the MACs
budget (`search.two_stage.allocation`: global ranking across modules, or uniform per layer),
then the subnet is sliced, exported and fine-tuned exactly like OFB's. The accumulated scores
are the method's state, saved in every checkpoint: a worker restarted after its last epoch
checkpoint extracts from them instead of crashing. With DDP the gradients are averaged over
workers before scoring, so every worker computes the same plan.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from search_space.arch import BlockArch, ViTArch
from search_space.models import unwrap
from search_space.prune import apply_plan
from search_space.two_stage.allocate import allocate_global, allocate_uniform
from search_space.two_stage.importance import elementwise, finalize_scores, group_scores
from search_space.widths import step
from trainers.methods.base import SearchMethod, register_method
from trainers.optim import decay_groups
from trainers.sections import Section


class TwoStageOptions(Section):
    """`search.two_stage.*`, shared by two_stage_taylor and two_stage_magnitude."""

    # ours, not of the classic recipe: recorded with a trial that changes it
    ADDITIONS: ClassVar[dict[str, Any]] = {"width_multiple": 1}

    score_batches: int = Field(32, ge=1, description="batches of |w * grad| (Taylor scoring)")
    allocation: Literal["global", "uniform"] = Field(
        "global", description="global: budget-aware ranking across modules; uniform: the same "
        "fraction in every module")
    prune_embed: bool = Field(True, description="prune embedding channels too")
    width_multiple: int = Field(1, ge=1, description="ours: kept widths (embedding, MLP, head "
                                "dims) in multiples of this where the dense width is one (8: "
                                "hardware-friendly); 1 = unit by unit")


class TwoStage(SearchMethod):
    trains_weights = False  # the search only scores units
    criterion = "taylor"
    section = "two_stage"
    Options = TwoStageOptions
    budget_metrics = ("macs", "latency")  # the allocator counts either (search.budget_metric)

    def __init__(self, cfg: Any, steps_per_epoch: int, dense_arch: ViTArch, seed: int = 0):
        super().__init__(cfg, steps_per_epoch, dense_arch, seed)
        self.batches = 0
        self.acc: dict[str, torch.Tensor] | None = None  # per-weight |w * g|, summed

    def wrap(self, dense: nn.Module) -> nn.Module:
        return dense

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        # stage 1 only measures: lr 0, the weights stay the dense ones
        return decay_groups(unwrap(model).named_parameters(), 0.0, lr=0.0)

    def max_steps(self) -> int | None:
        return self.opts.score_batches  # magnitude needs none: finished() holds from the start

    def finished(self, model: nn.Module) -> bool:
        return self.criterion != "taylor" or self.batches >= self.opts.score_batches

    def after_step(self, model: nn.Module, step: int, optimizer) -> bool:
        if self.criterion == "taylor" and self.batches < self.opts.score_batches:
            e = elementwise(unwrap(model), "taylor")
            self.acc = e if self.acc is None else {k: self.acc[k] + v for k, v in e.items()}
            self.batches += 1
        return False

    def extract(self, model: nn.Module) -> tuple[nn.Module, ViTArch]:
        vit = unwrap(model)
        if self.criterion == "taylor" and self.acc is None:
            raise RuntimeError("two_stage_taylor reached extraction without scores: no batch "
                               "was scored and no checkpointed state was restored")
        per_weight = self.acc if self.criterion == "taylor" else elementwise(vit, "magnitude")
        scores = finalize_scores(group_scores(vit, per_weight), self.criterion)
        allocate = allocate_global if self.opts.allocation == "global" else allocate_uniform
        m = self.opts.width_multiple
        if self.latency is not None:  # a latency budget: the table prices every move
            plan = allocate(scores, self.dense_arch, self.target_latency, self.opts.prune_embed,
                            cost=self.latency.of_arch, multiple=m)
        else:
            plan = allocate(scores, self.dense_arch, self.target_macs, self.opts.prune_embed,
                            multiple=m)
        return apply_plan(vit, plan)

    def smallest_arch(self) -> ViTArch:
        """Every module down to one move's worth of units (the allocators keep at least that)."""
        a, m = self.dense_arch, self.opts.width_multiple
        return replace(a, embed_dim=step(a.embed_dim, m) if self.opts.prune_embed else
                       a.embed_dim, blocks=tuple(BlockArch(1, step(b.head_dim, m),
                                                           step(b.mlp_hidden, m))
                                                 for b in a.blocks))

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        return {"target_macs": self.target_macs, "scored_batches": self.batches}

    def state_dict(self) -> dict[str, Any]:
        acc = None if self.acc is None else {k: v.detach().cpu() for k, v in self.acc.items()}
        return {"batches": self.batches, "acc": acc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = int(state["batches"])
        acc = state["acc"]
        self.acc = None if acc is None else {k: v.to(self.device) for k, v in acc.items()}


@register_method("two_stage_taylor")
class TwoStageTaylor(TwoStage):
    criterion = "taylor"


@register_method("two_stage_magnitude")
class TwoStageMagnitude(TwoStage):
    criterion = "magnitude"
