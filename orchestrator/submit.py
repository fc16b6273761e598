"""Submit one sweep to a running Ray cluster as a job (../shared/SCHEDULING.md section 2).

    python -m orchestrator.submit [--config FILE] [--address http://HEAD:8265] [--follow]
                                  [--schedule NAME --slot SLOT --attempt N] [--no-upload]
                                  [--env KEY=VALUE ...] [--dry-run]
                                  [key=value ...]

Returns once Ray has the job (its submission id is printed); `--follow` tails its logs and
exits 0 / 1 / 3 when it SUCCEEDED / FAILED / was STOPPED. The submission id is deterministic
(`ofb-<schedule>-<slot>-a<attempt>`; without a schedule: `adhoc` and the current minute), so a
second submit of the same slot is told "already submitted" and changes nothing. What a job
would lose or break (relative paths, env keys the orchestrator sets itself, a Ray version
other than this client's) is refused before anything is sent, with exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request
from datetime import datetime, timezone

from orchestrator.config import ConfigError, load_config
from orchestrator.schedules.jobs import JobSpec, job_spec, preflight
from orchestrator.schedules.ledger import Ledger
from orchestrator.schedules.slots import slot_id, slot_time

EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
AGENT_WAIT_S = 60  # "No available agent" right after a head starts: retry this long


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m orchestrator.submit",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (default: the built-in one)")
    p.add_argument("--address", default="http://127.0.0.1:8265",
                   help="the cluster's dashboard (Jobs API) address")
    p.add_argument("--follow", action="store_true", help="tail the logs until the job ends")
    p.add_argument("--schedule", default="adhoc", help="schedule name (default: adhoc)")
    p.add_argument("--slot", help="slot id YYYYMMDDTHHMMZ (default: the current minute, UTC)")
    p.add_argument("--attempt", type=int, default=1)
    p.add_argument("--no-upload", action="store_true",
                   help="run the code installed on the cluster instead of uploading this one")
    p.add_argument("--python", default="python", help="the cluster's Python for the entrypoint")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an env var for the job's driver and workers (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="the job only validates its config on the cluster (checks the wiring)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_args(argv)


def cluster_version(address: str, timeout: float = 10, key: str = "--address") -> dict:
    """GET /api/version: {version, ray_version, ray_commit, session_name}."""
    try:
        with urllib.request.urlopen(f"{address.rstrip('/')}/api/version", timeout=timeout) as r:
            return json.loads(r.read())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key} {address}: no Ray dashboard answers there ({e}); start "
                          "the cluster (`ray up cluster.yaml`) or give its dashboard address, "
                          "e.g. http://HEAD:8265") from None


def client_for(address: str):
    """A JobSubmissionClient for exactly `address`: RAY_ADDRESS / RAY_API_SERVER_ADDRESS would
    silently win over it, so they are dropped from this process's environment."""
    import logging

    from ray.job_submission import JobSubmissionClient

    for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging",
                 "ray._private.runtime_env.working_dir"):
        logging.getLogger(name).setLevel(logging.ERROR)

    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        if os.environ.pop(k, None) is not None:
            print(f"[submit] ignoring {k} (--address {address} is used)", flush=True)
    return JobSubmissionClient(address)


def submit_spec(client, spec: JobSpec) -> str:
    """Submit; 'submitted', or 'already submitted' when Ray knows the id. Retries while the
    head's agent is not up yet."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(entrypoint=spec.entrypoint, submission_id=spec.submission_id,
                              runtime_env=spec.runtime_env, metadata=spec.metadata)
            return "submitted"
        except RuntimeError as e:  # the SDK reports both as HTTP 500 with a text
            if "already exists" in str(e):
                return "already submitted"
            if "No available agent" in str(e) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise


def follow(client, submission_id: str) -> int:
    """Print the job's logs until it ends; the exit code of its final status."""
    async def tail() -> None:
        async for lines in client.tail_job_logs(submission_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = str(client.get_job_status(submission_id).value)
    while status in ("PENDING", "RUNNING"):  # the log stream can end just before the status
        time.sleep(1)
        status = str(client.get_job_status(submission_id).value)
    print(f"[submit] {submission_id}: {status}", flush=True)
    return EXIT[status]


def parent_run(ledger: Ledger | None, slot: str, submission_id: str) -> str | None:
    """The MLflow parent run the job's driver wrote to the slot's ledger entry."""
    for a in ((ledger.read(slot) or {}).get("attempts") or []) if ledger else []:
        if a.get("submission_id") == submission_id:
            return a.get("mlflow_run_id")
    return None


def claim(ledger: Ledger, spec: JobSpec, attempt: int, session: str) -> str | None:
    """Record this attempt in the slot's ledger entry; None when it may be submitted, else
    why not. The ledger, not Ray, decides: Ray forgets ids with its head."""
    slot = spec.metadata["ofb_slot"]
    record = {"submission_id": spec.submission_id, "ray_session": session, "status": "PENDING",
              "submitted_at": datetime.now(timezone.utc).isoformat()}
    if ledger.claim(slot, {"decision": "SUBMITTED", "attempts": [record]}):
        return None
    entry = ledger.read(slot) or {}
    attempts = entry.get("attempts") or []
    if any(a.get("submission_id") == spec.submission_id for a in attempts):
        return "already submitted"
    last = attempts[-1]["status"] if attempts else entry.get("decision", "claimed")
    if attempt == len(attempts) + 1 and last in ("FAILED", "LOST", "STOPPED"):
        ledger.update(slot, lambda e: {**e, "attempts": [*e["attempts"], record]})
        return None
    return (f"slot {slot} is {last} after {len(attempts)} attempt(s) in {ledger.path(slot)}; "
            f"a new attempt is --attempt {len(attempts) + 1}, after a FAILED, LOST or STOPPED one")


def send(client, spec: JobSpec, ledger: Ledger | None) -> str:
    """submit_spec, and a claimed attempt that never reached Ray is recorded FAILED (so the
    scheduler's next call retries it instead of waiting on a job Ray never had)."""
    try:
        return submit_spec(client, spec)
    except Exception as e:
        why = f"submit failed: {e}"[:500]
        if ledger is not None:
            ledger.update(spec.metadata["ofb_slot"], lambda en: {**en, "attempts": [
                *en["attempts"][:-1], {**en["attempts"][-1], "status": "FAILED",
                                       "reason": why}]})
        raise


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        preflight(cfg)
        if a.schedule != "adhoc":
            named = (cfg.schedule.name or cfg.name) if cfg.schedule else None
            if named != a.schedule:
                raise ConfigError(f"--schedule {a.schedule!r}: the config's schedule is "
                                  f"{named!r} (its `schedule` section; name defaults to the "
                                  "config's name)" if named else f"--schedule {a.schedule!r}:"
                                  " the config has no `schedule` section (schedule.cron)")
        slot = a.slot or slot_id(datetime.now(timezone.utc))
        slot_time(slot)  # refuses a malformed --slot
        bad = [e for e in a.env if "=" not in e or not e.split("=", 1)[0]]
        if bad:
            raise ConfigError(f"--env {bad[0]!r}: give KEY=VALUE")
        spec = job_spec(cfg, a.config, a.overrides, a.schedule, slot, a.attempt,
                        python=a.python, upload=not a.no_upload, dry_run=a.dry_run,
                        extra_env=dict(e.split("=", 1) for e in a.env))
        import ray

        remote = cluster_version(a.address)
        if remote.get("ray_version") != ray.__version__:
            raise ConfigError(f"the cluster at {a.address} runs Ray {remote.get('ray_version')}"
                              f", this client {ray.__version__}: submit from an environment "
                              "with the cluster's Ray version")
    except (ConfigError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    client = client_for(a.address)
    session = str(remote.get("session_name", ""))
    ledger = Ledger(cfg.output_dir, a.schedule) if a.schedule != "adhoc" else None
    if ledger is not None and (refused := claim(ledger, spec, a.attempt, session)):
        print(f"[submit] {spec.submission_id}: {refused}", flush=True)
        return 0
    outcome = send(client, spec, ledger)
    status = client.get_job_status(spec.submission_id).value
    print(f"[submit] {spec.submission_id}: {outcome} ({status}); session {session}", flush=True)
    if not a.follow:
        return 0
    code = follow(client, spec.submission_id)
    if run_id := parent_run(ledger, slot, spec.submission_id):
        print(f"[submit] MLflow parent run {run_id}", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
