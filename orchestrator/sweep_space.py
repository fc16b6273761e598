"""The `sweep` section: a YAML search space of hyperparameters -> Optuna distributions.

Keys are dotted config paths (`search.ofb.temperature`, `search.budget`, ...); values name a
distribution::

    search.ofb.temperature: {type: loguniform, low: 0.5, high: 2.0}
    search.ofb.mask_ratio:  {type: uniform, low: 0.1, high: 0.4}
    search.budget:      {type: choice, values: [0.3, 0.5, 0.7]}
    search.ofb.eliminations_per_epoch: {type: randint, low: 2, high: 5}

Only the search and fine-tune phases may be swept: every trial starts from the one dense model
the sweep pretrains (or finds cached), so `data.*`, `model.*` and `pretrain.*` are refused.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from trainers.config import _Section

SWEEPABLE = ("search.", "finetune.", "seed")


class Distribution(_Section):
    type: Literal["uniform", "loguniform", "choice", "randint", "quniform"]
    low: float | None = None
    high: float | None = None
    q: float | None = Field(None, gt=0)
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> Distribution:
        if self.type == "choice":
            if not self.values:
                raise ValueError("a 'choice' distribution needs a non-empty 'values' list")
            return self
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type!r} distribution needs low < high, got "
                             f"low={self.low}, high={self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"a 'loguniform' distribution needs low > 0, got low={self.low}")
        if self.type == "quniform" and self.q is None:
            raise ValueError("a 'quniform' distribution needs a step 'q'")
        return self


class Objective(_Section):
    metric: Literal["top1", "macs", "params", "top1_before_finetune", "search_device_hours"]
    mode: Literal["max", "min"]


class SweepConfig(_Section):
    """A Ray Tune sweep of OFB searches, sampled by Optuna."""

    num_samples: int = Field(4, ge=1)
    space: dict[str, Distribution] = Field(default_factory=dict)
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric="top1", mode="max"),
                                 Objective(metric="macs", mode="min")],
        description="two or more: multi-objective (a Pareto front); one: single-objective")
    max_macs: float | None = Field(None, gt=0, description="single-objective only: trials "
                                   "above this many MACs count as infeasible")
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: what fits")
    trial_max_failures: int = Field(1, ge=0, description="Tune retries of a failed trial")
    scheduler: Literal["none", "asha"] = Field(
        "none", description="asha: stop trials whose supernet val top-1 lags, per search epoch")
    asha_grace_epochs: int = Field(1, ge=1)
    asha_reduction_factor: int = Field(2, ge=2)
    seed: int = 0

    @model_validator(mode="after")
    def _keys(self) -> SweepConfig:
        for key in self.space:
            if not key.startswith(SWEEPABLE):
                raise ValueError(f"sweep.space key {key!r} cannot be swept: trials share one "
                                 f"dense model; allowed: keys under {list(SWEEPABLE)}")
        for point in self.points_to_evaluate:
            extra = set(point) - set(self.space)
            if extra:
                raise ValueError(f"sweep.points_to_evaluate names {sorted(extra)}, which are "
                                 f"not in sweep.space {sorted(self.space)}")
        if len(self.objectives) < 1:
            raise ValueError("sweep.objectives needs at least one objective")
        if self.max_macs is not None and (len(self.objectives) != 1
                                          or self.objectives[0].metric != "top1"):
            raise ValueError("sweep.max_macs goes with one objective, top1 (max); with several "
                             "objectives the Pareto front already trades top-1 against MACs")
        return self


def to_optuna(space: dict[str, Distribution]) -> dict[str, Any]:
    """Optuna distributions for OptunaSearch (the one place the YAML space is converted)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for key, d in space.items():
        if d.type == "choice":
            out[key] = CategoricalDistribution(d.values)
        elif d.type == "uniform":
            out[key] = FloatDistribution(d.low, d.high)
        elif d.type == "loguniform":
            out[key] = FloatDistribution(d.low, d.high, log=True)
        elif d.type == "quniform":
            out[key] = FloatDistribution(d.low, d.high, step=d.q)
        else:  # randint: [low, high), as in Tune
            out[key] = IntDistribution(int(d.low), int(d.high) - 1)
    return out
