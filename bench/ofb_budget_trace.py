"""Trace a short OFB search on the tiny test ViT, epoch by epoch (not a test; issue 12 WIP):
expected / current MACs over the target, live candidates, finished modules, the MACs weight.

    python bench/ofb_budget_trace.py 0.5 "{'macs_tolerance': 0.02}"
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.trainers.test_ofb import _setup  # noqa: E402
from trainers.loop import train_one_epoch  # noqa: E402


def main() -> None:
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 0.5
    extra = ast.literal_eval(sys.argv[2]) if len(sys.argv) > 2 else {}
    method, model, opt, loader = _setup(budget=budget, ofb=extra)
    n = len(loader)
    for epoch in range(20):
        st = train_one_epoch(model, loader, opt, None, torch.device("cpu"), method=method,
                             step_offset=epoch * n, label_smoothing=0.1)
        m = method.metrics(model)
        print(f"{epoch:2d} expected/target {m['expected_macs'] / method.target_macs:.3f} "
              f"current/target {m['current_macs'] / method.target_macs:.3f} "
              f"live {m['live_candidates']} finished {m['finished_modules']} "
              f"w {m['macs_loss_weight']:.1f} top1 {st.top1:.2f}", flush=True)
        if method.finished(model):
            break


if __name__ == "__main__":
    main()
