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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from orchestrator import locks, report
from orchestrator.config import ClusterShape, Config
from orchestrator.phases import PretrainResult, load_cached, trial_result
from orchestrator.records import OBJECTIVE_TOP1, TrialRecord
from orchestrator.results import ResultsCallback, write_results
from orchestrator.sweep_space import to_optuna
from orchestrator.tracking import Tracker
from orchestrator.tracking_callback import TrackingCallback
from orchestrator.trial_run import run_trial

# The trial driver only waits on its Train runs. It asks for memory and no CPU: any CPU share
# (even 0.01) on top of 2 workers x 1 CPU never fits a 2-core machine, and {"CPU": 0} raises.
DRIVER_RESOURCES = {"memory": 64 * 1024**2}
# A cluster whose head offers this custom resource (cluster.yaml, the RayCronJob manifest) gets
# its trial drivers pinned there: a driver on a spot node would take its trial down with it (G5).
DRIVER_NODE = "ofb_driver"


def driver_resources(resources: dict[str, float]) -> dict[str, float]:
    """What one trial driver asks for on a cluster with these total `resources`."""
    return {**DRIVER_RESOURCES, **({DRIVER_NODE: 1} if resources.get(DRIVER_NODE) else {})}


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
    search, tuned = run_trial(cfg, dense, callbacks)
    tune.report(trial_result(cfg, search, tuned, time.perf_counter() - t0).tune_report())


def trials_that_fit(cfg: Config, resources: dict[str, float],
                    shape: ClusterShape | None = None) -> int:
    """How many trials run at once; `sweep.max_concurrent_trials` caps it in every case.

    `resources` are the nodes up now (`ray.cluster_resources()` counts live nodes only), `shape`
    what the cluster can grow to (`cluster_shape`; None: unknown). With a shape: as many trials
    as fit at full size (the autoscaler starts nodes for the waiting workers; CPU-only trials
    count the nodes without GPUs only), and a ValueError only when one trial can never fit.
    Without one, a missing GPU never raises (GPU nodes usually scale up from zero): 1 trial at
    a time unless `max_concurrent_trials` says more; a CPU shortfall raises unless it is set.
    """
    s = cfg.scaling
    per_worker = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    now = min(math.floor(resources.get(k, 0) / (q * s.num_workers) + 1e-9)
              for k, q in per_worker.items())
    wanted = cfg.sweep.max_concurrent_trials if cfg.sweep else None
    need = (f"{s.num_workers} x {s.cpus_per_worker:g} CPU"
            + (f" and {s.num_workers} x {s.gpus_per_worker:g} GPU" if s.use_gpu else ""))
    have = f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"
    if shape is not None:
        most = shape.max_placeable(per_worker) // s.num_workers
        if most < 1:
            nodes = [shape.head] * bool(shape.head) + list(shape.workers)
            why = ("one worker fits on no node" if not any(
                shape.per_node(t, per_worker) for t in nodes) else
                f"at most {shape.max_placeable(per_worker)} of its workers fit at full size")
            raise ValueError(
                f"one trial needs {need}, and the cluster can never hold it ({why}; "
                f"{shape.describe()}): lower scaling.num_workers, scaling.cpus_per_worker or "
                "scaling.gpus_per_worker, or give the cluster a node type that fits")
        if not s.use_gpu:  # CPU trials: size by the nodes without GPUs, if one fits there
            most = max(1, shape.without_gpus().max_placeable(per_worker) // s.num_workers)
        fit, source = max(now, most), "what fits once the autoscaler has added nodes"
    elif now >= 1:
        fit, source = now, ""
    elif wanted or s.use_gpu and resources.get("GPU", 0) < s.num_workers * s.gpus_per_worker:
        # no GPU node up yet (or the user says the cluster grows), and no autoscaler config
        fit = wanted or 1
        source = ("sweep.max_concurrent_trials" if wanted else "no autoscaler config found "
                  "to size it by; set sweep.max_concurrent_trials for more")
    else:
        raise ValueError(
            f"one trial needs {need}; the cluster has {have}: lower scaling.num_workers or "
            "scaling.cpus_per_worker (on a cluster that autoscales, set "
            "sweep.max_concurrent_trials to start anyway)")
    if wanted and wanted < fit:
        fit, source = wanted, "sweep.max_concurrent_trials"
    if fit > now:
        print(f"[sweep] the nodes up now ({have}) fit {now} trial(s) of {need}: running {fit} "
              f"at once ({source}); Ray's autoscaler starts nodes for the waiting workers",
              flush=True)
    return fit


# The autoscaler config `ray up` writes on the head node.
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def cluster_shape(cfg: Config, resources: dict[str, float]) -> ClusterShape | None:
    """What the cluster can grow to: this machine alone when Ray runs embedded; on a cluster the
    node types of the autoscaler config `ray up` leaves on the head (where Tune looks too);
    None when there is none (a cluster of unknown size)."""
    from orchestrator.ray_setup import resolve_address

    if resolve_address(cfg.ray.address) is None:
        return ClusterShape.fixed(resources)
    try:
        return ClusterShape.from_launcher(yaml.safe_load(BOOTSTRAP_CONFIG.expanduser().read_text()))
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return None


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


class SweepBusyError(SystemExit):
    """Another process is running a sweep in the same folder. A SystemExit so that
    `python -m orchestrator.run` stops with this one line instead of a traceback."""


LOCK_FILE = ".sweep.lock"


@contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """Hold the sweep folder for this process. Two sweeps in one folder would share its Tune
    experiment, Optuna study and results.parquet; the second is refused naming the first."""
    with ExitStack() as stack:
        try:
            stack.enter_context(locks.hold(sweep_dir / LOCK_FILE))
        except locks.Busy as e:
            raise SweepBusyError(
                f"error: {sweep_dir} is in use by another sweep ({e.holder}); wait for it to "
                "end, or give this one another name (name=...) or output_dir") from None
        yield


def run_sweep(cfg: Config, dense: PretrainResult, resources: dict[str, float]) -> list[dict]:
    """Run (or resume) the sweep; returns one row per finished trial (`TrialRecord.row()`).
    Refused (SweepBusyError) while another process runs a sweep in the same folder."""
    if cfg.sweep is None:
        raise ValueError("run_sweep needs a config with a `sweep` section")
    with sweep_lock(cfg.run_dir):
        return _run_sweep(cfg, dense, resources)


def _run_sweep(cfg: Config, dense: PretrainResult, resources: dict[str, float]) -> list[dict]:
    sweep_dir = cfg.run_dir
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, base=cfg.model_dump(), dense_dir=str(dense.path),
                             trials_dir=str(sweep_dir / "trials")),
        driver_resources(resources))
    concurrent = trials_that_fit(cfg, resources, cluster_shape(cfg, resources))
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
        tracker.close_trials(records)  # run ids and registry aliases; an outage only warns
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
