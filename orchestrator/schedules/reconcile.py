"""The scheduler's decision for one call, a pure function of the schedule, the time, the ledger
and the slots still running (../shared/SCHEDULING.md section 2). `orchestrator.schedule` calls
it every few minutes and carries the decision out (claims, Ray submissions, stops).

Order of the rules: a claimed slot follows its last attempt (running: refresh its status from
Ray; FAILED or LOST: a new attempt that resumes the same slot folder, within `max_attempts` and
the deadline; anything else is final); an unclaimed slot past `starting_deadline_s` (or, with
catch_up none, older than one call period) is MISSED; then the overlap policy against the other
running slots; else the slot is submitted as attempt 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from orchestrator.schedules.ledger import Ledger
from orchestrator.schedules.slots import due
from orchestrator.schedules.spec import ScheduleSpec

Action = Literal["nothing", "refresh", "missed", "skip", "wait", "submit"]


@dataclass(frozen=True)
class Decision:
    action: Action
    slot: str
    attempt: int = 0  # the attempt to submit ("submit"), else the ledger's last
    reason: str = ""
    stop: tuple[str, ...] = field(default_factory=tuple)  # running slots to stop first (replace)


def last_attempt(entry: dict) -> dict | None:
    attempts = entry.get("attempts") or []
    return attempts[-1] if attempts else None


def decide(spec: ScheduleSpec, now: datetime, ledger: Ledger, running: list[str],
           period_s: float = 900) -> Decision:
    """What one reconcile call does at `now`; `running` = this schedule's slots still running
    (from the ledger, cross-checked with Ray's job list by the caller); `period_s` = how often
    the caller reconciles.

    catch_up none (decision: "one interval" in the design is always true of the latest tick):
    an unclaimed slot runs only on the first call after its tick (age < `period_s`); a call
    after downtime records it MISSED instead of catching up."""
    d = due(spec.cron, spec.timezone, now)
    slot, age = d.slot, (now - d.tick).total_seconds()
    entry = ledger.read(slot)
    if entry is not None:
        last = last_attempt(entry)
        status = last["status"] if last else entry.get("decision", "")
        n = len(entry.get("attempts") or [])
        if status in ("PENDING", "RUNNING"):
            return Decision("refresh", slot, n, f"attempt {n} is {status}")
        if status in ("FAILED", "LOST") and n < spec.max_attempts:
            if age > spec.starting_deadline_s:
                return Decision("nothing", slot, n, f"attempt {n} {status}, past the deadline")
            return Decision("submit", slot, n + 1, f"attempt {n} {status}: resubmitted")
        return Decision("nothing", slot, n, f"final: {status or 'claimed'}")
    if age > spec.starting_deadline_s:
        return Decision("missed", slot, reason=f"due {age:.0f} s ago, deadline "
                        f"{spec.starting_deadline_s:.0f} s")
    if spec.catch_up == "none" and age >= period_s:
        return Decision("missed", slot, reason=f"due {age:.0f} s ago, after the last call "
                        f"({period_s:.0f} s apart): catch_up none")
    others = tuple(s for s in running if s != slot)
    if others:
        if spec.overlap == "skip":
            return Decision("skip", slot, reason=f"slot(s) {', '.join(others)} still running")
        if spec.overlap == "queue":
            return Decision("wait", slot, reason=f"queued behind {', '.join(others)}")
        if spec.overlap == "replace":
            return Decision("submit", slot, 1, f"replaces {', '.join(others)}", stop=others)
    return Decision("submit", slot, 1, "due")
