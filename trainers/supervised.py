"""Supervised training phases run by Ray Train's TorchTrainer: dense pretrain and the fine-tune
of an extracted subnet (the same loop, the same recipe fields, a different starting model).

Every epoch: train on this worker's shard, evaluate on the validation split (all-reduced),
report the metrics with a checkpoint (rank 0 writes it). After a worker-group restart the loop
resumes from the latest checkpoint: weights, optimizer, LR schedule, epoch and the elapsed time
(so device-hours add up across attempts).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from search_space.arch import ViTArch
from search_space.models import unwrap
from search_space.subnet import load_subnet
from trainers import worker
from trainers.checkpoint import load_checkpoint, save_checkpoint
from trainers.config import TrainConfig
from trainers.data import build_splits, make_loader
from trainers.loop import all_reduce_sums, evaluate, train_one_epoch, warmup_cosine
from trainers.model_factory import build_dense
from trainers.optim import decay_groups


def eval_split(model, ds, cfg, env) -> dict[str, float]:
    # built per evaluation pass: its loader processes end with it (persistent=False)
    loader = worker.prepare_loader(make_loader(ds, cfg.data.eval_batch_size, shuffle=False,
                                               persistent=False,
                                               **worker.loader_options(cfg, env.device)))
    r = evaluate(model, loader, env.device, env.precision)
    s = all_reduce_sums({k: r[k] for k in ("correct", "count", "loss_sum")}, env.device)
    return {"top1": s["correct"] / max(s["count"], 1), "loss": s["loss_sum"] / max(s["count"], 1)}


class EvalClock:
    """Evaluation time, kept apart from a phase's training work: a phase's device-hours (its
    cost, compared across methods) count training only; evaluation is reported on its own."""

    def __init__(self, total: float = 0.0):
        self.total, self._lap = total, 0.0

    def split(self, model, ds, cfg, env) -> dict[str, float]:
        t0 = time.perf_counter()
        out = eval_split(model, ds, cfg, env)
        dt = time.perf_counter() - t0
        self.total += dt
        self._lap += dt
        return out

    def lap(self) -> float:
        """Evaluation seconds since the last lap."""
        dt, self._lap = self._lap, 0.0
        return dt


def progress_printer(env, tag: str, epoch: int, n_epochs: int, steps: int):
    """A `train_one_epoch` progress callback printing from rank 0 only."""
    if not env.is_main:
        return None

    def show(i: int, st) -> None:
        print(f"[{tag}] epoch {epoch + 1}/{n_epochs} step {i}/{steps} loss={st.loss:.4f} "
              f"top1={st.top1:.4f} {st.img_per_s * env.world_size:.0f} img/s", flush=True)

    return show


PHASES = ("pretrain", "finetune")


def supervised_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point. `config`: {"train": TrainConfig dict, "phase": "pretrain"
    or "finetune", "init": subnet folder (finetune) or None}."""
    cfg = TrainConfig.model_validate(config["train"])
    phase = config["phase"]
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r}; allowed: {PHASES}")
    env = worker.setup_worker(cfg.scaling, cfg.seed)
    splits = build_splits(cfg.data, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans)
    if phase == "pretrain":
        model, rc = build_dense(cfg), cfg.pretrain
    else:
        model, rc = load_subnet(config["init"]), cfg.finetune
    with worker.latest_checkpoint() as ckpt_dir:
        train_supervised(cfg, env, splits, model, rc, phase, ckpt_dir)


def train_supervised(cfg: TrainConfig, env: worker.WorkerEnv, splits: Any, model: torch.nn.Module,
                     rc: Any, phase: str, ckpt_dir: Path | None, subdir: str = "",
                     keep: Callable[[Path], None] | None = None) -> None:
    """Epochs of supervised training with a checkpoint each, resumed from `ckpt_dir`.

    `subdir`: where this phase's files go inside each checkpoint folder, and `keep(folder)`
    writes what else every checkpoint must carry (a trial run's fine-tune keeps the search's
    subnet and result beside its own state, as the only retained checkpoints are the latest)."""
    arch = ViTArch.from_timm(model).to_dict()
    per_worker_batch = max(1, cfg.data.batch_size // env.world_size)
    train_loader = make_loader(splits.train, per_worker_batch, shuffle=True, seed=cfg.seed,
                               drop_last=True, **worker.loader_options(cfg, env.device))
    train_loader = worker.prepare_loader(train_loader, cfg.seed)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} exceeds the training set "
                         f"({len(splits.train)} images)")
    total_steps = math.ceil(rc.epochs * steps_per_epoch)  # 0: evaluate the given weights only
    n_epochs = max(1, math.ceil(total_steps / steps_per_epoch))

    model.to(env.device)  # before the optimizer: its checkpointed state loads beside the weights
    optimizer = torch.optim.AdamW(decay_groups(model.named_parameters(), rc.weight_decay),
                                  lr=rc.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        max(total_steps, 1), int(rc.warmup_epochs * steps_per_epoch), rc.lr, rc.min_lr))

    start_epoch, elapsed, resumed_from, history = 0, 0.0, -1, []
    evals = EvalClock()
    own = ckpt_dir / subdir if ckpt_dir is not None else None
    if own is not None and (own / "state.json").exists():
        state = load_checkpoint(own, model, optimizer, scheduler)
        start_epoch, elapsed = state["epoch"] + 1, state["elapsed_s"]
        evals = EvalClock(state.get("eval_s", 0.0))
        resumed_from, history = state["epoch"], state.get("history", [])
    model = worker.prepare_model(model)
    if resumed_from >= 0 and env.is_main:
        print(f"[{phase}] resumed after epoch {resumed_from + 1}/{n_epochs}", flush=True)

    for epoch in range(start_epoch, n_epochs):
        t0 = time.perf_counter()
        worker.set_epoch(train_loader, epoch)
        steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
        st = train_one_epoch(model, train_loader, optimizer, scheduler, env.device,
                             env.precision, rc.label_smoothing, rc.grad_clip,
                             max_steps=steps, step_offset=epoch * steps_per_epoch,
                             progress=progress_printer(env, phase, epoch, n_epochs, steps),
                             progress_every=max(steps // 4, 1))
        tr = all_reduce_sums({"loss": st.loss * st.images, "correct": st.top1 * st.images,
                              "images": st.images}, env.device)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1, "epochs": n_epochs,
            "train_loss": tr["loss"] / max(tr["images"], 1),
            "train_top1": tr["correct"] / max(tr["images"], 1),
            "img_per_s": tr["images"] / max(st.seconds, 1e-9), "lr": scheduler.get_last_lr()[0],
            "resumed_from_epoch": resumed_from + 1,
        }
        if splits.val is not None:
            v = evals.split(model, splits.val, cfg, env)
            metrics.update(val_top1=v["top1"], val_loss=v["loss"])
        if epoch == n_epochs - 1:
            t = evals.split(model, splits.test, cfg, env)
            metrics.update(test_top1=t["top1"], test_loss=t["loss"])
        elapsed += time.perf_counter() - t0 - evals.lap()  # training work only
        metrics["elapsed_s"], metrics["eval_s"] = elapsed, evals.total
        history.append(metrics)  # per-epoch curves for the tracker (MLflow) in the driver
        state = {"epoch": epoch, "elapsed_s": elapsed, "eval_s": evals.total, "metrics": metrics,
                 "history": history}

        def write(d: Path, state=state) -> None:
            if keep is not None:
                keep(d)
            save_checkpoint(d / subdir, unwrap(model), state, optimizer, scheduler, arch=arch)
            (d / subdir / "metrics.json").write_text(json.dumps(state["metrics"]))

        worker.report(env, metrics, write)
        if env.is_main:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in metrics.items() if k != "epochs")
            print(f"[{phase}] {shown}", flush=True)
