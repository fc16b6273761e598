"""The phases of one trial, each a Ray Train run: dense pretrain (cached), search, fine-tune.

A finished dense model is copied to `<cache>/dense/<hash>/` (weights in safetensors, arch.json,
result.json); later runs and every trial of a sweep start from it. An interrupted pretrain
resumes from its last epoch checkpoint: the Train run name is the hash, so rerunning the same
command finds the same run in the same storage path.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer

from orchestrator import locks
from orchestrator.config import Config
from orchestrator.records import Hours, TrialRecord, unit
from trainers.methods import get_method
from trainers.search import SUBNET_DIR, search_loop
from trainers.supervised import supervised_loop


@dataclass
class PhaseCost:
    """Device-hours of one phase: devices x wall time of the worker loops (all attempts), in
    GPU-hours (`device_kind="gpu"`: workers x GPUs per worker) or CPU-core-hours ("cpu_core":
    workers x CPUs per worker). The two are different units and are never added together.

    A lower bound of what the phase occupied: only the time inside the worker loops counts
    (the epochs' training, the search's extraction), not evaluation (`eval_seconds`, reported
    on its own as `eval_device_hours`: a method's search cost must not depend on how often it
    is evaluated), Ray's start-up and
    scheduling, worker-group restarts (nor the work lost since the last checkpoint), building
    the data set and model before the loop, nor writing and uploading checkpoints.
    `driver_seconds`, the driver's wall time of the whole Train run, includes those."""

    device_kind: str  # "gpu" or "cpu_core"
    devices: float
    worker_seconds: float
    driver_seconds: float
    eval_seconds: float = 0.0  # the worker loops' evaluation, not in `worker_seconds`
    # True when search and fine-tune ran in one Train run (orchestrator/trial_run.py): then
    # `driver_seconds` is that whole run's, the same figure in both phases
    shared_run: bool = False

    @property
    def device_hours(self) -> float:
        """In `unit` (GPU-hours or CPU-core-hours)."""
        return self.devices * self.worker_seconds / 3600

    @property
    def unit(self) -> str:
        return unit(self.device_kind)

    @property
    def eval_device_hours(self) -> float:
        return self.devices * self.eval_seconds / 3600

    def hours(self) -> Hours:
        """{device_kind: device_hours}: what per-unit totals add up."""
        return {self.device_kind: self.device_hours}

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "device_hours": self.device_hours,
                "eval_device_hours": self.eval_device_hours, "unit": self.unit}


@dataclass
class PretrainResult:
    path: Path  # cache folder: model.safetensors + arch.json + result.json
    metrics: dict[str, Any]
    cost: PhaseCost
    cached: bool

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "cached": self.cached, "metrics": self.metrics,
                "cost": self.cost.summary()}

    @property
    def macs(self) -> int:
        from search_space.cost import cost_of
        from search_space.subnet import read_arch

        return cost_of(read_arch(self.path)).macs


def devices_of(cfg: Config) -> tuple[str, float]:
    s = cfg.scaling
    if s.use_gpu:
        return "gpu", s.num_workers * s.gpus_per_worker
    return "cpu_core", s.num_workers * s.cpus_per_worker


def scaling_config(cfg: Config) -> ray.train.ScalingConfig:
    s = cfg.scaling
    res = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        res["GPU"] = s.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                   resources_per_worker=res)


def load_cached(folder: Path) -> PretrainResult | None:
    f = folder / "result.json"
    if not f.exists():
        return None
    blob = json.loads(f.read_text())
    c = blob["cost"]
    cost = PhaseCost(c["device_kind"], c["devices"], c["worker_seconds"], c["driver_seconds"],
                     c.get("eval_seconds", 0.0))
    return PretrainResult(folder, blob["metrics"], cost, cached=True)


def fit_phase(cfg: Config, loop, loop_config: dict[str, Any], name: str,
              storage: Path, callbacks: list | None = None) -> tuple[ray.train.Result, float]:
    """Run one Ray Train phase; the deterministic `name` makes a rerun resume it."""
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None,
            # Train's INFO lines (a metrics dict per rank per report, worker-group set-up)
            # drown our progress lines; warnings and errors (a worker restart) still show,
            # and Ray's log files under the session folder keep everything
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    t0 = time.perf_counter()
    # On the main thread Train V2 installs a SIGINT handler that holds the run's controller:
    # left in place, it keeps the finished controller actor alive until the next main-thread
    # run replaces it. In one loaded test run such a leftover still held its placement group
    # (2 CPUs), and the sweep's next trial waited for CPUs for good.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        result = trainer.fit()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    wall = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint")
    return result, wall


def _write_atomic(folder: Path, fill) -> None:
    """Fill a temporary sibling folder, then rename: `folder` is complete or absent."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def run_pretrain(cfg: Config) -> PretrainResult:
    """Train the dense model through Ray Train, or return the cached one. One process at a time
    per cache entry: two sweeps that need the same dense model at once would share one Train
    run's storage and one temporary folder, so the second waits for the first's and then
    finds it cached."""
    folder = cfg.cache_path / "dense" / cfg.pretrain_key()

    def waiting(holder: str) -> None:
        print(f"[pretrain] waiting: {holder} is training this dense model ({folder})",
              flush=True)

    with locks.hold(folder.with_name(folder.name + ".lock"), wait=True, on_wait=waiting):
        return _pretrain(cfg, folder)


def _pretrain(cfg: Config, folder: Path) -> PretrainResult:
    key = folder.name
    if cfg.pretrain.cache and (hit := load_cached(folder)) is not None:
        print(f"[pretrain] cache hit {folder}", flush=True)
        return hit
    print(f"[pretrain] training dense {cfg.model.name} on {cfg.data.dataset} with "
          f"{cfg.scaling.num_workers} worker(s) (run pretrain-{key})", flush=True)
    result, wall = fit_phase(cfg, supervised_loop,
                             {"train": cfg.worker_dict(), "phase": "pretrain", "init": None},
                             f"pretrain-{key}", cfg.cache_path / "ray")
    kind, devices = devices_of(cfg)
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / "state.json").read_text())
        out = PretrainResult(folder, state["metrics"], PhaseCost(
            kind, devices, state["elapsed_s"], wall, state.get("eval_s", 0.0)), cached=False)

        def fill(tmp: Path) -> None:
            for name in ("model.safetensors", "arch.json"):
                shutil.copy2(Path(d) / name, tmp / name)
            (tmp / "result.json").write_text(json.dumps(out.summary(), indent=2))

        _write_atomic(folder, fill)
    return out


def finished_phase(out: Path, key: str, phase: str) -> dict[str, Any] | None:
    """The saved result of a phase run with the same settings, else None (it runs again)."""
    f = out / "result.json"
    if not f.exists():
        return None
    blob = json.loads(f.read_text())
    if blob.get("key") != key:
        print(f"[{phase}] {out} holds a run with other settings: running again", flush=True)
        return None
    print(f"[{phase}] already done with these settings: {out}", flush=True)
    return blob


@dataclass
class SearchResult:
    subnet: Path  # arch.json + model.safetensors
    final: dict[str, Any]
    history: list[dict[str, Any]]
    cost: PhaseCost


def run_search(cfg: Config, dense: PretrainResult, callbacks: list | None = None
               ) -> SearchResult:
    """Search from the dense weights; the subnet lands in `<run_dir>/search/subnet/`.

    `callbacks` go to the Train run (a sweep passes Tune's TuneReportCallback, so every search
    epoch reaches Tune's scheduler)."""
    out, key = cfg.run_dir / "search", cfg.search_key()
    if (blob := finished_phase(out, key, "search")) is not None:
        return SearchResult(out / SUBNET_DIR, blob["final"], blob["history"],
                            PhaseCost(**blob["cost"]))
    name = f"search-{key}"
    print(f"[search] {cfg.search.method} on {cfg.scaling.num_workers} worker(s), target "
          f"{target_text(cfg)} (run {name})", flush=True)
    result, wall = fit_phase(cfg, search_loop, {"train": cfg.worker_dict(),
                                                "dense": str(dense.path / "model.safetensors")},
                             name, cfg.run_dir / "ray", callbacks)
    with result.checkpoint.as_directory() as d:
        return store_search(cfg, Path(d), wall)


def target_text(cfg: Config) -> str:
    """The search's target as printed: '0.5 x dense MACs', '0.5 x dense latency', '1.2 GMACs'."""
    s = cfg.search
    if s.target_gmacs:
        return f"{s.target_gmacs:g} GMACs"
    return f"{s.budget:g} x dense {'latency' if s.budget_metric == 'latency' else 'MACs'}"


def store_search(cfg: Config, d: Path, wall: float, shared_run: bool = False) -> SearchResult:
    """Copy a finished search out of Train checkpoint folder `d` into `<run_dir>/search/`, its
    cost from the workers' seconds in its state and the Train run's `wall` time."""
    blob = json.loads((d / "state.json").read_text())
    cost = PhaseCost(*devices_of(cfg), blob["final"]["elapsed_s"], wall,
                     blob["final"].get("eval_s", 0.0), shared_run)
    blob.update(cost=asdict(cost), key=cfg.search_key())
    out = cfg.run_dir / "search"

    def fill(tmp: Path) -> None:
        shutil.copytree(d / SUBNET_DIR, tmp / SUBNET_DIR)
        (tmp / "result.json").write_text(json.dumps(blob, indent=2))

    _write_atomic(out, fill)
    return SearchResult(out / SUBNET_DIR, blob["final"], blob["history"], cost)


@dataclass
class FinetuneResult:
    path: Path
    metrics: dict[str, Any]
    cost: PhaseCost
    history: list[dict[str, Any]] = field(default_factory=list)


def equal_training(cfg: Config) -> Config:
    """The equal-training rule of a comparison: a method whose search trains no weights (the
    two-stage pruners score units, the control is the dense model) fine-tunes for
    `search.epochs + finetune.epochs`, so every method's weights get the same training."""
    if get_method(cfg.search.method).trains_weights:
        return cfg
    ft = cfg.finetune.model_copy(update={"epochs": cfg.finetune.epochs + cfg.search.epochs})
    return cfg.model_copy(update={"finetune": ft})


def run_finetune(cfg: Config, subnet: Path) -> FinetuneResult:
    """Fine-tune an exported subnet with `cfg.finetune` under the equal-training rule; weights
    in `<run_dir>/finetune/`."""
    cfg = equal_training(cfg)
    out, key = cfg.run_dir / "finetune", cfg.finetune_key()
    if (blob := finished_phase(out, key, "finetune")) is not None:
        return FinetuneResult(out, blob["metrics"], PhaseCost(**blob["cost"]),
                              blob.get("history", []))
    extra = "" if get_method(cfg.search.method).trains_weights else (
        f" ({cfg.search.epochs:g} of them for the search epochs that trained no weights)")
    print(f"[finetune] {cfg.finetune.epochs:g} epoch(s) of the subnet{extra}", flush=True)
    result, wall = fit_phase(cfg, supervised_loop, {"train": cfg.worker_dict(),
                                                    "phase": "finetune", "init": str(subnet)},
                             f"finetune-{key}", cfg.run_dir / "ray")
    with result.checkpoint.as_directory() as d:
        return store_finetune(cfg, Path(d), subnet, wall)


def store_finetune(cfg: Config, d: Path, subnet: Path, wall: float,
                   shared_run: bool = False) -> FinetuneResult:
    """Copy a finished fine-tune (Train checkpoint folder `d`, the subnet it started from)
    into `<run_dir>/finetune/`, its cost as `store_search`'s. `cfg` is the one the fine-tune
    ran with (`equal_training` applied)."""
    state = json.loads((d / "state.json").read_text())
    cost = PhaseCost(*devices_of(cfg), state["elapsed_s"], wall, state.get("eval_s", 0.0),
                     shared_run)
    blob = {"metrics": state["metrics"], "history": state.get("history", []),
            "cost": asdict(cost), "key": cfg.finetune_key()}
    out = cfg.run_dir / "finetune"

    def fill(tmp: Path) -> None:
        shutil.copy2(d / "model.safetensors", tmp / "model.safetensors")
        shutil.copy2(subnet / "arch.json", tmp / "arch.json")
        (tmp / "result.json").write_text(json.dumps(blob, indent=2))

    _write_atomic(out, fill)
    return FinetuneResult(out, blob["metrics"], cost, blob["history"])


def trial_result(cfg: Config, search: SearchResult, tuned: FinetuneResult,
                 wall: float) -> TrialRecord:
    """The record of one finished trial (search -> fine-tune): what Tune, results.parquet and
    MLflow receive. Top-1 is as measured; `feasible` alone says whether it met max_macs."""
    f = search.final
    feasible = cfg.sweep is None or cfg.sweep.max_macs is None or f["macs"] <= cfg.sweep.max_macs
    target = f.get("target_macs") or (cfg.search.target_gmacs * 1e9 if cfg.search.target_gmacs
                                      else cfg.search.budget * f["dense_macs"])
    return TrialRecord(
        method=cfg.search.method, target_macs=target, macs=f["macs"], params=f["params"],
        dense_macs=f["dense_macs"], top1=tuned.metrics["test_top1"], feasible=feasible,
        top1_before_finetune=f["test_top1_before_finetune"],
        search_device_hours=search.cost.device_hours,
        finetune_device_hours=tuned.cost.device_hours, subnet_path=str(search.subnet),
        search_eval_device_hours=search.cost.eval_device_hours,
        finetune_eval_device_hours=tuned.cost.eval_device_hours,
        argmax_modules=f.get("argmax_modules", 0),
        additions=json.dumps(f["additions"], sort_keys=True) if f.get("additions") else "",
        device_kind=search.cost.device_kind, node_id=f.get("node_id", ""),
        finetune_device_kind=(tuned.cost.device_kind  # e.g. a CPU search resumed on GPUs
                              if tuned.cost.device_kind != search.cost.device_kind else None),
        search_note=f.get("note", ""), trial_wall_s=wall,
        target_latency_ms=f.get("target_latency_ms"), latency_ms=f.get("latency_ms"),
        trial_overhead_s=wall - search.cost.worker_seconds - tuned.cost.worker_seconds,
        trial_dir=str(cfg.run_dir))
