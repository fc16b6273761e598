"""A Ray Tune sweep of searches, sampled by Optuna: one trial = search -> fine-tune -> eval.

Layout (Ray Train V2 with Tune): each Tune trial runs a small function (the trial driver, no
CPU request) that builds the Ray Train runs of its phases and reports their results with
`ray.tune.report` once, at the end (Tune checks that every report holds the objectives).
The dense model is trained (or found cached) once, before the sweep, and
every trial starts from it. Trial outputs go to `<output_dir>/<name>/trials/<trial_id>/`; Train
run names come from the trial's settings, so a restored trial resumes its checkpoints.

Resume: running the same command again restores the Tune experiment (`Tuner.restore`): finished
trials are kept, unfinished ones resume. The Optuna study lives in an SQLite file beside it
(`<output_dir>/<name>/optuna.db`, study name = sweep name) so it can be inspected with Optuna.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ray import tune

from orchestrator import report
from orchestrator.config import Config
from orchestrator.phases import (
    PretrainResult,
    load_cached,
    run_finetune,
    run_search,
    trial_result,
)
from orchestrator.records import OBJECTIVE_TOP1, TrialRecord
from orchestrator.results import ResultsCallback, write_results
from orchestrator.sweep_space import to_optuna
from orchestrator.tracking import Tracker, TrackingCallback

# The trial driver only waits on its Train runs. It asks for memory and no CPU: any CPU share
# (even 0.01) on top of 2 workers x 1 CPU never fits a 2-core machine, and {"CPU": 0} raises.
DRIVER_RESOURCES = {"memory": 64 * 1024**2}


def trial_driver(params: dict[str, Any], base: dict[str, Any], dense_dir: str,
                 trials_dir: str) -> None:
    """One trial: the sampled `params` (dotted keys) applied to the sweep's base config."""
    t0 = time.perf_counter()
    trial_id = tune.get_context().get_trial_id()
    cfg = Config.model_validate(base).with_overrides(
        {**params, "name": f"trial-{trial_id}", "output_dir": trials_dir})
    dense = load_cached(Path(dense_dir))
    if dense is None:
        raise FileNotFoundError(f"the sweep's dense model is missing from {dense_dir}")
    callbacks = None
    if cfg.sweep.scheduler == "asha":
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]  # every search epoch reaches the scheduler
    search = run_search(cfg, dense, callbacks)
    tuned = run_finetune(cfg, search.subnet)
    tune.report(trial_result(cfg, search, tuned, time.perf_counter() - t0).tune_report())


def trials_that_fit(cfg: Config, resources: dict[str, float]) -> int:
    """How many trials run at once: the cluster's CPUs (GPUs) over one trial's needs."""
    s = cfg.scaling
    fit = int(resources.get("CPU", 0) // (s.num_workers * s.cpus_per_worker))
    if s.use_gpu:
        fit = min(fit, int(resources.get("GPU", 0) // (s.num_workers * s.gpus_per_worker)))
    if fit < 1:
        raise ValueError(
            f"one trial needs {s.num_workers} x {s.cpus_per_worker:g} CPU"
            + (f" and {s.num_workers} x {s.gpus_per_worker:g} GPU" if s.use_gpu else "")
            + f"; the cluster has {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} "
            "GPU: lower scaling.num_workers or scaling.cpus_per_worker")
    wanted = cfg.sweep.max_concurrent_trials if cfg.sweep else None
    return min(fit, wanted) if wanted else fit


def search_metrics(cfg: Config) -> tuple[list[str], list[str]]:
    """The metrics (and modes) the search algorithm ranks by. With sweep.max_macs the single
    objective top1 becomes `objective_top1`, which ranks infeasible trials below all others:
    the stored top-1 stays as measured."""
    sw = cfg.sweep
    if sw.max_macs is not None:
        return [OBJECTIVE_TOP1], ["max"]
    return [o.metric for o in sw.objectives], [o.mode for o in sw.objectives]


def _search_alg(cfg: Config, sweep_dir: Path):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sw = cfg.sweep
    metrics, modes = search_metrics(cfg)
    storage = optuna.storages.RDBStorage(f"sqlite:///{sweep_dir / 'optuna.db'}")
    sampler = (optuna.samplers.NSGAIISampler(seed=sw.seed) if len(metrics) > 1
               else optuna.samplers.TPESampler(seed=sw.seed))
    return OptunaSearch(
        space=to_optuna(sw.space), metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0], points_to_evaluate=sw.points_to_evaluate
        or None, sampler=sampler, study_name=cfg.name, storage=storage, seed=None)


def run_sweep(cfg: Config, dense: PretrainResult, resources: dict[str, float]) -> list[dict]:
    """Run (or resume) the sweep; returns one row per finished trial (`TrialRecord.row()`)."""
    if cfg.sweep is None:
        raise ValueError("run_sweep needs a config with a `sweep` section")
    sweep_dir = cfg.run_dir
    sweep_dir.mkdir(parents=True, exist_ok=True)
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, base=cfg.model_dump(), dense_dir=str(dense.path),
                             trials_dir=str(sweep_dir / "trials")),
        DRIVER_RESOURCES)
    concurrent = trials_that_fit(cfg, resources)
    space_keys = list(cfg.sweep.space)
    dense_info = report.Dense(dense.metrics.get("test_top1"), dense.macs,
                              dense.cost.device_hours, dense.cost.device_kind)
    (sweep_dir / "dense.json").write_text(json.dumps(
        {**vars(dense_info), "path": str(dense.path)}, indent=2))
    callbacks: list[tune.Callback] = []
    tracker = None
    if cfg.mlflow.enabled:
        tracker = Tracker(cfg)
        tracker.start_sweep(dense)
        print(f"[mlflow] sweep run {tracker.parent_id} in experiment "
              f"{cfg.mlflow.experiment or cfg.name!r} at {tracker.uri}", flush=True)
        callbacks.append(TrackingCallback(tracker, dense.cost.device_hours
                                          / cfg.sweep.num_samples))
    callbacks.append(ResultsCallback(sweep_dir / "results.parquet", space_keys,
                                     run_id=callbacks[0].run_id if callbacks else None))
    scheduler = None
    if cfg.sweep.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        # Per-epoch search reports carry val_top1, not the final objectives.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        scheduler = ASHAScheduler(
            metric="val_top1", mode="max", time_attr="training_iteration",
            grace_period=cfg.sweep.asha_grace_epochs,
            reduction_factor=cfg.sweep.asha_reduction_factor,
            max_t=max(1, math.ceil(cfg.search.epochs)) + 1)
    path = sweep_dir / "tune" / cfg.name
    if tune.Tuner.can_restore(str(path)):
        print(f"[sweep] resuming {path}", flush=True)
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        print(f"[sweep] {cfg.sweep.num_samples} trial(s), up to {concurrent} at once, "
              f"objectives {[(o.metric, o.mode) for o in cfg.sweep.objectives]}", flush=True)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=_search_alg(cfg, sweep_dir),
                                        scheduler=scheduler,
                                        num_samples=cfg.sweep.num_samples,
                                        max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(
                name=cfg.name, storage_path=str(sweep_dir / "tune"), callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=cfg.sweep.trial_max_failures),
                verbose=1),
        )
    grid = tuner.fit()
    stopped = sum(1 for r in grid if r.error is None and (r.metrics or {}).get("phase") != "done")
    print(f"[sweep] {len(grid)} trial(s): {len(grid) - stopped - grid.num_errors} finished, "
          f"{stopped} stopped early, {grid.num_errors} failed", flush=True)
    records = []
    for r in grid:
        m = r.metrics or {}
        if m.get("phase") != "done":
            continue
        records.append(TrialRecord.from_tune(m, r.config, cfg.sweep.space))
    if tracker is not None:
        tracker.attach(tracker.parent_id)
        for rec in records:
            rec.mlflow_run_id = tracker.children.get(rec.trial_id)
        for alias, where in tracker.register_best(records).items():
            print(f"[mlflow] registry alias {alias}: {where}", flush=True)
    write_results(sweep_dir / "results.parquet", records, space_keys)  # restored trials too
    rep = report.build(records, dense_info)
    files = report.write(rep, records, dense_info, sweep_dir / "report", cfg.name)
    if tracker is not None:
        tracker.finish_sweep(rep.metrics, files)
    print(f"\n{rep.text}\n   report: {sweep_dir / 'report'} (table.txt, comparison.json, "
          "pareto.png)", flush=True)
    return [rec.row() for rec in records]


def format_table(rows: list[dict], keys: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v / 1e6:.2f}M"
        if isinstance(v, int) and v >= 10**5:
            return f"{v / 1e6:.2f}M"
        return str(v)

    table = [keys] + [[cell(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                     for row in table)
