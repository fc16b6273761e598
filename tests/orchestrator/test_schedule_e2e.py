"""Two slots of a tiny scheduled sweep, end to end against a real Ray head and MLflow server:
`orchestrator.schedule` submits each slot as a job, each gets its own folder and parent run in
the schedule's experiment, the registry's latest-/best- aliases follow the rules, a retried slot
attaches to its parent run, and `report --schedule` compares the slots."""

from __future__ import annotations

import json
import time

import pytest

from orchestrator import schedule
from orchestrator.report import main as report_main
from orchestrator.schedules.ledger import Ledger
from tests.orchestrator.test_schedule_head import config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("no_ray_address")]

SLOTS = ("20261124T1000Z", "20261124T1100Z")
SPACE = {"search.budget": {"type": "choice", "values": [0.5]}}


def run_slot(head, f: str, now: str, slot: str, runs) -> tuple[str, float]:
    """One scheduling call at `now`; waits for the slot's job. (submission id, seconds from the
    call, the slot's tick as cron would make it, to its first trial's folder)."""
    t0 = time.perf_counter()
    assert schedule.main(["--config", f, "--now", now]) == 0
    sid = Ledger(runs, "e2e").read(slot)["attempts"][-1]["submission_id"]
    trials, first = runs / f"e2e-{slot}" / "trials", None
    deadline = time.time() + 900
    while (status := str(head.client().get_job_status(sid).value)) not in (
            "SUCCEEDED", "FAILED", "STOPPED"):
        if first is None and trials.is_dir() and any(trials.iterdir()):
            first = time.perf_counter() - t0
        assert time.time() < deadline, f"{sid} still {status}"
        time.sleep(0.5)
    assert status == "SUCCEEDED", head.client().get_job_logs(sid)[-4000:]
    return sid, first if first is not None else float("nan")


def test_two_slots_end_to_end(tmp_path, head, mlflow_server, fmnist_dir, capsys):
    from mlflow import MlflowClient

    runs = tmp_path / "runs"
    f = str(config(tmp_path, head, "e2e", **{
        "pipeline": "search", "search.epochs": 2, "search.lr_warmup_epochs": 0.5,
        "search.ofb.ramp_epochs": 0.5, "search.ofb.eliminations_per_epoch": 4,
        "finetune.epochs": 0.5, "sweep.num_samples": 1, "sweep.space": json.dumps(SPACE),
        "sweep.points_to_evaluate": "[]", "mlflow.tracking_uri": mlflow_server}))
    _, tick_to_trial = run_slot(head, f, "2026-11-24T10:01Z", SLOTS[0], runs)
    run_slot(head, f, "2026-11-24T11:01Z", SLOTS[1], runs)
    ran = {}
    for slot in SLOTS:
        assert (runs / f"e2e-{slot}" / "results.parquet").is_file()
        last = Ledger(runs, "e2e").read(slot)["attempts"][-1]
        assert last["status"] == "SUCCEEDED" and last["driver_exit_code"] == 0
        ran[slot] = last["mlflow_run_id"]

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("e2e")  # the schedule's name: slots line up
    query = "tags.ofb_role = 'sweep' and tags.ofb_schedule = 'e2e'"
    parents = client.search_runs([exp.experiment_id], query, order_by=["tags.ofb_slot DESC"])
    assert [p.data.tags["ofb_slot"] for p in parents] == list(reversed(SLOTS))
    assert {p.data.tags["ofb_slot"]: p.info.run_id for p in parents} == ran  # in the ledger
    for p in parents:
        assert p.data.tags["ray_submission_id"].startswith("ofb-e2e-")
        assert len(p.data.tags["mlflow.source.git.commit"]) == 40  # from OFB_GIT_COMMIT (G7)
    top = {v.tags["ofb_slot"]: client.get_run(v.run_id).data.metrics["top1"]
           for v in client.search_model_versions("name='e2e-subnet'")}
    assert sorted(top) == list(SLOTS)  # one version per slot, tagged with it
    alias = {a: client.get_model_version_by_alias("e2e-subnet", a).tags["ofb_slot"]
             for a in ("latest-50pct", "best-50pct")}
    assert alias["latest-50pct"] == SLOTS[1]  # always moves
    assert alias["best-50pct"] == (SLOTS[1] if top[SLOTS[1]] > top[SLOTS[0]] else SLOTS[0])

    # a failed first slot is retried as attempt 2: it resumes in its folder, same parent run
    Ledger(runs, "e2e").update(SLOTS[0], lambda e: {**e, "attempts": [
        *e["attempts"][:-1], {**e["attempts"][-1], "status": "FAILED"}]})
    sid, _ = run_slot(head, f, "2026-11-24T10:30Z", SLOTS[0], runs)
    assert sid.endswith("-a2")
    again = client.search_runs([exp.experiment_id], query)
    assert sorted(p.info.run_id for p in again) == sorted(p.info.run_id for p in parents)

    capsys.readouterr()
    assert report_main(["--schedule", "e2e", "--output-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert SLOTS[0] in out and SLOTS[1] in out and "vs previous" in out
    assert out.count("ofb") >= 2 and "logged the changes to 1 slot parent run" in out
    second = client.get_run(parents[0].info.run_id).data.metrics  # the later slot
    assert "slot_delta_top1/ofb/50pct" in second
    print(f"[measured] tick to first trial: {tick_to_trial:.1f} s")
