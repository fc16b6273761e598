"""The driver's side of a schedule: `orchestrator.run --schedule NAME --slot SLOT|auto`.

A sweep started by a KubeRay RayCronJob, Airflow or by hand follows the same ledger as one
submitted by `orchestrator.schedule`: it names itself `<schedule>-<slot>` (its own folder,
Tune experiment and MLflow parent run; the experiment defaults to the schedule's name and the
registered model to `<schedule>-subnet`, so slots line up), claims or verifies its slot, applies
the overlap policy on its own (skip; queue waits on the ledger up to the deadline; replace is
impossible from inside a driver and acts as skip) and writes its outcome back.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime, timezone
from typing import Any

from orchestrator.config import Config, ConfigError
from orchestrator.schedules.digest import data_digest
from orchestrator.schedules.ledger import Ledger
from orchestrator.schedules.reconcile import last_attempt
from orchestrator.schedules.slots import due, slot_id, slot_time
from orchestrator.schedules.warm_start import warm_start

ACTIVE = ("PENDING", "RUNNING")
# a KubeRay RayCronJob child's submission id: <cronjob>-<unix minutes>-<5 random characters>
KUBERAY_ID = re.compile(r"^.+-(?P<minutes>\d{7,})-[a-z0-9]{5}$")


def job_metadata() -> dict[str, Any]:
    """The Ray job's metadata (job_submission_id and ours), {} outside a job."""
    try:
        return dict(json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
                    .get("metadata") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


def resolve_slot(cfg: Config, slot: str | None, now: datetime) -> str:
    """An explicit slot id; or `auto`: the job's `ofb_slot` metadata, a KubeRay child id's
    scheduled minute, else the schedule's tick due at `now`."""
    if cfg.schedule is None:
        raise ConfigError("--schedule: the config has no `schedule` section (schedule.cron)")
    if slot and slot != "auto":
        slot_time(slot)  # refuses a malformed id
        return slot
    meta = job_metadata()
    if meta.get("ofb_slot"):
        return str(meta["ofb_slot"])
    if m := KUBERAY_ID.match(str(meta.get("job_submission_id", ""))):
        return slot_id(datetime.fromtimestamp(int(m["minutes"]) * 60, timezone.utc))
    return due(cfg.schedule.cron, cfg.schedule.timezone, now).slot


def apply(cfg: Config, schedule: str, slot: str) -> None:
    """Name the run after its slot; experiment and registered model after the schedule."""
    if cfg.schedule is None:
        raise ConfigError(f"--schedule {schedule}: the config has no `schedule` section")
    if schedule != (cfg.schedule.name or cfg.name):
        raise ConfigError(f"--schedule {schedule!r} but the config's schedule is named "
                          f"{cfg.schedule.name or cfg.name!r}")
    cfg.name = f"{schedule}-{slot}"
    os.environ.setdefault("OFB_SCHEDULE", schedule)  # for the parent run's tags
    os.environ.setdefault("OFB_SLOT", slot)
    # G8: the dense cache follows the data's content (on_data_change), every slot (always), or
    # only the config (never, the unscheduled behaviour); the folder is walked only for the first
    mode = cfg.schedule.refresh_dense
    if mode == "on_data_change":
        digest = data_digest(cfg.data)
        os.environ["OFB_DATA_DIGEST"] = digest
        cfg.dense_refresh = f"data:{digest}"
    else:
        cfg.dense_refresh = f"slot:{slot}" if mode == "always" else None
    cfg.mlflow.experiment = cfg.mlflow.experiment or schedule
    cfg.mlflow.registered_model = cfg.mlflow.registered_model or f"{schedule}-subnet"
    if line := warm_start(cfg, schedule, slot):
        print(f"[run] {line}", flush=True)


def _set_last(ledger: Ledger, slot: str, **fields: Any) -> None:
    ledger.update(slot, lambda e: {**e, "attempts": [*e["attempts"][:-1],
                                                     {**e["attempts"][-1], **fields}]})


def enter(cfg: Config, schedule: str, slot: str, now: datetime,
          poll_s: float = 30) -> tuple[bool, str]:
    """(run?, why). Claims the slot, or takes over its own submitted attempt."""
    ledger = Ledger(cfg.output_dir, schedule)
    sid = str(job_metadata().get("job_submission_id") or f"manual-{os.getpid()}")
    record = {"submission_id": sid, "status": "RUNNING", "started_at": now.isoformat()}
    entry = ledger.read(slot)
    if entry is not None:
        last = last_attempt(entry) or {}
        if last.get("submission_id") == sid:  # submitted by orchestrator.schedule / submit
            _set_last(ledger, slot, status="RUNNING", started_at=now.isoformat())
            return True, f"attempt {len(entry['attempts'])} of slot {slot}"
        return False, f"slot {slot} is already {last.get('status') or entry.get('decision')}"
    spec = cfg.schedule
    deadline = time.monotonic() + spec.starting_deadline_s
    while True:
        others = [s for s in ledger.slots() if s != slot
                  and (last_attempt(ledger.read(s) or {}) or {}).get("status") in ACTIVE]
        if not others or spec.overlap == "allow":
            break
        if spec.overlap == "queue" and time.monotonic() < deadline:
            time.sleep(poll_s)
            continue
        status = "MISSED" if spec.overlap == "queue" else "SKIPPED"
        ledger.claim(slot, {"decision": status, "reason": f"{', '.join(others)} running",
                            "attempts": []})
        return False, f"slot {slot} {status}: {', '.join(others)} still running"
    if not ledger.claim(slot, {"decision": "SUBMITTED", "attempts": [record]}):
        return False, f"slot {slot} was claimed by another driver"
    return True, f"claimed slot {slot}"


def finish(cfg: Config, schedule: str, slot: str, status: str, exit_code: int | None,
           mlflow_run_id: str | None = None) -> None:
    ledger = Ledger(cfg.output_dir, schedule)
    if mlflow_run_id is None:
        from orchestrator.report_sources import parent_of_folder

        try:  # the sweep's parent run, found by its folder as the report finds it
            mlflow_run_id = parent_of_folder(cfg.run_dir, cfg.tracking_uri)[0]
        except Exception:  # noqa: BLE001 - MLflow unreachable: the outcome is still recorded
            mlflow_run_id = None
    if ledger.read(slot) is not None:
        _set_last(ledger, slot, status=status, driver_exit_code=exit_code,
                  mlflow_run_id=mlflow_run_id,
                  ended_at=datetime.now(timezone.utc).isoformat())


def schedule_tags() -> dict[str, str]:
    """MLflow tags of a scheduled run's parent ({} for an unscheduled run): schedule, slot (and
    its ISO time, sortable), attempt, Ray submission id, the data's digest."""
    schedule, slot = os.environ.get("OFB_SCHEDULE"), os.environ.get("OFB_SLOT")
    if not (schedule and slot):
        return {}
    tags = {"ofb_schedule": schedule, "ofb_slot": slot,
            "ofb_slot_time": slot_time(slot).isoformat(),
            "ofb_attempt": os.environ.get("OFB_ATTEMPT", "1")}
    if sid := job_metadata().get("job_submission_id"):
        tags["ray_submission_id"] = str(sid)
    if digest := os.environ.get("OFB_DATA_DIGEST"):
        tags["ofb_data_digest"] = digest
    return tags
