"""results.parquet: schema (the TrialRecord fields), round trip, atomic replacement."""

from __future__ import annotations

from dataclasses import asdict
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from orchestrator.records import OBJECTIVE_TOP1, SCALAR_FIELDS, TrialRecord
from orchestrator.results import FIXED, ResultsCallback, write_results


def test_round_trip_with_schema(tmp_path):
    rows = [
        {"trial_id": "a1", "method": "ofb", "target_macs": 6.9e6, "macs": 7_070_000,
         "params": 416_000, "top1": 0.8815, "top1_before_finetune": 0.874,
         "search_device_hours": 0.116, "finetune_device_hours": 0.017,
         "subnet_path": "/x/subnet", "search.budget": 0.5, "search.ofb.temperature": 1.0},
        {"trial_id": "b2", "method": "ofb", "target_macs": 4.1e6, "macs": 4_390_000,
         "params": 259_000, "top1": 0.8768, "top1_before_finetune": 0.8693,
         "search_device_hours": 0.081, "finetune_device_hours": 0.016,
         "subnet_path": "/y/subnet", "search.budget": 0.3, "search.ofb.temperature": 0.8},
    ]
    path = write_results(tmp_path / "results.parquet", rows,
                         ["search.budget", "search.ofb.temperature"])
    table = pq.read_table(path)
    assert table.column_names == [n for n, _ in FIXED] + ["search.budget", "search.ofb.temperature"]
    assert str(table.schema.field("macs").type) == "int64"
    assert table.num_rows == 2
    back = table.to_pylist()
    assert back[0]["macs"] == 7_070_000 and back[1]["search.budget"] == 0.3
    assert back[0]["mlflow_run_id"] is None
    # rewriting replaces the file whole and leaves no temporary behind
    write_results(path, rows[:1], ["search.budget", "search.ofb.temperature"])
    assert pq.read_table(path).num_rows == 1
    assert [p.name for p in tmp_path.iterdir()] == ["results.parquet"]


def test_columns_are_the_record_fields_and_top1_stays_true(tmp_path):
    """An infeasible trial (above sweep.max_macs) is stored with its measured top-1 and
    feasible=False; the search algorithm's objective_top1 never reaches the table."""
    assert [n for n, _ in FIXED] == list(SCALAR_FIELDS)
    assert dict(FIXED)["feasible"] == "bool" and dict(FIXED)["top1"] == "double"
    rec = TrialRecord(trial_id="t1", method="ofb", target_macs=5e6, macs=6_000_000,
                      params=300_000, dense_macs=10_000_000, top1=0.87, feasible=False,
                      top1_before_finetune=0.8, search_device_hours=0.1,
                      finetune_device_hours=0.02, subnet_path="/s", device_kind="cpu_core",
                      node_id="n", search_note="", trial_wall_s=400.0, trial_overhead_s=30.0,
                      trial_dir="/t", hparams={"search.budget": 0.5})
    cb = ResultsCallback(tmp_path / "results.parquet", ["search.budget"],
                         run_id=lambda trial_id: f"run-{trial_id}")
    tune_result = {**rec.tune_report(), "trial_id": "t1", "training_iteration": 1,
                   "time_total_s": 400.0, "config": {"search.budget": 0.5}}
    assert tune_result[OBJECTIVE_TOP1] == pytest.approx(-0.13)
    trial = SimpleNamespace(trial_id="t1", config={"search.budget": 0.5, "seedless": 1})
    cb.on_trial_result(1, [], trial, {"phase": "search", "val_top1": 0.5})  # not final: no row
    assert not (tmp_path / "results.parquet").exists()
    cb.on_trial_result(1, [], trial, tune_result)
    table = pq.read_table(tmp_path / "results.parquet")
    assert table.column_names == [*SCALAR_FIELDS, "search.budget"]
    (row,) = table.to_pylist()
    assert row["top1"] == 0.87 and row["feasible"] is False and row["mlflow_run_id"] == "run-t1"
    back = TrialRecord.from_row(row)
    assert back == TrialRecord(**{**asdict(rec), "mlflow_run_id": "run-t1"})
    assert back.row() == row
    # a resumed sweep's callback starts from the rows already written: a new trial adds its
    # row, the earlier one stays (the table used to lose it until the sweep's end)
    cb2 = ResultsCallback(tmp_path / "results.parquet", ["search.budget"])
    assert set(cb2.rows) == {"t1"}
    t2 = SimpleNamespace(trial_id="t2", config={"search.budget": 0.3})
    cb2.on_trial_result(1, [], t2, {**tune_result, "trial_id": "t2"})
    rows = pq.read_table(tmp_path / "results.parquet").to_pylist()
    assert [r["trial_id"] for r in rows] == ["t1", "t2"]
