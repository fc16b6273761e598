"""One `train_one_epoch` and one `evaluate`, shared by dense pretraining, search and fine-tuning.

The loop knows nothing of any compression method: a method enters through its hooks (all loss
terms, a per-step callback), so OFB and the baselines run the very same code.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the CPU or the GPU when asked for; else nothing."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs with native bf16 (compute capability >= 8.0), else fp32.

    `torch.cuda.is_bf16_supported()` also says yes on pre-Ampere GPUs, where bf16 is emulated
    and slower than fp32, so the capability is checked instead. On the CPU bf16 autocast is not
    reliably faster: bench/train_throughput.py measured it at 0.85-0.91x of fp32 on this
    project's 2-core AVX512 machine for the default ViT. Users whose CPUs have AMX can ask for
    `scaling.precision=bf16` explicitly.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if native_bf16(torch.cuda.get_device_capability(device)) else "fp32"
    return "fp32"


def native_bf16(capability: tuple[int, int]) -> bool:
    """bf16 tensor cores: Ampere (8.0) and later."""
    return tuple(capability) >= (8, 0)


def warmup_cosine(total_steps: int, warmup_steps: int, base_lr: float,
                  min_lr: float) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up, then cosine down to min_lr."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        cos = 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        return (min_lr + (base_lr - min_lr) * cos) / base_lr

    return f


@dataclass
class EpochStats:
    loss: float = 0.0
    top1: float = 0.0
    images: int = 0
    seconds: float = 0.0
    steps: int = 0
    terms: dict[str, float] = field(default_factory=dict)
    model: nn.Module | None = None  # the model at the end (re-wrapped if its shape changed)

    @property
    def img_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    device: torch.device,
    precision: str = "fp32",
    label_smoothing: float = 0.0,
    grad_clip: float | None = None,
    method: Any = None,
    rewrap: Callable[[nn.Module], nn.Module] | None = None,
    max_steps: int | None = None,
    step_offset: int = 0,
    progress: Callable[[int, EpochStats], None] | None = None,
    progress_every: int = 0,
) -> EpochStats:
    """Train for one pass over `loader` (or `max_steps` batches); returns local statistics.

    `method` (a `trainers.methods.SearchMethod`) supplies the forward, every loss term (the
    task loss included: `label_smoothing` then is the method's business) and a per-step hook;
    when that hook reports changed parameter shapes, `rewrap` rebuilds the DDP wrapper.
    `progress(i, running_stats)` is called every `progress_every` steps (0: never).
    """
    model.train()
    st = EpochStats()
    t0 = time.perf_counter()
    # running sums stay on the device; they reach the host only at `progress` and at the end
    # (one transfer each), so a step forces no device -> host sync of its own
    sums: dict[str, torch.Tensor] = {}
    for i, (images, targets) in enumerate(loader):
        if max_steps is not None and i >= max_steps:
            break
        step = step_offset + i
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, precision):
            if method is None:
                logits = model(images)  # (B, num_classes)
                extra = {}
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
            else:  # every term, the task loss included, comes from the method
                logits, aux = method.forward(model, images, step)
                extra = method.losses(model, images, targets, logits, aux, step)
                loss = sum(extra.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if method is not None and method.after_step(model, step, optimizer):
            if rewrap is not None:
                model = rewrap(getattr(model, "module", model))
        b = targets.shape[0]
        with torch.no_grad():
            _accumulate(sums, {"loss": loss.detach() * b,
                               "correct": (logits.argmax(-1) == targets).sum(),
                               **{f"term/{k}": v.detach() * b for k, v in extra.items()}})
        st.images += b
        st.steps += 1
        if progress is not None and progress_every and st.steps % progress_every == 0:
            _fill(st, sums, time.perf_counter() - t0)
            progress(st.steps, st)
    _fill(st, sums, time.perf_counter() - t0)
    st.model = model
    return st


def _accumulate(sums: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """sums[k] += values[k], on the device (values are already per-batch sums)."""
    for k, v in values.items():
        v = v.detach().float()
        sums[k] = sums[k] + v if k in sums else v


def _to_host(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Every running sum in one device -> host transfer."""
    keys = sorted(sums)
    return dict(zip(keys, torch.stack([sums[k] for k in keys]).tolist() if keys else [],
                    strict=True))


def _fill(st: EpochStats, sums: dict[str, torch.Tensor], seconds: float) -> None:
    """Per-image means of the running sums."""
    vals = _to_host(sums)
    n = max(st.images, 1)
    st.seconds = seconds
    st.loss, st.top1 = vals.get("loss", 0.0) / n, vals.get("correct", 0.0) / n
    st.terms = {k.removeprefix("term/"): v / n for k, v in vals.items() if k.startswith("term/")}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device,
             precision: str = "fp32") -> dict[str, float]:
    """Top-1 and mean cross-entropy, summed over this worker's shard (`correct`, `count` kept so
    callers can all-reduce them). Sums stay on the device until the end: one host transfer."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images)
        _accumulate(sums, {"loss_sum": F.cross_entropy(logits.float(), targets,
                                                       reduction="sum"),
                           "correct": (logits.argmax(-1) == targets).sum()})
        count += targets.shape[0]
    host = _to_host(sums)
    correct, loss_sum = host.get("correct", 0.0), host.get("loss_sum", 0.0)
    return {"correct": correct, "count": float(count), "loss_sum": loss_sum,
            "top1": correct / max(count, 1), "loss": loss_sum / max(count, 1)}


def all_reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum scalar statistics over workers (no-op without an initialised process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))
