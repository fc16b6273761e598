"""The record of one finished trial: one type for Tune, results.parquet, MLflow and the report.

Every consumer reads the same fields, so a column can neither be renamed in one place only nor
mean something else in another. `top1` is always the measured test top-1 after fine-tune;
`feasible` says whether the subnet met `sweep.max_macs`. Ranking puts every feasible trial
first (`rank_key`); only the search algorithm, which needs one number, gets `objective_top1`
(top-1 minus 1 when infeasible), and it is never stored as top-1.

Pure data: no Ray, MLflow or pyarrow here, so results, tracking and the report all import it
and none of them imports another for it.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

OBJECTIVE_TOP1 = "objective_top1"  # the search algorithm's metric when sweep.max_macs is set
# numeric fields logged as MLflow metrics of a trial's run (the rest go to tags)
MLFLOW_METRICS = ("top1", "top1_before_finetune", "macs", "params", "target_macs", "dense_macs",
                  "search_device_hours", "finetune_device_hours", "trial_wall_s",
                  "trial_overhead_s")


def budget_label(target_macs: float, dense_macs: float) -> str:
    """`0.5 x dense` -> "50pct": a registry-alias-safe name for a MACs budget."""
    return f"{round(100 * target_macs / dense_macs)}pct"


@dataclass(kw_only=True)
class TrialRecord:
    """What one finished trial (search -> fine-tune -> evaluation) produced.

    The field order is the column order of results.parquet; `hparams` (the trial's swept
    values, by dotted key) become one column each after them."""

    trial_id: str = ""
    method: str = ""
    target_macs: float | None = None
    macs: int | None = None
    params: int | None = None
    dense_macs: int | None = None
    top1: float | None = None  # test top-1 after fine-tune, as measured
    feasible: bool = True  # macs <= sweep.max_macs (always true without the constraint)
    top1_before_finetune: float | None = None
    search_device_hours: float | None = None
    finetune_device_hours: float | None = None
    subnet_path: str | None = None
    mlflow_run_id: str | None = None
    device_kind: str | None = None  # "gpu" or "cpu_core": the unit of the device-hours
    node_id: str | None = None
    search_note: str | None = None
    trial_wall_s: float | None = None
    trial_overhead_s: float | None = None
    trial_dir: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)

    # -- views ------------------------------------------------------------------------------
    @property
    def budget(self) -> str:
        return budget_label(self.target_macs, self.dense_macs)

    @property
    def objective_top1(self) -> float:
        """The single number Tune/Optuna maximise under sweep.max_macs: top-1 in [0, 1] when
        feasible, shifted to [-1, 0] when not, so any feasible trial beats any infeasible one."""
        return self.top1 if self.feasible else self.top1 - 1.0

    def row(self) -> dict[str, Any]:
        """A flat dict: the fields, then the swept values (a results.parquet row)."""
        out = asdict(self)
        hparams = out.pop("hparams")
        return {**out, **hparams}

    def tune_report(self) -> dict[str, Any]:
        """The trial driver's final `tune.report`: the fields Tune may rank by, the search
        algorithm's metric, and `phase` marking the report final. Tune adds the trial id."""
        out = {k: v for k, v in self.row().items()
               if k in SCALAR_FIELDS and k not in ("trial_id", "mlflow_run_id")}
        return {"phase": "done", **out, OBJECTIVE_TOP1: self.objective_top1}

    def mlflow_metrics(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in MLFLOW_METRICS if getattr(self, k) is not None}

    def mlflow_tags(self) -> dict[str, str]:
        tags = {"budget": self.budget, "method": self.method, "status": "finished",
                "feasible": str(self.feasible).lower(), "device_kind": self.device_kind or "",
                "node_id": self.node_id or ""}
        if self.search_note:
            tags["search_note"] = str(self.search_note)[:5000]
        return tags

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def from_row(cls, row: Mapping[str, Any], hparam_keys: Iterable[str] | None = None
                 ) -> TrialRecord:
        """A record from a flat row (a Tune result, a parquet row, a dict of a test).

        Args:
            row: field values by name, plus swept values by dotted key.
            hparam_keys: which other keys are swept values; None: every key that is not a
                field (a parquet row), empty: none (a Tune result, which holds Tune's own keys).
        """
        known = {k: row[k] for k in SCALAR_FIELDS if k in row}
        extra = (k for k in row if k not in SCALAR_FIELDS and k != "hparams") \
            if hparam_keys is None else (k for k in hparam_keys if k in row)
        return cls(**known, hparams={**row.get("hparams", {}), **{k: row[k] for k in extra}})

    @classmethod
    def from_tune(cls, result: Mapping[str, Any], config: Mapping[str, Any] | None,
                  space_keys: Iterable[str]) -> TrialRecord:
        """A record from a trial's final Tune result and its config (the swept values)."""
        keys = set(space_keys)
        return cls.from_row({**result, "hparams": {k: v for k, v in (config or {}).items()
                                                   if k in keys}}, hparam_keys=())

    @classmethod
    def from_mlflow(cls, run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str]
                    ) -> TrialRecord:
        """A record read back from a trial's MLflow run (what `mlflow_metrics`/`_tags` wrote)."""
        m = {k: metrics.get(k) for k in MLFLOW_METRICS}
        for k in ("macs", "params", "dense_macs"):
            m[k] = None if m[k] is None else int(m[k])
        return cls(trial_id=tags.get("trial_id", ""), method=tags.get("method", ""),
                   feasible=tags.get("feasible", "true") != "false", mlflow_run_id=run_id,
                   device_kind=tags.get("device_kind"), node_id=tags.get("node_id"),
                   search_note=tags.get("search_note"), **m)


SCALAR_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TrialRecord) if f.name != "hparams")


def column_types() -> list[tuple[str, type]]:
    """(name, Python type) of every scalar field in order: the fixed columns of the table."""
    hints = typing.get_type_hints(TrialRecord)
    out = []
    for name in SCALAR_FIELDS:
        base = [t for t in typing.get_args(hints[name]) if t is not type(None)] or [hints[name]]
        out.append((name, base[0]))
    return out


def as_record(row: TrialRecord | Mapping[str, Any]) -> TrialRecord:
    return row if isinstance(row, TrialRecord) else TrialRecord.from_row(row)


def rank_key(rec: TrialRecord) -> tuple[bool, float]:
    """Sort key, best last: every feasible trial above every infeasible one, then top-1."""
    return rec.feasible, -math.inf if rec.top1 is None else rec.top1


def best_of(records: Iterable[TrialRecord]) -> TrialRecord:
    return max(records, key=rank_key)
