"""Scheduled sweeps, their pure parts: slot ids and due ticks (croniter, real time zones), and
the ledger's claims (8 processes racing for one slot: exactly one wins)."""

from __future__ import annotations

import multiprocessing as mp
from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.schedules.ledger import Ledger
from orchestrator.schedules.slots import due, slot_id, slot_time, submission_id

UTC = timezone.utc


def test_slot_ids_are_utc_and_round_trip():
    d = due("0 2 * * *", "Etc/UTC", datetime(2026, 3, 1, 2, 0, tzinfo=UTC))
    assert d.slot == "20260301T0200Z"  # a tick exactly at now is due
    assert slot_time(d.slot) == d.tick and d.interval == timedelta(days=1)
    assert submission_id("nightly", d.slot, 1) == "ofb-nightly-20260301t0200z-a1"
    assert len(submission_id("a" * 24, d.slot, 99)) <= 63
    d = due("0 2 * * *", "Etc/UTC", datetime(2026, 3, 1, 1, 59, 59, tzinfo=UTC))
    assert d.slot == "20260228T0200Z"
    with pytest.raises(ValueError, match="YYYYMMDDTHHMMZ"):
        slot_time("2026-03-01")


def test_time_zones_and_dst_are_croniters():
    # 02:00 in New York is 07:00 UTC in winter, 06:00 in summer
    assert due("0 2 * * *", "America/New_York",
               datetime(2026, 1, 15, 12, tzinfo=UTC)).slot == "20260115T0700Z"
    assert due("0 2 * * *", "America/New_York",
               datetime(2026, 7, 15, 12, tzinfo=UTC)).slot == "20260715T0600Z"
    # Berlin's spring-forward day: 02:30 does not exist; croniter ticks at 03:00 local
    spring = due("30 2 * * *", "Europe/Berlin", datetime(2026, 3, 29, 12, tzinfo=UTC))
    assert spring.slot == "20260329T0100Z" and spring.tick.hour == 3
    # fall-back day: 02:30 happens twice, and ticks twice (an hour apart in UTC)
    fall = due("30 2 * * *", "Europe/Berlin", datetime(2026, 10, 25, 12, tzinfo=UTC))
    assert fall.slot == "20261025T0130Z" and slot_id(fall.previous) == "20261025T0030Z"


def test_bad_cron_and_naive_times_are_refused():
    with pytest.raises(ValueError, match="5-field cron"):
        due("0 25 * * *", "Etc/UTC", datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="5-field cron"):
        due("@daily", "Etc/UTC", datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="time zone"):
        due("0 2 * * *", "Etc/UTC", datetime(2026, 1, 1))


def _claim(args):
    root, i = args
    return Ledger(root, "nightly").claim("20260301T0200Z", {"claimer": i})


def test_eight_processes_race_for_one_slot_and_one_wins(tmp_path):
    with mp.get_context("spawn").Pool(8) as pool:
        won = pool.map(_claim, [(str(tmp_path), i) for i in range(8)])
    assert sum(won) == 1
    led = Ledger(tmp_path, "nightly")
    entry = led.read("20260301T0200Z")
    assert entry["claimer"] == won.index(True) and entry["schedule"] == "nightly"
    assert led.slots() == ["20260301T0200Z"]
    assert not [p for p in led.dir.iterdir() if p.name.startswith(".tmp-")]  # no leftovers


def test_ledger_updates_are_whole_entries(tmp_path):
    led = Ledger(tmp_path, "weekly")
    assert led.read("20260301T0200Z") is None and led.slots() == []
    with pytest.raises(FileNotFoundError, match="never claimed"):
        led.update("20260301T0200Z", lambda e: e)
    assert led.claim("20260301T0200Z", {"attempts": []})
    assert not led.claim("20260301T0200Z", {"attempts": ["other"]})
    led.update("20260301T0200Z", lambda e: {**e, "attempts": [{"status": "RUNNING"}]})
    assert led.read("20260301T0200Z")["attempts"] == [{"status": "RUNNING"}]
    assert led.claim("20260228T0200Z", {})
    assert led.slots() == ["20260228T0200Z", "20260301T0200Z"]


def _spec(**kw):
    from orchestrator.schedules.spec import ScheduleSpec

    return ScheduleSpec(**{"name": "nightly", "cron": "0 2 * * *", **kw})


def test_schedule_section_refuses_bad_values_with_their_names():
    from pydantic import ValidationError

    for bad, match in [({"cron": "0 2 * *"}, "5-field cron"),
                       ({"timezone": "Mars/Base"}, "IANA time zone"),
                       ({"name": "Nightly_1"}, "lowercase letters"),
                       ({"overlap": "never"}, "skip"), ({"catch_up": "all"}, "latest")]:
        with pytest.raises(ValidationError, match=match):
            _spec(**bad)


def test_reconcile_rules(tmp_path):
    from orchestrator.schedules.reconcile import decide

    led = Ledger(tmp_path, "nightly")
    at = datetime(2026, 3, 1, 2, 5, tzinfo=UTC)  # 5 min after the 02:00 tick
    slot = "20260301T0200Z"
    assert decide(_spec(), at, led, []).action == "submit"
    # overlap with yesterday's slot, still running
    prev = ["20260228T0200Z"]
    assert decide(_spec(), at, led, prev).action == "skip"
    assert decide(_spec(overlap="queue"), at, led, prev).action == "wait"
    rep = decide(_spec(overlap="replace"), at, led, prev)
    assert rep.action == "submit" and rep.stop == tuple(prev)
    assert decide(_spec(overlap="allow"), at, led, prev).action == "submit"
    # past the starting deadline: recorded as missed, never run late
    late = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    assert decide(_spec(), late, led, []).action == "missed"
    # catch_up none: only the first call after the tick runs it; after downtime, missed
    assert decide(_spec(catch_up="none"), at, led, [], period_s=600).action == "submit"
    back = datetime(2026, 3, 1, 3, 0, tzinfo=UTC)
    assert decide(_spec(catch_up="none"), back, led, [], period_s=600).action == "missed"
    assert decide(_spec(), back, led, [], period_s=600).action == "submit"  # latest: catch up
    # a claimed slot follows its last attempt
    led.claim(slot, {"attempts": [{"status": "RUNNING"}]})
    assert decide(_spec(), at, led, []).action == "refresh"
    led.update(slot, lambda e: {**e, "attempts": [{"status": "LOST"}]})
    again = decide(_spec(), at, led, [])
    assert (again.action, again.attempt) == ("submit", 2)
    led.update(slot, lambda e: {**e, "attempts": [{"status": "FAILED"}, {"status": "FAILED"}]})
    assert decide(_spec(max_attempts=2), at, led, []).action == "nothing"  # attempts used up
    led.update(slot, lambda e: {**e, "attempts": [{"status": "SUCCEEDED"}]})
    assert decide(_spec(), at, led, []).reason == "final: SUCCEEDED"
