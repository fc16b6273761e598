"""Fault injection: each fault against a real local Ray, on a tiny sweep, then one table (not a
test; tests/orchestrator/test_faults.py asserts the rows the other tests do not cover).

    python bench/faults.py [--only NAME ...] [--out DIR]

Goal: every fault survived (resumed) or refused clearly, and data lost = 0 in every row. "Data
lost" counts finished trials missing from results.parquet or MLflow, subnets that do not load,
and checkpoints that no longer load; "results intact" gives, for the sweep the fault hit, the
finished trials found in results.parquet, in MLflow (a FINISHED run with its model) and with a
loadable subnet. The drivers (tests/orchestrator/fault_drivers.py) are the tests' own. The
table is markdown, ready for the README. About 9 minutes on 2 cores; exit 1 if a row failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# the fault drivers are shared with the tests, which the installed package does not include
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.orchestrator import fault_drivers as faults  # noqa: E402
from tests.orchestrator.faults import Row  # noqa: E402

IN_PROCESS = ("search", "finetune", "export", "driver")  # on this process's own Ray
DRIVERS: dict[str, tuple[str, Callable[[Path, Path], list[Row]]]] = {
    **{w: (n, lambda b, c, w=w: [faults.killed_in_process(b, c, w)]) for n, w in zip(
        ("1", "2", "3", "4"), IN_PROCESS, strict=True)},
    "orchestrator": ("5, 8b", faults.orchestrator_killed),
    "mlflow": ("6a", lambda b, c: faults.mlflow_killed(b, c, "short")),
    "mlflow-down": ("6b", lambda b, c: faults.mlflow_killed(b, c, "long")),
    "disk": ("7", faults.disk_full),
    "two-sweeps": ("8a", faults.two_sweeps),
    "head": ("9", faults.head_restarted),
}
ORDER = {"1": 1, "2": 2, "3": 3, "4": 4, "5": 5, "6a": 6, "6b": 7, "7": 8, "8a": 9, "8b": 10,
         "9": 11}


def table(rows: list[tuple[str, Row]]) -> str:
    out = ["| # | fault | what happened | resumed | results intact | data lost |",
           "| --- | --- | --- | --- | --- | --- |"]
    for num, r in sorted(rows, key=lambda x: ORDER.get(x[0], 99)):
        flag = "" if r.ok else " **(FAILED)**"
        out.append(f"| {num} | {r.fault}{flag} | {r.happened} | {r.resumed} | {r.intact} | "
                   f"{r.lost} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=list(DRIVERS), metavar="NAME",
                   help=f"run only this fault (repeatable): {', '.join(DRIVERS)}")
    p.add_argument("--out", help="working folder (default: a new temporary one)")
    a = p.parse_args()
    base = Path(a.out or tempfile.mkdtemp(prefix="faults-")).resolve()
    cache = base / "cache"  # one dense model for every fault
    names = a.only or list(DRIVERS)
    print(f"[faults] {len(names)} fault driver(s), working in {base}", flush=True)
    rows: list[tuple[str, Row]] = []
    t_all = time.perf_counter()
    if any(n in IN_PROCESS for n in names):
        from orchestrator.ray_setup import start_ray

        start_ray()
    for name in sorted(names, key=lambda n: n not in IN_PROCESS):  # then Ray can go
        if name not in IN_PROCESS:
            import ray

            ray.shutdown()
        num, driver = DRIVERS[name]
        print(f"[faults] {num}: {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            (base / name).mkdir(parents=True, exist_ok=True)
            got = driver(base / name, cache)
        except Exception as e:  # noqa: BLE001 - a driver that breaks is a row too
            got = [Row(name, f"driver failed: {type(e).__name__}: {str(e)[:300]}", "no", "-",
                       -1, 0, time.perf_counter() - t0, False)] * len(num.split(", "))
        for n, r in zip(num.split(", "), got, strict=True):
            print(f"[faults] {n}: {r.fault}: {r.happened} | resumed {r.resumed} | {r.intact} | "
                  f"lost {r.lost} | {'ok' if r.ok else 'FAILED'} ({r.seconds:.0f} s)", flush=True)
            rows.append((n, r))
    print(f"\n{table(rows)}\n\n[faults] {sum(r.ok for _, r in rows)} of {len(rows)} row(s) "
          f"survived or refused clearly, data lost in total: {sum(r.lost for _, r in rows)}; "
          f"{time.perf_counter() - t_all:.0f} s", flush=True)
    return 0 if all(r.ok for _, r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
