"""Submit and schedule against a real Ray head (`ray start --head`, its own ports and temp dir):
submission, duplicate slots, lost slots, the overlap policies, `--follow`'s exit codes and the
runtime-env merge (../shared/SCHEDULING.md section 4). Jobs here validate their config only
(`--dry-run`), or sleep; the end-to-end slots with real sweeps are in test_schedule_e2e.py."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator import schedule, submit
from orchestrator.schedules.jobs import EXCLUDES, REPO, STOP_ENV
from orchestrator.schedules.ledger import Ledger
from orchestrator.schedules.slots import submission_id
from tests.conftest import tiny_overrides
from tests.orchestrator.ray_head import head_env

HOUR1, HOUR2 = "20261124T1000Z", "20261124T1100Z"  # slots of cron "0 * * * *"


pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("no_ray_address")]


def nested(dotted: list[str]) -> dict:
    out: dict = {}
    for item in dotted:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def config(tmp_path: Path, head, name: str, **extra: object) -> Path:
    """A tiny config file with a schedule `name` (hourly) on this head."""
    over = tiny_overrides(tmp_path, **{"name": name, "schedule.cron": "0 * * * *",
                                       "schedule.address": head.url, **extra})
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(nested(over)))
    return f


def cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=head_env(), timeout=timeout, cwd=REPO)


def sleeper(head, schedule_name: str, slot: str, seconds: int, trap: Path) -> str:
    """A running slot as the ledger and Ray see it: a job that sleeps, and records SIGINT."""
    sid = submission_id(schedule_name, slot, 1)
    ready = trap.with_suffix(".ready")
    script = (f"trap 'echo INT > {trap}; kill $p; exit 130' INT; touch {ready}; "
              f"sleep {seconds} & p=$!; wait $p")
    head.client().submit_job(entrypoint=f"bash -c {shlex.quote(script)}", submission_id=sid,
                             runtime_env={"env_vars": STOP_ENV},
                             metadata={"ofb_schedule": schedule_name, "ofb_slot": slot})
    head.wait(sid, 60, until=("RUNNING",))
    deadline = time.time() + 60  # RUNNING comes before bash has set its trap, on a busy machine
    while not ready.exists():
        assert time.time() < deadline, f"{sid} never set its SIGINT trap"
        time.sleep(0.2)
    return sid


def test_submit_status_logs_and_the_uploaded_package(tmp_path, head):
    probe = REPO / "runs" / "upload-probe.txt"  # runs/ is excluded from the upload
    probe.parent.mkdir(exist_ok=True)
    probe.write_text("must not be uploaded")
    try:
        t0 = time.perf_counter()
        r = cli("orchestrator.submit", "--config", str(config(tmp_path, head, "sub")),
                "--address", head.url, "--slot", HOUR1, "--dry-run")
        submit_s = time.perf_counter() - t0
    finally:
        probe.unlink()
    assert r.returncode == 0, r.stdout + r.stderr
    sid = submission_id("adhoc", HOUR1, 1)
    assert f"{sid}: submitted" in r.stdout
    assert head.wait(sid) == "SUCCEEDED"
    logs = head.client().get_job_logs(sid)
    assert "embed_dim: 32" in logs  # the resolved config
    code = Path(logs.split("[run] code ", 1)[1].split(" ", 1)[0])
    assert "_ray_pkg_" in str(code) and code != REPO  # the uploaded package ran
    assert not (code / "runs").exists() and not (code / ".venv").exists()
    info = head.client().get_job_info(sid)
    assert info.metadata["ofb_slot"] == HOUR1 and len(info.metadata["ofb_git_commit"]) == 40
    print(f"[measured] submit CLI against the local head: {submit_s:.1f} s")


def test_a_slot_is_submitted_once_even_after_ray_forgets_it(tmp_path, head, capsys):
    f = str(config(tmp_path, head, "dup"))
    args = ["--config", f, "--address", head.url, "--schedule", "dup", "--slot", HOUR1,
            "--dry-run"]
    sid = submission_id("dup", HOUR1, 1)
    assert submit.main(args) == 0
    assert submit.main(args) == 0
    assert f"{sid}: already submitted" in capsys.readouterr().out
    client = head.client()
    assert [j.submission_id for j in client.list_jobs()].count(sid) == 1
    head.wait(sid)
    assert client.delete_job(sid)  # Ray forgets the id (as a recreated head does)
    assert submit.main(args) == 0
    assert "already submitted" in capsys.readouterr().out
    assert sid not in [j.submission_id for j in client.list_jobs()]  # the ledger refused
    assert len(Ledger(tmp_path / "runs", "dup").read(HOUR1)["attempts"]) == 1


def test_a_lost_slot_is_resubmitted_as_a_new_attempt(tmp_path, head):
    f = str(config(tmp_path, head, "lost"))
    ledger = Ledger(tmp_path / "runs", "lost")
    ledger.claim(HOUR1, {"decision": "SUBMITTED", "attempts": [
        {"submission_id": submission_id("lost", HOUR1, 1), "ray_session": "session_gone",
         "status": "RUNNING"}]})
    t0 = time.perf_counter()
    assert schedule.main(["--config", f, "--now", "2026-11-24T10:20Z", "--dry-run"]) == 0
    call_s = time.perf_counter() - t0
    attempts = ledger.read(HOUR1)["attempts"]
    assert [a["status"] for a in attempts] == ["LOST", "PENDING"]
    assert attempts[1]["submission_id"] == submission_id("lost", HOUR1, 2)
    assert head.wait(attempts[1]["submission_id"]) == "SUCCEEDED"
    print(f"[measured] one scheduling call that submits: {call_s:.2f} s")


@pytest.mark.parametrize("policy", ["skip", "replace", "queue"])
def test_overlap_policies(tmp_path, head, policy):
    name = f"ov-{policy}"
    f = str(config(tmp_path, head, name, **{"schedule.overlap": policy}))
    trap = tmp_path / "trap.txt"
    first = sleeper(head, name, HOUR1, 8 if policy == "queue" else 120, trap)
    ledger = Ledger(tmp_path / "runs", name)
    ledger.claim(HOUR1, {"decision": "SUBMITTED", "attempts": [
        {"submission_id": first, "ray_session": head.session(), "status": "RUNNING"}]})
    reconcile = ["--config", f, "--now", "2026-11-24T11:02Z", "--dry-run"]
    assert schedule.main(reconcile) == 0
    second = submission_id(name, HOUR2, 1)
    jobs = [j.submission_id for j in head.client().list_jobs()]
    if policy == "skip":
        assert ledger.read(HOUR2)["decision"] == "SKIPPED" and second not in jobs
        head.client().stop_job(first)
    elif policy == "replace":
        assert head.wait(first, 30) == "STOPPED"
        assert trap.read_text().strip() == "INT"  # SIGINT reached the replaced sweep
        last = ledger.read(HOUR1)["attempts"][-1]
        assert last["status"] == "STOPPED" and last["reason"] == "replaced"
        assert head.wait(second) == "SUCCEEDED"
    else:  # queue: nothing now; submitted on the first call after the earlier slot ends
        assert ledger.read(HOUR2) is None and second not in jobs
        assert head.wait(first, 60) == "SUCCEEDED"
        assert schedule.main(reconcile) == 0
        assert ledger.read(HOUR1)["attempts"][-1]["status"] == "SUCCEEDED"
        assert head.wait(second) == "SUCCEEDED"


def test_follow_exit_codes(tmp_path, head):
    f = str(config(tmp_path, head, "fol"))
    base = ["--config", f, "--address", head.url, "--follow"]
    ok = cli("orchestrator.submit", *base, "--slot", "20261124T0100Z", "--dry-run")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "SUCCEEDED" in ok.stdout.splitlines()[-1]
    # passes the submit's schema checks, fails in the job's own preflight
    bad = cli("orchestrator.submit", *base, "--slot", "20261124T0200Z", "--dry-run",
              "model.pretrained_file=/nonexistent/weights.safetensors")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "does not exist" in bad.stdout
    slot3 = "20261124T0300Z"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.submit", *base, "--slot",
                             slot3], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=head_env(), cwd=REPO)
    sid = submission_id("adhoc", slot3, 1)
    deadline = time.time() + 120
    while sid not in [j.submission_id for j in head.client().list_jobs()]:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.5)
    head.wait(sid, 120, until=("RUNNING",))
    head.client().stop_job(sid)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 3, out[-3000:]


def test_a_job_that_sets_a_worker_env_key_still_starts_ray(head):
    """G2: Ray fails a driver whose ray.init(runtime_env) repeats a key of the job's env."""
    sid = "env-merge-regression"
    code = ("from orchestrator.ray_setup import start_ray; r = start_ray(); "
            "print('cluster cpus', r['CPU'])")
    head.client().submit_job(
        entrypoint=f"python -c {shlex.quote(code)}", submission_id=sid,
        runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES,
                     "env_vars": {"HF_HUB_OFFLINE": "1"}})
    status = head.wait(sid, 180)
    logs = head.client().get_job_logs(sid)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "cluster cpus 2.0" in logs
