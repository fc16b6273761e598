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

import json
import math
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

OBJECTIVE_TOP1 = "objective_top1"  # the search algorithm's metric when sweep.max_macs is set
# numeric fields logged as MLflow metrics of a trial's run (the rest go to tags); the phases'
# device-hours are logged under names that carry their unit (`search_gpu_hours`, ...)
MLFLOW_METRICS = ("top1", "top1_before_finetune", "macs", "params", "target_macs", "dense_macs",
                  "trial_wall_s", "trial_overhead_s", "argmax_modules", "target_latency_ms",
                  "latency_ms")

# -- device-hours: GPU-hours and CPU-core-hours are different units and never added together --
DEVICE_KINDS = ("gpu", "cpu_core")
UNITS = {"gpu": "GPU-hours", "cpu_core": "CPU-core-hours"}
DEFAULT_KIND = "cpu_core"  # rows written before the kind was recorded ran on the CPU default
Hours = dict[str, float]  # device kind -> hours of that kind


def kind_of(kind: str | None) -> str:
    return kind or DEFAULT_KIND


def hours_name(kind: str | None) -> str:
    """The unit as a metric/column suffix: "gpu_hours" or "cpu_core_hours"."""
    return f"{kind_of(kind)}_hours"


def unit(kind: str | None) -> str:
    """The unit as printed: "GPU-hours" or "CPU-core-hours"."""
    k = kind_of(kind)
    return UNITS.get(k, f"{k}-hours")


def kinds_in(*hours: Mapping[str, float]) -> list[str]:
    """The device kinds present, in a fixed order (GPU first)."""
    present = {k for h in hours for k in h}
    return [k for k in DEVICE_KINDS if k in present] + sorted(present - set(DEVICE_KINDS))


def add_hours(*parts: Mapping[str, float]) -> Hours:
    """Sum per kind: like with like only."""
    out: Hours = {}
    for h in parts:
        for k, v in h.items():
            out[k] = out.get(k, 0.0) + v
    return out


def format_hours(h: Mapping[str, float]) -> str:
    """"0.1200 GPU-hours + 0.0300 CPU-core-hours": every amount with its unit."""
    return " + ".join(f"{h[k]:.4f} {unit(k)}" for k in kinds_in(h)) or "0"


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
    search_device_hours: float | None = None  # in `device_kind` hours
    finetune_device_hours: float | None = None  # in `finetune_kind` hours
    # evaluation inside those phases, not in their device-hours (so not in any cost comparison)
    search_eval_device_hours: float | None = None  # in `device_kind` hours
    finetune_eval_device_hours: float | None = None  # in `finetune_kind` hours
    argmax_modules: int | None = None  # modules decided by argmax at the search's epoch cap
    additions: str | None = None  # our non-published options this trial used (JSON), or ""
    subnet_path: str | None = None
    mlflow_run_id: str | None = None
    device_kind: str | None = None  # "gpu" or "cpu_core": the search's unit (None: cpu_core)
    node_id: str | None = None
    search_note: str | None = None
    trial_wall_s: float | None = None
    trial_overhead_s: float | None = None
    trial_dir: str | None = None
    finetune_device_kind: str | None = None  # the fine-tune's unit when it differs (None: same)
    # a latency budget (search.budget_metric latency): target and measured ms per batch of the
    # table's batch on the search's device; None with a MACs budget
    target_latency_ms: float | None = None
    latency_ms: float | None = None
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

    @property
    def finetune_kind(self) -> str:
        return kind_of(self.finetune_device_kind or self.device_kind)

    def phase_hours(self) -> dict[str, Hours]:
        """Device-hours of the search and the fine-tune, each keyed by its unit."""
        return {"search": {kind_of(self.device_kind): self.search_device_hours or 0.0},
                "finetune": {self.finetune_kind: self.finetune_device_hours or 0.0}}

    def total_hours(self, pretrain_share: Mapping[str, float] | None = None) -> Hours:
        """Search + fine-tune (+ this trial's share of the dense pretrain), summed per unit."""
        p = self.phase_hours()
        return add_hours(pretrain_share or {}, p["search"], p["finetune"])

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
        """The numeric fields; the device-hours as `search_<unit>`, `finetune_<unit>`
        (`search_gpu_hours`, `finetune_cpu_core_hours`, ...)."""
        out = {k: getattr(self, k) for k in MLFLOW_METRICS if getattr(self, k) is not None}
        for phase, h in self.phase_hours().items():
            if getattr(self, f"{phase}_device_hours") is not None:
                out.update({f"{phase}_{hours_name(k)}": v for k, v in h.items()})
        return out

    def mlflow_tags(self) -> dict[str, str]:
        tags = {"budget": self.budget, "method": self.method, "status": "finished",
                "feasible": str(self.feasible).lower(), "device_kind": self.device_kind or "",
                "node_id": self.node_id or ""}
        if self.finetune_device_kind and self.finetune_device_kind != self.device_kind:
            tags["finetune_device_kind"] = self.finetune_device_kind
        if self.search_note:
            tags["search_note"] = str(self.search_note)[:5000]
        if self.additions:  # our non-published options: the run is marked with them
            tags["additions"] = self.additions
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
        for k in ("macs", "params", "dense_macs", "argmax_modules"):
            m[k] = None if m[k] is None else int(m[k])
        kind, ft_kind = tags.get("device_kind") or None, tags.get("finetune_device_kind") or None
        for phase, k in (("search", kind), ("finetune", ft_kind or kind)):
            # runs logged before the metric names carried their unit: `<phase>_device_hours`
            m[f"{phase}_device_hours"] = metrics.get(f"{phase}_{hours_name(k)}",
                                                     metrics.get(f"{phase}_device_hours"))
        return cls(trial_id=tags.get("trial_id", ""), method=tags.get("method", ""),
                   feasible=tags.get("feasible", "true") != "false", mlflow_run_id=run_id,
                   device_kind=kind, finetune_device_kind=ft_kind, node_id=tags.get("node_id"),
                   search_note=tags.get("search_note"), additions=tags.get("additions", ""), **m)


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


def variant(additions: str | None) -> str:
    """The names of our additions a trial used ("" = the published method): trials group by
    method, budget and variant, so a sweep that mixes variants never averages them together.
    Values (e.g. a sampled temperature) stay in the group's `additions`."""
    return ",".join(sorted(json.loads(additions))) if additions else ""


def group_label(method: str, variant: str, n_variants: int) -> str:
    """The method's name, with its variant when the sweep ran more than one of that method."""
    return method if n_variants == 1 else f"{method}[{variant or 'published'}]"


def metric_name(label: str) -> str:
    """A group label as MLflow accepts it in a metric name (no brackets or commas)."""
    return re.sub(r"[^\w./ -]", "-", label).strip("-")
