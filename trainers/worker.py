"""The thin Ray Train adapter: everything a worker loop needs from Ray, in one place.

Inside a worker Ray is only: get_context, get_device, prepare_model, prepare_data_loader,
get_checkpoint and report. Results leave a worker only through `report` (a barrier: every rank
calls it the same number of times); only rank 0 writes the checkpoint folder.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.utils.data import DataLoader

from trainers.data import loader_workers, pin_memory_for, shard_loader
from trainers.loop import resolve_precision


@dataclass
class WorkerEnv:
    rank: int
    world_size: int
    device: torch.device
    precision: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _QuietRayTrain(logging.Filter):
    """Drop INFO records from Ray Train's own source files. `RunConfig.logging_config` quiets
    the `ray.train` loggers, but Train V2 logs every report ("Reporting training result ...", a
    metrics dict per rank per epoch) through a logger named by its file path, which reaches
    the root logger's console handler and drowns our progress lines."""

    root = str(Path(ray.train.__file__).parent)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.root)


def quiet_ray_train() -> None:
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, _QuietRayTrain) for f in h.filters):
            h.addFilter(_QuietRayTrain())


def setup_worker(scaling: Any, seed: int) -> WorkerEnv:
    """Threads, device, precision and seeds for this worker (and a quieter console)."""
    quiet_ray_train()
    ctx = ray.train.get_context()
    if not scaling.use_gpu:
        torch.set_num_threads(max(1, int(scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()
    torch.manual_seed(seed + ctx.get_world_rank())
    return WorkerEnv(ctx.get_world_rank(), ctx.get_world_size(), device,
                     resolve_precision(scaling.precision, device))


def node_id() -> str:
    """The Ray node this worker runs on (so a sweep can show where its trials ran)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def prepare_model(model: nn.Module, ddp_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Move to the worker's device and wrap in DDP when there is more than one worker
    (`ddp_kwargs`: the method's DistributedDataParallel options)."""
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs or None)


def loader_options(cfg: Any, device: torch.device) -> dict[str, Any]:
    """`make_loader` keywords for this worker's device from a TrainConfig: loader processes
    (`data.loader_workers`, "auto" resolved from `scaling.cpus_per_worker`) and pinned memory
    (CUDA only)."""
    return {"workers": loader_workers(cfg.data.loader_workers, cfg.scaling.cpus_per_worker,
                                      device),
            "pin_memory": pin_memory_for(device)}


def prepare_loader(loader: DataLoader, seed: int = 0) -> DataLoader:
    """Shard with a DistributedSampler, reshuffled per epoch through set_epoch, then let Ray
    move the batches to the worker's device.

    The sampler is ours (`shard_loader`), not Ray's: Ray rebuilds the loader without its
    persistent workers and prefetch settings, and seeds the sampler with torch's default 0, so
    every run would see the same batch order whatever its `seed` and a seed sweep of a
    deterministic method (ViT-Slim's zeta start at 1, Taylor scores, the fine-tune) would repeat
    one result.
    """
    ctx = ray.train.get_context()
    loader = shard_loader(loader, ctx.get_world_rank(), ctx.get_world_size(), seed)
    return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


@contextmanager
def latest_checkpoint() -> Iterator[Path | None]:
    """The folder of the run's latest reported checkpoint (after a restart), or None."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        yield None
        return
    with ckpt.as_directory() as d:
        yield Path(d)


def report(env: WorkerEnv, metrics: dict[str, Any],
           write_checkpoint: Callable[[Path], None] | None = None,
           upload: str = "SYNC") -> None:
    """Report metrics from every rank; rank 0 attaches a checkpoint written by the callback.
    `upload`: Ray's CheckpointUploadMode (ASYNC for large GPU checkpoints; SYNC on CPU)."""
    if write_checkpoint is None or not env.is_main:
        ray.train.report(metrics, checkpoint=None)
        return
    # Not a TemporaryDirectory (G6): with CheckpointUploadMode.ASYNC the upload reads the
    # folder after report() returns; Ray deletes it once uploaded, in either mode.
    d = tempfile.mkdtemp(prefix="ckpt-")
    write_checkpoint(Path(d))
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode[upload],
                     delete_local_checkpoint_after_upload=True)

