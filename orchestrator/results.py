"""The results table of a sweep: `<output_dir>/<name>/results.parquet`, one row per trial.

Written with pyarrow, atomically (a temporary file renamed over the old one: readers never see
half a file), and rewritten as each trial finishes (a Tune callback in the driver). MACs are
absolute, top-1 is a fraction; one column per swept hyperparameter, named by its dotted key.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.tune import Callback

FIXED = [
    ("trial_id", pa.string()), ("method", pa.string()), ("target_macs", pa.float64()),
    ("macs", pa.int64()), ("params", pa.int64()), ("top1", pa.float64()),
    ("top1_before_finetune", pa.float64()), ("search_device_hours", pa.float64()),
    ("finetune_device_hours", pa.float64()), ("subnet_path", pa.string()),
    ("mlflow_run_id", pa.string()), ("dense_macs", pa.int64()), ("feasible", pa.bool_()),
]


def _arrow_type(values: list[Any]) -> pa.DataType:
    kinds = {type(v) for v in values if v is not None}
    if kinds <= {bool}:
        return pa.bool_()
    if kinds <= {int}:
        return pa.int64()
    if kinds <= {int, float}:
        return pa.float64()
    return pa.string()


def to_table(rows: list[dict[str, Any]], space_keys: list[str]) -> pa.Table:
    cols: dict[str, pa.Array] = {}
    fields = []
    for name, typ in FIXED:
        vals = [r.get(name) for r in rows]
        cols[name] = pa.array(vals, type=typ)
        fields.append(pa.field(name, typ))
    for key in space_keys:
        vals = [r.get(key) for r in rows]
        typ = _arrow_type(vals)
        cols[key] = pa.array([None if v is None else (str(v) if typ == pa.string() else v)
                              for v in vals], type=typ)
        fields.append(pa.field(key, typ))
    return pa.Table.from_arrays(list(cols.values()), schema=pa.schema(fields))


def write_results(path: Path, rows: list[dict[str, Any]], space_keys: list[str]) -> Path:
    """Write the table atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(to_table(rows, space_keys), tmp)
    os.replace(tmp, path)
    return path


class ResultsCallback(Callback):
    """Rewrites results.parquet each time a trial reports its final result."""

    def __init__(self, path: Path, space_keys: list[str], rows: list[dict[str, Any]] | None = None,
                 run_id: Callable[[str], str | None] | None = None):
        self.path, self.space_keys, self.run_id = path, space_keys, run_id
        self.rows: dict[str, dict[str, Any]] = {r["trial_id"]: r for r in rows or []}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        if result.get("phase") != "done":
            return
        params = {k: v for k, v in (trial.config or {}).items() if k in self.space_keys}
        self.rows[trial.trial_id] = {**result, **params, "trial_id": trial.trial_id,
                                     "mlflow_run_id": self.run_id and self.run_id(trial.trial_id)}
        write_results(self.path, list(self.rows.values()), self.space_keys)
