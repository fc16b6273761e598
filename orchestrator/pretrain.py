"""The dense pretrain phase: one Ray Train run per distinct (model, data, recipe) hash, cached.

A finished dense model is copied to `<cache>/dense/<hash>/` (weights in safetensors, arch.json,
result.json); later runs and every trial of a sweep start from it. An interrupted pretrain
resumes from its last epoch checkpoint: the Train run name is the hash, so rerunning the same
command finds the same run in the same storage path.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer

from orchestrator.config import Config
from trainers.supervised import supervised_loop


@dataclass
class PhaseCost:
    """Device-hours of one phase: devices x wall time of the worker loops (all attempts)."""

    device_kind: str  # "gpu" or "cpu_core"
    devices: float
    worker_seconds: float
    driver_seconds: float

    @property
    def device_hours(self) -> float:
        return self.devices * self.worker_seconds / 3600


@dataclass
class PretrainResult:
    path: Path  # cache folder: model.safetensors + arch.json + result.json
    metrics: dict[str, Any]
    cost: PhaseCost
    cached: bool

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "cached": self.cached, "metrics": self.metrics,
                "cost": {**asdict(self.cost), "device_hours": self.cost.device_hours}}


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
    cost = PhaseCost(c["device_kind"], c["devices"], c["worker_seconds"], c["driver_seconds"])
    return PretrainResult(folder, blob["metrics"], cost, cached=True)


def run_pretrain(cfg: Config) -> PretrainResult:
    """Train the dense model through Ray Train, or return the cached one."""
    key = cfg.pretrain_key()
    folder = cfg.cache_path / "dense" / key
    if cfg.pretrain.cache and (hit := load_cached(folder)) is not None:
        print(f"[pretrain] cache hit {folder}", flush=True)
        return hit
    print(f"[pretrain] training dense {cfg.model.name} on {cfg.data.dataset} with "
          f"{cfg.scaling.num_workers} worker(s) (run pretrain-{key})", flush=True)
    trainer = TorchTrainer(
        supervised_loop,
        train_loop_config={"train": cfg.worker_dict(), "phase": "pretrain", "init": None},
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=f"pretrain-{key}",
            storage_path=str(cfg.cache_path / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"dense pretrain pretrain-{key} finished without a checkpoint")
    kind, devices = devices_of(cfg)
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / "state.json").read_text())
        metrics = state["metrics"]
        cost = PhaseCost(kind, devices, state["elapsed_s"], wall)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in ("model.safetensors", "arch.json"):
            shutil.copy2(Path(d) / name, tmp / name)
    out = PretrainResult(folder, metrics, cost, cached=False)
    (tmp / "result.json").write_text(json.dumps(out.summary(), indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # atomic: a cache folder is complete or absent
    return out
