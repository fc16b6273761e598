"""When a schedule's slots fall: cron ticks in the schedule's own time zone, slot ids in UTC.

Cron parsing and DST are croniter's (pinned in constraints.txt), never ours. A slot is named by
its tick converted to UTC, `YYYYMMDDTHHMMZ`, so slot ids sort by time whatever the zone, and
a tick that DST moves keeps one id. Measured with croniter 7.0.0 in Europe/Berlin: on the
spring-forward day a tick in the skipped hour (02:00, 02:30) falls on 03:00 local, the first
valid minute; on the fall-back day a repeated wall time (02:30) ticks twice, once per UTC
instant, so two slots an hour apart (the overlap policy then decides about the second). A
schedule in `Etc/UTC` (the default) has neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, croniter

SLOT_FORMAT = "%Y%m%dT%H%MZ"


def slot_id(tick: datetime) -> str:
    """The slot of a (zone-aware) tick: its UTC time, e.g. 20260301T0200Z."""
    if tick.tzinfo is None:
        raise ValueError(f"tick {tick} has no time zone")
    return tick.astimezone(timezone.utc).strftime(SLOT_FORMAT)


def slot_time(slot: str) -> datetime:
    """The UTC time of a slot id (inverse of `slot_id`)."""
    try:
        return datetime.strptime(slot, SLOT_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        raise ValueError(f"slot {slot!r} is not of the form YYYYMMDDTHHMMZ "
                         "(e.g. 20260301T0200Z)") from None


def submission_id(schedule: str, slot: str, attempt: int) -> str:
    """Ray submission id of one attempt at one slot: DNS-1123 safe, <= 63 characters."""
    return f"ofb-{schedule}-{slot.lower()}-a{attempt}"


def check_cron(expr: str) -> str:
    """A valid 5-field cron that fires at least once (croniter accepts '0 0 30 2 *', which
    never does: a schedule of it would wait forever, silently)."""
    if len(expr.split()) != 5 or not croniter.is_valid(expr):
        raise ValueError(f"cron {expr!r} is not a valid 5-field cron expression "
                         "(minute hour day-of-month month day-of-week, e.g. '0 2 * * *')")
    try:
        croniter(expr, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterBadDateError:
        raise ValueError(f"cron {expr!r} never fires (no such date, e.g. 30 February or "
                         "31 April); give a day that exists in the month(s) named") from None
    return expr


@dataclass(frozen=True)
class Due:
    """The latest tick at or before `now`, with its neighbours (for catch-up and deadlines)."""

    tick: datetime  # in the schedule's zone
    previous: datetime
    next: datetime

    @property
    def slot(self) -> str:
        return slot_id(self.tick)

    @property
    def interval(self) -> timedelta:
        return self.next - self.tick


def due(cron: str, tz: str, now: datetime) -> Due:
    """The slot due at `now` (zone-aware): the latest tick <= now, in zone `tz`."""
    if now.tzinfo is None:
        raise ValueError(f"now={now} has no time zone")
    zone = ZoneInfo(tz)
    local = now.astimezone(zone)
    it = croniter(check_cron(cron), local + timedelta(microseconds=1))  # a tick at now counts
    tick = it.get_prev(datetime)
    prev = croniter(cron, tick).get_prev(datetime)
    nxt = croniter(cron, tick).get_next(datetime)
    return Due(tick, prev, nxt)
