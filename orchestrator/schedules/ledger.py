"""The ledger of a schedule's slots on the shared output folder: the source of truth for "run
each slot once" (Ray's job table forgets ids with its head).

One JSON file per slot, `<output_dir>/schedules/<schedule>/<slot>.json`. A claim writes the
whole entry to a temporary file and hard-links it to the slot's name: `link` fails with EEXIST
when another claimer won, exactly like `open(O_CREAT | O_EXCL)`, but no reader ever sees a
half-written entry. Updates write a temporary file and rename it over the entry (atomic on
POSIX file systems and NFSv3+; uncertain on FUSE / object-store mounts, which a preflight
should test once on the real mount).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Ray's five job statuses, plus the ledger's own: SKIPPED (overlap policy), MISSED (past the
# starting deadline), LOST (submitted, but Ray no longer knows the job and its head restarted)
STATUSES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED", "SKIPPED", "MISSED", "LOST")
FINAL = ("SUCCEEDED", "STOPPED", "SKIPPED", "MISSED")


class Ledger:
    def __init__(self, output_dir: str | os.PathLike, schedule: str):
        self.dir = Path(output_dir) / "schedules" / schedule
        self.schedule = schedule

    def path(self, slot: str) -> Path:
        return self.dir / f"{slot}.json"

    def _temp(self, entry: dict[str, Any]) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def claim(self, slot: str, entry: dict[str, Any]) -> bool:
        """Create the slot's entry; False if it already exists (another claimer won)."""
        tmp = self._temp({"slot": slot, "schedule": self.schedule, **entry})
        try:
            os.link(tmp, self.path(slot))
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def read(self, slot: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(slot).read_text())
        except FileNotFoundError:
            return None

    def update(self, slot: str, change: Callable[[dict[str, Any]], dict[str, Any]]
               ) -> dict[str, Any]:
        """Replace the slot's entry by `change(entry)` (atomic rename; the slot must exist)."""
        entry = self.read(slot)
        if entry is None:
            raise FileNotFoundError(f"{self.path(slot)}: slot {slot} was never claimed")
        new = change(dict(entry))
        os.replace(self._temp(new), self.path(slot))
        return new

    def slots(self) -> list[str]:
        """Every claimed slot, oldest first (slot ids sort by time)."""
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.json") if not p.name.startswith("."))
