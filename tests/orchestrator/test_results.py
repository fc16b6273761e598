"""results.parquet: schema, round trip, atomic replacement."""

from __future__ import annotations

import pyarrow.parquet as pq

from orchestrator.results import FIXED, write_results


def test_round_trip_with_schema(tmp_path):
    rows = [
        {"trial_id": "a1", "method": "ofb", "target_macs": 6.9e6, "macs": 7_070_000,
         "params": 416_000, "top1": 0.8815, "top1_before_finetune": 0.874,
         "search_device_hours": 0.116, "finetune_device_hours": 0.017,
         "subnet_path": "/x/subnet", "search.budget": 0.5, "search.temperature": 1.0},
        {"trial_id": "b2", "method": "ofb", "target_macs": 4.1e6, "macs": 4_390_000,
         "params": 259_000, "top1": 0.8768, "top1_before_finetune": 0.8693,
         "search_device_hours": 0.081, "finetune_device_hours": 0.016,
         "subnet_path": "/y/subnet", "search.budget": 0.3, "search.temperature": 0.8},
    ]
    path = write_results(tmp_path / "results.parquet", rows,
                         ["search.budget", "search.temperature"])
    table = pq.read_table(path)
    assert table.column_names == [n for n, _ in FIXED] + ["search.budget", "search.temperature"]
    assert str(table.schema.field("macs").type) == "int64"
    assert table.num_rows == 2
    back = table.to_pylist()
    assert back[0]["macs"] == 7_070_000 and back[1]["search.budget"] == 0.3
    assert back[0]["mlflow_run_id"] is None
    # rewriting replaces the file whole and leaves no temporary behind
    write_results(path, rows[:1], ["search.budget", "search.temperature"])
    assert pq.read_table(path).num_rows == 1
    assert [p.name for p in tmp_path.iterdir()] == ["results.parquet"]
