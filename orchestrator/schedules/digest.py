"""A digest of a data set's content for `schedule.refresh_dense: on_data_change` (G8): a nightly
slot on a refreshed folder (same path, new files) must not reuse last night's dense model.

Decision: the digest covers every file's relative path, size and modification time (st_mtime_ns)
under the data's folder, not the bytes. Stat calls only, so a 1.28 M-file ImageNet folder costs
one directory walk instead of reading ~150 GB; a file rewritten in place with the same size and
time would go unnoticed, which refreshed data sets (new files, copies, re-extraction) don't do.
A dataset without a folder (synthetic) has no content beyond its config: digest of the config.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from trainers.config import DataConfig
from trainers.data import FASHION_MNIST_DIR

DEFAULT_ROOT = {"fashion_mnist": FASHION_MNIST_DIR, "cifar10": "~/.cache/cifar",
                "cifar100": "~/.cache/cifar"}


def data_folder(data: DataConfig) -> Path | None:
    root = data.root or DEFAULT_ROOT.get(data.dataset)
    return Path(root).expanduser().resolve() if root else None


def data_digest(data: DataConfig) -> str:
    """16 hex digits: (relative path, size, mtime) of every file under the data's folder, in
    sorted order; a missing folder digests as empty (the run's own preflight refuses it)."""
    h = hashlib.sha256(json.dumps([data.dataset, data.root], default=str).encode())
    folder = data_folder(data)
    if folder is None or not folder.is_dir():
        return h.hexdigest()[:16]
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
