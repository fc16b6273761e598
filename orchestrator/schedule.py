"""One reconcile of a sweep's schedule: stateless, safe to call every few minutes from cron,
a systemd timer or Airflow (../shared/SCHEDULING.md section 2).

    python -m orchestrator.schedule --config FILE [--now ISO] [--every SECONDS] [key=value ...]

It refreshes the running slots' statuses from Ray (a job Ray no longer knows, on a head whose
session changed, is LOST), decides (orchestrator/schedules/reconcile.py) and carries the
decision out: records a MISSED or SKIPPED slot, stops the running slots a `replace` policy
displaces, claims the due slot in the ledger and submits it. Prints one line; exit 0, or 2 for a
bad config.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from typing import Any

from orchestrator.config import ConfigError, load_config
from orchestrator.schedules.jobs import job_spec, preflight
from orchestrator.schedules.ledger import Ledger
from orchestrator.schedules.reconcile import Decision, decide, last_attempt
from orchestrator.submit import claim, client_for, cluster_version, send

ACTIVE = ("PENDING", "RUNNING")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m orchestrator.schedule",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config with a `schedule` section")
    p.add_argument("--now", help="ISO time to reconcile at (tests; default: now, UTC)")
    p.add_argument("--every", type=float, default=900,
                   help="seconds between calls (catch_up none runs a slot only on the first)")
    p.add_argument("--dry-run", action="store_true",
                   help="submitted jobs only validate their config (checks the wiring)")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def refresh(ledger: Ledger, client: Any, session: str) -> list[str]:
    """Bring each active slot's status up to date; the slots still running."""
    running = []
    for slot in ledger.slots():
        entry = ledger.read(slot) or {}
        last = last_attempt(entry)
        if not last or last.get("status") not in ACTIVE:
            continue
        try:
            status = str(client.get_job_status(last["submission_id"]).value)
        except RuntimeError:  # 404: Ray forgot the id; LOST if its head was recreated
            status = "LOST" if last.get("ray_session") != session else last["status"]
        if status != last["status"]:
            ledger.update(slot, lambda e, s=status: {**e, "attempts": [
                *e["attempts"][:-1], {**e["attempts"][-1], "status": s}]})
        if status in ACTIVE:
            running.append(slot)
    return running


def stop(ledger: Ledger, client: Any, slots: tuple[str, ...], wait_s: float = 180) -> None:
    """Stop the running slots a `replace` displaces (SIGINT, then Ray's wait) and record it."""
    for slot in slots:
        sid = last_attempt(ledger.read(slot) or {})["submission_id"]
        client.stop_job(sid)
        deadline = time.monotonic() + wait_s
        while str(client.get_job_status(sid).value) in ACTIVE and time.monotonic() < deadline:
            time.sleep(1)
        ledger.update(slot, lambda e: {**e, "attempts": [
            *e["attempts"][:-1], {**e["attempts"][-1], "status": "STOPPED",
                                  "reason": "replaced"}]})


def carry_out(d: Decision, cfg: Any, config_file: str | None, overrides: list[str],
              ledger: Ledger, client: Any, session: str, dry_run: bool = False) -> str:
    if d.action in ("missed", "skip"):
        status = "MISSED" if d.action == "missed" else "SKIPPED"
        ledger.claim(d.slot, {"decision": status, "reason": d.reason, "attempts": []})
        return f"{d.slot}: {status} ({d.reason})"
    if d.action != "submit":
        return f"{d.slot}: {d.action} ({d.reason})"
    stop(ledger, client, d.stop)
    spec = job_spec(cfg, config_file, overrides, ledger.schedule, d.slot, d.attempt,
                    dry_run=dry_run)
    refused = claim(ledger, spec, d.attempt, session)
    if refused:
        return f"{d.slot}: {refused}"
    outcome = send(client, spec, ledger)
    return f"{d.slot}: {outcome} as {spec.submission_id} ({d.reason})"


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        if cfg.schedule is None:
            raise ConfigError("the config has no `schedule` section (schedule.cron at least)")
        preflight(cfg)
        now = (datetime.fromisoformat(a.now) if a.now else datetime.now(timezone.utc))
        if now.tzinfo is None:
            raise ConfigError(f"--now {a.now!r} has no time zone (e.g. 2026-03-01T02:05Z)")
        spec = cfg.schedule
        remote = cluster_version(spec.address, key="schedule.address")
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    client = client_for(spec.address)
    ledger = Ledger(cfg.output_dir, spec.name or cfg.name)
    running = refresh(ledger, client, remote.get("session_name", ""))
    d = decide(spec, now, ledger, running, period_s=a.every)
    line = carry_out(d, cfg, a.config, a.overrides, ledger, client,
                     remote.get("session_name", ""), dry_run=a.dry_run)
    print(f"[schedule] {line}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
