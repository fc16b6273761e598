"""Timing plumbing for search_space/latency.py: what a trustworthy CPU/GPU timing needs.

Three lessons from measuring on a shared 2-core machine are written down here: take the fastest
rep, not the median (`time_ms`); pin glibc's allocator so page faults do not depend on the
process's history (`pin_malloc`); give timed models finite weights (`build_finite`).
"""

from __future__ import annotations

import ctypes
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search_space.arch import ViTArch


def device_key(device: torch.device) -> dict[str, Any]:
    """What makes a measurement belong to this machine: device name, torch, threads."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:  # platform.processor() is often empty on Linux
        info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        names = [ln.split(":", 1)[1].strip() for ln in info.splitlines()
                 if ln.startswith("model name")]
        name = f"{names[0] if names else platform.processor() or platform.machine()} " \
               f"x{os.cpu_count()}"
    return {"device_type": device.type, "device_name": name, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


_PINNED: list[bool] = []  # whether pin_malloc succeeded, once per process


def pin_malloc() -> bool:
    """Stop glibc from handing memory back to the OS, for the rest of this process (mallopt).

    By default a tensor over the mmap threshold gets fresh pages, or the heap top is trimmed
    after a free, so a forward page-faults its activations or not depending on what the process
    allocated before: one MLP branch timed 2.0 or 3.2 ms, the tiny ViT 15 or 19 ms, in the same
    process. Pinned, every timing is the fault-free one (what jemalloc / tcmalloc give a
    deployment) and the parts add up to the whole. Costs: freed memory stays in the process.
    """
    if not _PINNED:
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = bool(libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
                      and any(libc.mallopt(-3, v) for v in (1 << 30, 32 << 20)))  # M_MMAP_...
        except (OSError, AttributeError):  # not glibc: its allocator decides
            ok = False
        _PINNED.append(ok)
    return _PINNED[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_ms(module: nn.Module, x: torch.Tensor, reps: int = 7, rep_ms: float = 5.0,
            warmup: int = 3) -> float:
    """ms per call: the fastest of `reps` reps, each enough calls to last ~rep_ms (timer noise).

    The minimum, not the median: other processes only ever add time. Short parts find a quiet
    moment, a whole model rarely does, so with busy neighbours medians make the parts sum to
    less than the whole. With as many intra-op threads as cores nothing helps: a descheduled
    thread stalls the other's barrier (tiny ViT, 2 threads, 2 cores, busy: min 9 ms in one
    run, min 30 / median 380 ms in the next), so
    on a shared machine measure with fewer threads (`--threads 1`; threads are in the key).
    On the CPU, glibc's allocator is pinned first (`pin_malloc`).
    """
    if x.device.type == "cpu":
        pin_malloc()
    module.eval()
    for _ in range(warmup):
        module(x)
    _sync(x.device)
    t0 = time.perf_counter()
    module(x)
    _sync(x.device)
    inner = max(1, int(rep_ms / 1e3 / max(time.perf_counter() - t0, 1e-6)))
    times = []
    for _ in range(reps):
        _sync(x.device)
        t0 = time.perf_counter()
        for _ in range(inner):
            module(x)
        _sync(x.device)
        times.append((time.perf_counter() - t0) / inner)
    return 1e3 * min(times)


class Branch(nn.Module):
    """One residual branch of a timm Block, as the Block runs it: x + ls(fn(norm(x)))."""

    def __init__(self, norm: nn.Module, fn: nn.Module, ls: nn.Module):
        super().__init__()
        self.norm, self.fn, self.ls = norm, fn, ls

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        return x + self.ls(self.fn(self.norm(x)))


def build_finite(arch: ViTArch, device: torch.device) -> nn.Module:
    """`build_from_arch` with initialised weights: it leaves pos/cls tokens as torch.empty (we
    saw activations of 1e18 and NaN), and a forward over such values need not cost what a real
    one does."""
    from search_space.subnet import build_from_arch

    model = build_from_arch(arch, device=device)
    model.init_weights()
    return model.eval()
