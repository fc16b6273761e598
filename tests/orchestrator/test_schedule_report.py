"""`orchestrator.report --schedule`: a schedule's slots side by side, with the change against
the previous slot flagged beyond the seed noise (slot folders written as sweeps write them)."""

from __future__ import annotations

from orchestrator.report import main
from orchestrator.results import write_results
from orchestrator.schedules.slot_report import over_slots, slot_folders

DENSE = 1_000_000


def _slot(root, slot: str, top1: list[float], method: str = "ofb") -> None:
    rows = [{"trial_id": f"{slot}-{i}", "method": method, "target_macs": 0.5 * DENSE,
             "macs": 480_000, "params": 1000, "dense_macs": DENSE, "top1": t,
             "top1_before_finetune": t - 0.01, "search_device_hours": 0.01,
             "finetune_device_hours": 0.01, "device_kind": "cpu_core"}
            for i, t in enumerate(top1)]
    write_results(root / f"nightly-{slot}" / "results.parquet", rows, [])


def test_slots_compared_over_time(tmp_path, capsys):
    _slot(tmp_path, "20260301T0200Z", [0.880, 0.882, 0.881])
    _slot(tmp_path, "20260302T0200Z", [0.881, 0.883, 0.882])  # noise: +0.1 points
    _slot(tmp_path, "20260303T0200Z", [0.850, 0.852, 0.851])  # a real drop
    (tmp_path / "nightly-notaslot").mkdir()  # ignored
    assert [s for s, _ in slot_folders(tmp_path, "nightly")] == [
        "20260301T0200Z", "20260302T0200Z", "20260303T0200Z"]
    rows = over_slots(tmp_path, "nightly")
    assert [r["delta"] is None for r in rows] == [True, False, False]
    assert abs(rows[1]["delta"] - 0.001) < 1e-9 and not rows[1]["flag"]
    assert abs(rows[2]["delta"] + 0.031) < 1e-9 and rows[2]["flag"]
    assert abs(rows[2]["delta_mean"] - (0.851 - 0.8815)) < 1e-9
    assert [r["slot"] for r in over_slots(tmp_path, "nightly", last=1)] == ["20260303T0200Z"]
    assert main(["--schedule", "nightly", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "-3.10 !" in out and "+0.10" in out and "20260302T0200Z" in out
    assert main(["--schedule", "weekly", "--output-dir", str(tmp_path)]) == 2
