"""A schedule's slots compared over time: `python -m orchestrator.report --schedule NAME
[--output-dir DIR] [--last N]` (../shared/SCHEDULING.md section 2, "Comparing slots").

Each slot's sweep folder `<output_dir>/<schedule>-<slot>/` holds its own results.parquet; no
MLflow is needed. Per slot and group (method with its variant, budget): top-1 after and before
fine-tune, MACs of dense, search cost, the change against the previous slot and against the
mean of the earlier slots. A change beyond k (default 2) seed standard deviations (the two
slots' own spread over seeds, pooled) is flagged '!': a night that really moved, not noise.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from orchestrator import report
from orchestrator.report_sources import from_folder, parent_of_folder
from orchestrator.schedules.slots import slot_time


def slot_folders(output_dir: str | Path, schedule: str) -> list[tuple[str, Path]]:
    """(slot, folder) of every slot with results, oldest first."""
    out = []
    for f in Path(output_dir).expanduser().glob(f"{schedule}-*"):
        slot = f.name[len(schedule) + 1:]
        try:
            slot_time(slot)
        except ValueError:
            continue  # another schedule's prefix, or not a slot folder
        if (f / "results.parquet").is_file():
            out.append((slot, f))
    return sorted(out)


def over_slots(output_dir: str | Path, schedule: str, last: int | None = None,
               k: float = 2.0) -> list[dict[str, Any]]:
    """One row per (slot, group) with its deltas; the last `last` slots (all earlier ones still
    feed the rolling mean)."""
    history: dict[tuple[str, str], list[dict[str, Any]]] = {}
    rows = []
    for slot, folder in slot_folders(output_dir, schedule):
        recs, dense = from_folder(folder)
        for g in report.build(recs, dense).groups:
            key = (g["label"], g["budget"])
            earlier = history.setdefault(key, [])
            row = {"slot": slot, "group": g["label"], "budget": g["budget"],
                   "trials": g["trials"], "top1": g["top1_mean"], "sd": g["top1_sd"],
                   "before_ft": g["top1_before_ft"], "of_dense": g["macs_of_dense"],
                   "search_h": sum(v for n, v in g.items() if n.startswith("search_")
                                   and isinstance(v, float)),
                   "delta": None, "delta_mean": None, "flag": False}
            if earlier:
                prev = earlier[-1]
                row["delta"] = row["top1"] - prev["top1"]
                row["delta_mean"] = row["top1"] - statistics.fmean(e["top1"] for e in earlier)
                sds = [s for s in (row["sd"], prev["sd"]) if s is not None]
                if sds:
                    pooled = math.sqrt(sum(s * s for s in sds) / len(sds))
                    row["flag"] = abs(row["delta"]) > k * pooled
            earlier.append(row)
            rows.append(row)
    if last is not None:
        keep = sorted({r["slot"] for r in rows})[-last:]
        rows = [r for r in rows if r["slot"] in keep]
    return rows


def render(rows: list[dict[str, Any]], k: float = 2.0) -> str:
    def pct(v: float | None, sign: bool = False) -> str:
        return "-" if v is None else f"{v * 100:+.2f}" if sign else f"{v * 100:.2f}%"

    head = ["slot", "group", "budget", "trials", "top-1", "before FT", "MACs", "vs previous",
            "vs mean", "search h"]
    body = [[r["slot"], r["group"], r["budget"], str(r["trials"]), pct(r["top1"]),
             pct(r["before_ft"]), pct(r["of_dense"]),
             pct(r["delta"], True) + (" !" if r["flag"] else ""), pct(r["delta_mean"], True),
             f"{r['search_h']:.4f}"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
             for line in [head, *body]]
    return "\n".join([*lines, f"   changes in top-1 points; '!' = beyond {k:g} seed standard "
                      "deviations of the two slots (pooled)"])


def log_deltas(rows: list[dict[str, Any]], output_dir: str, schedule: str,
               uri: str | None) -> list[str]:
    """Each slot's changes as metrics of its MLflow parent run (`slot_delta_top1/<group>/
    <budget>`, `slot_delta_mean_top1/...`, `slot_flag/...`); the run ids logged to."""
    from mlflow import MlflowClient

    from orchestrator.tracking import log_metrics

    folders = dict(slot_folders(output_dir, schedule))
    per_slot: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["delta"] is None:
            continue
        name = "/".join(re.sub(r"[^A-Za-z0-9_.\-]", "_", str(x)) for x in (r["group"],
                                                                           r["budget"]))
        per_slot.setdefault(r["slot"], {}).update({
            f"slot_delta_top1/{name}": r["delta"],
            f"slot_delta_mean_top1/{name}": r["delta_mean"], f"slot_flag/{name}": float(r["flag"])})
    logged = []
    for slot, metrics in per_slot.items():
        run_id, where = parent_of_folder(folders[slot], uri)
        if run_id and where:
            log_metrics(MlflowClient(where), run_id, metrics)
            logged.append(run_id)
    return logged


def main(schedule: str, output_dir: str, last: int | None, uri: str | None = None,
         log: bool = True) -> int:
    """`orchestrator.report --schedule`: print the slots' table and log each slot's changes to
    its parent run; 2 when there is no slot."""
    rows = over_slots(output_dir, schedule, last)
    if not rows:
        print(f"error: no slot of schedule {schedule!r} with results under {output_dir} "
              f"(folders {schedule}-<YYYYMMDDTHHMMZ>/results.parquet)", file=sys.stderr)
        return 2
    print(render(rows))
    if log and (runs := log_deltas(rows, output_dir, schedule, uri)):
        print(f"  logged the changes to {len(runs)} slot parent run(s) in MLflow")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schedule", help="compare this schedule's slots over time instead "
                   "(--output-dir, --last N)")
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--last", type=int, help="with --schedule: only the last N slots")
