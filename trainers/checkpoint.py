"""Checkpoint folders without pickled modules: safetensors weights + JSON state.

Layout of one checkpoint folder::

    model.safetensors   the (unwrapped) model's state dict
    optimizer.pt        optimizer + scheduler state dicts, loadable with weights_only=True
    state.json          epoch, global step, elapsed seconds, history, anything JSON-able
    method.pt           a search method's own state (tensors and numbers), weights_only-loadable
    arch.json           the architecture, when the caller gives one (`{"arch": ...}`, the
                        schema `search_space.subnet.load_subnet` reads)

Writes are all or nothing: every file goes to a temporary name first and is renamed into place
only once all of them are written, so a failed write (a full disk, a file-size limit) leaves
the previous checkpoint in the folder as it was and raises an OSError naming the file.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from search_space.subnet import arch_json
from search_space.weights import load_checked

MODEL_FILE, OPTIM_FILE, STATE_FILE, ARCH_FILE, METHOD_FILE = (
    "model.safetensors", "optimizer.pt", "state.json", "arch.json", "method.pt")
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@contextmanager
def _staged() -> Iterator[Callable[[Path, Callable[[Path], None]], None]]:
    """Yields `stage(path, write)`: `write` fills a temporary sibling of `path`. On leaving,
    every staged file is renamed over its target; if any write failed, none is (temporaries
    removed) and the error names the file."""
    staged: list[tuple[Path, Path]] = []

    def stage(path: Path, write: Callable[[Path], None]) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        staged.append((tmp, path))
        try:
            write(tmp)
        except (OSError, RuntimeError, SafetensorError) as e:  # torch and safetensors hide errno
            code = getattr(e, "errno", None)
            hint = ("; the disk is full or a file-size limit was hit" if code in _FULL
                    or not isinstance(e, OSError) else "")
            raise OSError(code or errno.EIO, f"cannot write {path} ({type(e).__name__}: {e}"
                          f"{hint}); the previous file there is unchanged") from e

    try:
        yield stage
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)


def _write_weights(model: nn.Module, path: Path) -> None:
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(path))


def save_weights(model: nn.Module, path: str | Path) -> None:
    with _staged() as stage:
        stage(Path(path), lambda tmp: _write_weights(model, tmp))


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """A corrupt or foreign file is refused naming it (search_space/weights.py)."""
    load_checked(model, path, strict=strict)


def save_checkpoint(folder: str | Path, model: nn.Module, state: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, arch: dict[str, Any] | None = None,
                    method_state: dict[str, Any] | None = None) -> Path:
    """Write one checkpoint folder, all files or none (a folder holding an older checkpoint
    keeps it whole if a write fails)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _staged() as stage:
        stage(folder / MODEL_FILE, lambda tmp: _write_weights(model, tmp))
        if optimizer is not None:
            blob = {"optimizer": optimizer.state_dict()}
            if scheduler is not None:
                blob["scheduler"] = scheduler.state_dict()
            stage(folder / OPTIM_FILE, lambda tmp: torch.save(blob, tmp))
        stage(folder / STATE_FILE, lambda tmp: tmp.write_text(json.dumps(state, indent=2)))
        if arch is not None:
            stage(folder / ARCH_FILE, lambda tmp: tmp.write_text(arch_json(arch)))
        if method_state is not None:
            stage(folder / METHOD_FILE, lambda tmp: torch.save(method_state, tmp))
    return folder


def load_method_state(folder: str | Path) -> dict[str, Any]:
    """A search method's checkpointed state ({} when the checkpoint has none)."""
    f = Path(folder) / METHOD_FILE
    return _torch_load(f) if f.exists() else {}


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True (never unpickles code); a corrupt file is named."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - zip, pickle and torch errors alike
        raise ValueError(f"{path}: cannot read this checkpoint file ({type(e).__name__}: {e}); "
                         "it is truncated, corrupt or of another format") from None


def load_checkpoint(folder: str | Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None) -> dict[str, Any]:
    """Restore model (and optimizer/scheduler when given); returns the JSON state."""
    folder = Path(folder)
    load_weights(model, folder / MODEL_FILE)
    return load_training_state(folder, optimizer, scheduler)


def load_training_state(folder: str | Path, optimizer: torch.optim.Optimizer | None = None,
                        scheduler: Any = None) -> dict[str, Any]:
    """Restore optimizer/scheduler (when given) and return the JSON state; weights untouched
    (a search loads them through its method, which first reshapes the supernet)."""
    folder = Path(folder)
    if optimizer is not None and (folder / OPTIM_FILE).exists():
        blob = _torch_load(folder / OPTIM_FILE)
        optimizer.load_state_dict(blob["optimizer"])
        if scheduler is not None and "scheduler" in blob:
            scheduler.load_state_dict(blob["scheduler"])
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder / STATE_FILE}: cannot read this checkpoint's state "
                         f"({type(e).__name__}: {e}); it is truncated or corrupt") from None
