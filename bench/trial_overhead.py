"""Per-trial overhead: a trial's wall time minus its workers' training loops, measured in one
run for the two layouts on the embedded Ray (not a test; prints, asserts nothing):

- two Train runs (search, then fine-tune: a second worker-group start-up and data load);
- one Train run per trial (orchestrator/trial_run.py, what `orchestrator.run` and sweeps use).

    python bench/trial_overhead.py [--workers 2] [key=value ...]   # config overrides

Goal: <= 5 s of overhead per trial on this machine. The dense model is trained (or found
cached) first, in a temporary output folder unless `output_dir=...` is given.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from orchestrator.config import load_config
from orchestrator.phases import run_finetune, run_pretrain, run_search
from orchestrator.ray_setup import start_ray
from orchestrator.trial_run import run_trial

QUICK = {"data.max_train_samples": 1280, "data.max_eval_samples": 500, "pretrain.epochs": 1,
         "search.epochs": 1, "finetune.epochs": 1, "sweep": None, "mlflow.enabled": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = p.parse_args()
    out = tempfile.mkdtemp(prefix="trial-overhead-")
    base = {**QUICK, "output_dir": out, "scaling.num_workers": a.workers}
    dots = [f"{k}={'null' if v is None else v}" for k, v in base.items()] + a.overrides
    start_ray()
    dense = run_pretrain(load_config(None, [*dots, "name=dense"]))
    rows = []
    for layout in ("two runs", "one run"):
        cfg = load_config(None, [*dots, f"name=bench-{layout.replace(' ', '-')}"])
        t0 = time.perf_counter()
        if layout == "two runs":
            search = run_search(cfg, dense)
            tuned = run_finetune(cfg, search.subnet)
        else:
            search, tuned = run_trial(cfg, dense)
        wall = time.perf_counter() - t0
        loops = search.cost.worker_seconds + tuned.cost.worker_seconds
        rows.append((layout, wall, loops, wall - loops))
    print(f"\nper-trial overhead, {a.workers} worker(s), {search.final['epoch']} search + "
          f"{len(tuned.history)} fine-tune epoch(s):")
    print(f"  {'layout':<10} {'trial wall s':>12} {'loops s':>8} {'overhead s':>11}")
    for layout, wall, loops, over in rows:
        print(f"  {layout:<10} {wall:>12.1f} {loops:>8.1f} {over:>11.1f}")
    print(f"  one run saves {rows[0][3] - rows[1][3]:.1f} s per trial (goal: overhead <= 5 s)")


if __name__ == "__main__":
    main()
