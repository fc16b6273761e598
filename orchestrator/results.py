"""The results table of a sweep: `<output_dir>/<name>/results.parquet`, one row per trial.

Written with pyarrow, atomically (a temporary file renamed over the old one: readers never see
half a file), and rewritten as each trial finishes (a Tune callback in the driver). The fixed
columns are the fields of `TrialRecord`, in order; then one column per swept hyperparameter,
named by its dotted key. MACs are absolute, top-1 a fraction (always as measured: `feasible`
says whether a trial met sweep.max_macs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.tune import Callback

from orchestrator.records import TrialRecord, as_record, column_types

_ARROW = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
FIXED = [(name, _ARROW[typ]) for name, typ in column_types()]


def _arrow_type(values: list[Any]) -> pa.DataType:
    kinds = {type(v) for v in values if v is not None}
    if kinds <= {bool}:
        return pa.bool_()
    if kinds <= {int}:
        return pa.int64()
    if kinds <= {int, float}:
        return pa.float64()
    return pa.string()


def to_table(rows: Iterable[TrialRecord | Mapping[str, Any]], space_keys: list[str]) -> pa.Table:
    recs = [as_record(r) for r in rows]
    cols: dict[str, pa.Array] = {}
    fields = []
    for name, typ in FIXED:
        cols[name] = pa.array([getattr(r, name) for r in recs], type=typ)
        fields.append(pa.field(name, typ))
    for key in space_keys:
        vals = [r.hparams.get(key) for r in recs]
        typ = _arrow_type(vals)
        cols[key] = pa.array([None if v is None else (str(v) if typ == pa.string() else v)
                              for v in vals], type=typ)
        fields.append(pa.field(key, typ))
    return pa.Table.from_arrays(list(cols.values()), schema=pa.schema(fields))


def write_results(path: Path, rows: Iterable[TrialRecord | Mapping[str, Any]],
                  space_keys: list[str]) -> Path:
    """Write the table atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(to_table(rows, space_keys), tmp)
    os.replace(tmp, path)
    return path


def read_results(path: Path) -> list[TrialRecord]:
    """The rows of an existing table ([] when there is none yet)."""
    if not Path(path).is_file():
        return []
    return [TrialRecord.from_row(row) for row in pq.read_table(path).to_pylist()]


class ResultsCallback(Callback):
    """Rewrites results.parquet each time a trial reports its final result."""

    def __init__(self, path: Path, space_keys: list[str], rows: list[TrialRecord] | None = None,
                 run_id: Callable[[str], str | None] | None = None):
        self.path, self.space_keys, self.run_id = path, space_keys, run_id
        # a resumed sweep keeps the rows already written: the table never shrinks mid-run
        kept = rows if rows is not None else read_results(path)
        self.rows: dict[str, TrialRecord] = {r.trial_id: r for r in kept}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        if result.get("phase") != "done":
            return
        rec = TrialRecord.from_tune(result, trial.config, self.space_keys)
        rec.trial_id = trial.trial_id
        rec.mlflow_run_id = self.run_id and self.run_id(trial.trial_id)
        self.rows[trial.trial_id] = rec
        write_results(self.path, list(self.rows.values()), self.space_keys)
