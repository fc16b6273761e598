"""Folder locks between processes on one machine (or one shared file system): a sweep folder is
held by one sweep, a dense cache entry is trained by one process while the others wait.

An flock on a file beside the work: the kernel releases it when the holder ends, however (a
SIGKILLed holder's rerun is never refused nor kept waiting), and its fd is not inherited by the
processes Ray starts. The file keeps the holder's pid, host and start time for the messages.
Reentrant within a process (a sweep's phases take the lock their caller already holds).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

_HELD: set[Path] = set()  # lock files this process holds


class Busy(Exception):
    """Another process holds the lock; `holder` says which ("pid N on HOST, since T")."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def _holder(f) -> str:
    f.seek(0)
    return f.read().strip() or "unknown process"


@contextmanager
def hold(lock_file: Path, wait: bool = False, on_wait: Callable[[str], None] | None = None,
         every_s: float = 30.0) -> Iterator[None]:
    """Hold `lock_file` for the block. Busy elsewhere: raise `Busy` (`wait=False`), or wait for
    it, calling `on_wait(holder)` at once and then every `every_s` seconds."""
    lock_file = lock_file.resolve()
    if lock_file in _HELD:
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock_file, "a+")
    try:
        said = -float("inf")
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    raise Busy(_holder(f)) from None
                if on_wait is not None and time.monotonic() - said >= every_s:
                    on_wait(_holder(f))
                    said = time.monotonic()
                time.sleep(0.5)
        _HELD.add(lock_file)
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}\n")
        f.flush()
        try:
            yield
        finally:
            _HELD.discard(lock_file)
    finally:
        f.close()  # releases the lock
