"""One Ray Train run per trial: search, extraction and fine-tune in one worker group.

Run as two Train runs, a trial paid a second worker-group start-up and a second data load
(21-24 s of a 140 s trial on a 2-core machine). Here the search's workers go on to fine-tune
the subnet they exported (trainers/search.py `_finetune`); every checkpoint after the
extraction holds the search's result beside the fine-tune's state, so a worker killed at any
point resumes where it was, and the driver stores both phases from the last checkpoint exactly
as the separate runs do (`<run_dir>/search/`, `<run_dir>/finetune/`). Phase costs stay apart:
each phase's device-hours are its workers' loop seconds; the one driver wall time is shared
(`PhaseCost.shared_run`).

A sweep with the ASHA scheduler keeps two runs: its Tune callback must see search epochs only.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import Config
from orchestrator.phases import (
    FinetuneResult,
    PretrainResult,
    SearchResult,
    equal_training,
    finished_phase,
    fit_phase,
    run_finetune,
    run_search,
    store_finetune,
    store_search,
    target_text,
)
from trainers.search import FINETUNE_DIR, SUBNET_DIR, search_loop


def run_trial(cfg: Config, dense: PretrainResult, callbacks: list | None = None
              ) -> tuple[SearchResult, FinetuneResult]:
    """Search then fine-tune from the dense weights, in one Train run unless `callbacks` (a
    Tune scheduler's) or an already finished search ask for separate runs."""
    if callbacks or finished_phase(cfg.run_dir / "search", cfg.search_key(), "search"):
        search = run_search(cfg, dense, callbacks)
        return search, run_finetune(cfg, search.subnet)
    ft = equal_training(cfg)
    name = f"trial-{ft.finetune_key()}"  # covers the search's settings: a rerun resumes it
    print(f"[trial] {cfg.search.method} search, target {target_text(cfg)}, then "
          f"{ft.finetune.epochs:g} fine-tune epoch(s), on {cfg.scaling.num_workers} worker(s) "
          f"in one run ({name})", flush=True)
    result, wall = fit_phase(ft, search_loop, {"train": ft.worker_dict(), "finetune": True,
                                               "dense": str(dense.path / "model.safetensors")},
                             name, cfg.run_dir / "ray")
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        search = store_search(cfg, d, wall, shared_run=True)
        tuned = store_finetune(ft, d / FINETUNE_DIR, d / SUBNET_DIR, wall, shared_run=True)
    return search, tuned
