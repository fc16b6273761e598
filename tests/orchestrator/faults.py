"""Real faults for Ray tests: kill a Ray Train worker process once a run has checkpointed."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def kill_one_train_worker() -> int:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[
        ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert actors, "no live Ray Train worker to kill"
    pid = actors[-1].pid
    os.kill(pid, signal.SIGKILL)
    return pid


def run_and_kill_after_checkpoint(fn: Callable[[], Any], run_dir: Path,
                                  wait_s: float = 300, join_s: float = 900,
                                  pattern: str = "checkpoint_*/state.json") -> Any:
    """Run `fn` in a thread; SIGKILL one Train worker once a file matching `pattern` (default:
    the first checkpoint) appears in `run_dir`; return `fn`'s result (its exception is
    re-raised here)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = e

    th = threading.Thread(target=target)
    th.start()
    deadline = time.time() + wait_s
    while time.time() < deadline and not list(run_dir.glob(pattern)):
        time.sleep(0.1)
    assert list(run_dir.glob(pattern)), f"no {pattern} within {wait_s} s"
    time.sleep(0.5)  # let Ray register the checkpoint it just wrote
    kill_one_train_worker()
    th.join(timeout=join_s)
    assert not th.is_alive(), f"the run did not end within {join_s} s of the kill"
    if "error" in box:
        raise box["error"]
    return box["result"]
