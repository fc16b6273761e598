"""The search phase, shared by every method: per-worker loop run by Ray Train's TorchTrainer.

dense weights -> method.wrap -> epochs of `train_one_epoch` with the method's hooks (losses,
elimination, slicing; DDP rebuilt whenever shapes change) -> a checkpoint every epoch holding
the architecture state (so a restarted worker resumes mid-search) -> method.extract -> the
subnet is evaluated (top-1 before fine-tune) and shipped in the final checkpoint's `subnet/`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from search_space.arch import ViTArch
from search_space.cost import cost_of
from search_space.models import unwrap
from search_space.subnet import export_subnet, load_subnet
from trainers import worker
from trainers.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    load_method_state,
    load_training_state,
    load_weights,
    save_checkpoint,
)
from trainers.config import TrainConfig
from trainers.data import build_splits, make_loader
from trainers.loop import all_reduce_sums, train_one_epoch, warmup_cosine
from trainers.methods import get_method
from trainers.model_factory import build_dense
from trainers.supervised import EvalClock, progress_printer, train_supervised

SUBNET_DIR, FINETUNE_DIR = "subnet", "finetune"


def _restore(ckpt_dir: Path, method, model, optimizer_fn) -> tuple[Any, Any, dict]:
    """Method state, weights, then the optimizer and its state: with the model on the method's
    device first, so the optimizer state loads there too (loading it next to CPU weights and
    moving only the weights made every resumed step on a GPU mix devices)."""
    method.load_state_dict(load_method_state(ckpt_dir))
    method.restore(model, load_file(str(ckpt_dir / MODEL_FILE)))
    model.to(method.device)
    optimizer, scheduler = optimizer_fn(model)
    return optimizer, scheduler, load_training_state(ckpt_dir, optimizer, scheduler)


def search_loop(config: dict[str, Any]) -> None:
    """Worker entry point. `config`: {"train": TrainConfig dict, "dense": dense weights file,
    "finetune": true to fine-tune the subnet in the same run (one worker group per trial)}."""
    cfg = TrainConfig.model_validate(config["train"])
    sc = cfg.search
    env = worker.setup_worker(cfg.scaling, cfg.seed)
    splits = build_splits(cfg.data, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans)
    dense = build_dense(cfg, pretrained=False)
    load_weights(dense, config["dense"])
    dense_arch = ViTArch.from_timm(dense)

    per_worker_batch = max(1, cfg.data.batch_size // env.world_size)
    loader = worker.prepare_loader(make_loader(
        splits.train, per_worker_batch, shuffle=True, seed=cfg.seed, drop_last=True,
        **worker.loader_options(cfg, env.device)), cfg.seed)
    steps_per_epoch = len(loader)
    method = get_method(sc.method)(sc, steps_per_epoch, dense_arch, seed=cfg.seed)
    method.setup(env.device)
    cap_steps = max(1, math.ceil(sc.epochs * steps_per_epoch))
    if (needed := method.max_steps()) is not None:  # e.g. two-stage scoring: a few batches
        cap_steps = min(cap_steps, needed)
    n_epochs = math.ceil(cap_steps / steps_per_epoch)
    model = method.wrap(dense)

    def make_optimizer(m):
        opt = torch.optim.AdamW(method.param_groups(m), lr=sc.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(
            max(cap_steps, 1), int(sc.lr_warmup_epochs * steps_per_epoch), sc.lr, method.min_lr()))
        return opt, sched

    start_epoch, elapsed, resumed_from, history = 0, 0.0, 0, []
    evals = EvalClock()
    with worker.latest_checkpoint() as ckpt_dir:
        if ckpt_dir is not None and (ckpt_dir / SUBNET_DIR).is_dir():  # already extracted
            if config.get("finetune"):
                local = Path(tempfile.mkdtemp(prefix="search-"))  # Ray may delete ckpt_dir
                _copy_search(ckpt_dir, local)
                return _finetune(cfg, env, splits, local, ckpt_dir)
            final = json.loads((ckpt_dir / STATE_FILE).read_text())["final"]
            worker.report(env, final, lambda d, src=ckpt_dir: shutil.copytree(
                src, d, dirs_exist_ok=True))
            return
        if ckpt_dir is not None:
            optimizer, scheduler, state = _restore(ckpt_dir, method, model, make_optimizer)
            start_epoch, elapsed = state["epoch"] + 1, state["elapsed_s"]
            evals = EvalClock(state.get("eval_s", 0.0))
            resumed_from, history = state["epoch"] + 1, state.get("history", [])
        else:
            optimizer, scheduler = make_optimizer(model)
    def rewrap(m):
        return worker.prepare_model(m, method.ddp_kwargs)

    model = rewrap(model)
    if resumed_from and env.is_main:
        print(f"[search] resumed after epoch {resumed_from}/{n_epochs}", flush=True)

    done = method.finished(model)
    for epoch in range(start_epoch, n_epochs):
        if done:
            break
        t0 = time.perf_counter()
        worker.set_epoch(loader, epoch)
        steps = min(steps_per_epoch, cap_steps - epoch * steps_per_epoch)
        st = train_one_epoch(
            model, loader, optimizer, scheduler, env.device, env.precision, sc.label_smoothing,
            method.grad_clip(), method=method, rewrap=rewrap, max_steps=steps,
            step_offset=epoch * steps_per_epoch,
            progress=progress_printer(env, "search", epoch, n_epochs, steps),
            progress_every=max(steps // 4, 1))
        model = st.model
        done = method.finished(model)
        tr = all_reduce_sums({"loss": st.loss * st.images, "correct": st.top1 * st.images,
                              "images": st.images}, env.device)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1, "epochs": n_epochs, "phase": "search",
            "train_loss": tr["loss"] / max(tr["images"], 1),
            "train_top1": tr["correct"] / max(tr["images"], 1),
            **{f"loss_{k}": v for k, v in st.terms.items()},
            "resumed_from_epoch": resumed_from, "search_finished": done,
        }
        if splits.val is not None:
            metrics["val_top1"] = evals.split(model, splits.val, cfg, env)["top1"]
        metrics.update(method.metrics(model))
        elapsed += time.perf_counter() - t0 - evals.lap()  # search work only
        metrics["elapsed_s"], metrics["eval_s"] = elapsed, evals.total
        history.append({k: v for k, v in metrics.items() if not isinstance(v, dict)})
        state = {"epoch": epoch, "elapsed_s": elapsed, "eval_s": evals.total,
                 "history": history}
        if env.is_main:
            _print_epoch(metrics)
        worker.report(env, metrics, lambda d, s=state, m=model: save_checkpoint(
            d, unwrap(m), s, optimizer, scheduler, method_state=method.state_dict()))

    t0 = time.perf_counter()
    note = method.finalize(model, optimizer)
    if note and env.is_main:
        print(f"[search] note: {note}", flush=True)
    subnet, arch = method.extract(model)
    cost = cost_of(arch)
    final: dict[str, Any] = {"phase": "search_done", "epoch": len(history),
                             "macs": cost.macs, "params": cost.params,
                             "dense_macs": cost_of(dense_arch).macs, "note": note,
                             "argmax_modules": method.decided_by_argmax,
                             "additions": method.additions(),
                             "target_macs": method.target_macs,
                             "resumed_from_epoch": resumed_from, "node_id": worker.node_id()}
    if splits.val is not None:
        final["val_top1_before_finetune"] = evals.split(subnet, splits.val, cfg, env)["top1"]
    final["test_top1_before_finetune"] = evals.split(subnet, splits.test, cfg, env)["top1"]
    elapsed += time.perf_counter() - t0 - evals.lap()  # extraction counts, evaluation not
    if method.latency is not None:  # a latency budget: the subnet timed as the table was
        t1 = time.perf_counter()
        final.update(budget_metric="latency", target_latency_ms=method.target_latency,
                     latency_ms_predicted=method.latency.of_arch(arch))
        if env.is_main:  # one timing at a time on a shared machine; evaluation, not search
            final["latency_ms"] = method.latency.measure_arch(arch)
        evals.total += time.perf_counter() - t1
    final["elapsed_s"], final["eval_s"] = elapsed, evals.total
    if env.is_main:
        print(f"[search] subnet {cost.macs / 1e6:.2f} M MACs ({cost.macs / final['dense_macs']:.1%}"
              f" of dense), {cost.params / 1e6:.3f} M params, top-1 before fine-tune "
              f"{final['test_top1_before_finetune']:.4f}", flush=True)
        if "latency_ms" in final:
            print(f"[search] latency {final['latency_ms']:.3f} ms per batch measured "
                  f"(predicted {final['latency_ms_predicted']:.3f}), target "
                  f"{final['target_latency_ms']:.3f} ms", flush=True)

    def write(d: Path) -> None:
        export_subnet(subnet, arch, d / SUBNET_DIR, extra={"macs": cost.macs,
                                                           "params": cost.params})
        (d / STATE_FILE).write_text(json.dumps({"final": final, "history": history}))

    if not config.get("finetune"):
        worker.report(env, final, write)
        return
    local = Path(tempfile.mkdtemp(prefix="search-"))  # every rank: its fine-tune's start
    write(local)  # exported once; the checkpoint copies it
    worker.report(env, final, lambda d: _copy_search(local, d))
    _finetune(cfg, env, splits, local, None)


def _copy_search(src: Path, dst: Path) -> None:
    """The search's result (subnet + state) from one folder into another."""
    shutil.copytree(src / SUBNET_DIR, dst / SUBNET_DIR, dirs_exist_ok=True)
    shutil.copy2(src / STATE_FILE, dst / STATE_FILE)


def _finetune(cfg: TrainConfig, env: worker.WorkerEnv, splits: Any, search_dir: Path,
              ckpt_dir: Path | None) -> None:
    """The fine-tune of the exported subnet, in the search's worker group and with its data:
    no second worker-group start-up and data load per trial. Every checkpoint keeps the
    search's result beside the fine-tune's own files (`finetune/`), so a restart at any point
    finds both, and the driver reads both from the run's last checkpoint."""
    try:
        train_supervised(cfg, env, splits, load_subnet(search_dir / SUBNET_DIR), cfg.finetune,
                         "finetune", ckpt_dir, subdir=FINETUNE_DIR,
                         keep=lambda d: _copy_search(search_dir, d))
    finally:  # a worker's local copy (a temporary folder) goes with the fine-tune
        shutil.rmtree(search_dir, ignore_errors=True)


# per-method progress keys shown when a method reports them (OFB, UVC, SPViT)
_SHOWN = (("expected_macs", "expected={:.2f}M", 1e-6), ("live_candidates", "live={}", None),
          ("finished_modules", "finished={}", None), ("lambda", "lambda={:.3f}", None),
          ("mask_ratio", "mask_ratio={:.3f}", None), ("kept_blocks", "blocks=[{}]", None),
          ("heads_pruned", "heads-{}", None), ("v_dims_pruned", "v_dims-{}", None),
          ("neurons_pruned", "neurons-{}", None), ("z", "z={:.3g}", None),
          ("mixers", "mixers=[{}]", None), ("neurons_kept", "neurons={}", None),
          ("expected_latency_ms", "latency expected={:.3f}ms", None),
          ("target_latency_ms", "latency target={:.3f}ms", None))


def _print_epoch(m: dict[str, Any]) -> None:
    parts = [f"[search] epoch {m['epoch']}/{m['epochs']} loss={m['train_loss']:.4f}",
             f"val_top1={m.get('val_top1', float('nan')):.4f}"]
    if "current_macs" in m:
        parts.append(f"MACs current={m['current_macs'] / 1e6:.2f}M "
                     f"target={m.get('target_macs', 0) / 1e6:.2f}M")
    parts += [fmt.format(m[k] * scale if scale else m[k]) for k, fmt, scale in _SHOWN if k in m]
    print(" ".join(parts), flush=True)
