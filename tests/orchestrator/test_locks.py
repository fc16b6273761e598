"""Folder locks between processes: refused or waited for, released when the holder dies."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import locks

HOLD = """
import sys, time
from pathlib import Path
from orchestrator import locks
with locks.hold(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def holder(lock: Path, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_held_lock_is_refused_naming_the_holder_then_free_once_it_is_killed(tmp_path):
    lock = tmp_path / "x.lock"
    p = holder(lock, 60)
    with pytest.raises(locks.Busy) as e:
        with locks.hold(lock):
            pass
    assert e.value.holder.startswith(f"pid {p.pid} on ")
    p.kill()  # SIGKILL: the kernel releases the lock
    p.wait()
    with locks.hold(lock):
        with locks.hold(lock):  # reentrant within a process
            pass


def test_a_waiter_says_who_it_waits_for_and_goes_on_when_the_holder_ends(tmp_path):
    lock = tmp_path / "sub" / "y.lock"
    p = holder(lock, 1.5)
    said: list[str] = []
    t0 = time.monotonic()
    with locks.hold(lock, wait=True, on_wait=said.append, every_s=0.5):
        waited = time.monotonic() - t0
        assert lock.read_text().startswith(f"pid {os.getpid()} ")
    p.wait()
    assert waited > 0.5 and len(said) >= 2, (waited, said)
    assert all(s.startswith(f"pid {p.pid} ") for s in said)
