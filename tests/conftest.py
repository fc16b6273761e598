"""Shared fixtures: one local Ray cluster per pytest session, tiny configs, real data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.ray_setup import free_port  # noqa: F401 - the tests' port picker

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

FMNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
DENSE_CACHE_ENV = "OFB_TEST_DENSE_CACHE"


@pytest.fixture(scope="session", autouse=True)
def shared_dense_cache(tmp_path_factory):
    """One dense-model cache for the session (`tiny_overrides` points at it): tests with equal
    settings pretrain once. The cache is keyed on every setting that changes the model, and one
    process trains an entry at a time (orchestrator/locks.py). Tests that need a cold cache
    pass their own `cache_dir`."""
    folder = tmp_path_factory.mktemp("dense-cache")
    os.environ[DENSE_CACHE_ENV] = str(folder)
    yield folder
    os.environ.pop(DENSE_CACHE_ENV, None)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray (2 CPUs) started once for the whole session."""
    import ray

    from orchestrator.ray_setup import start_ray

    resources = start_ray(address="local", num_cpus=2)
    yield resources
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts), once per session
    (tests/orchestrator/faults.py `MlflowServer`, which the fault tests also kill and restart).

    Yields its URL. Its output goes to <tmp>/server.log, shown if it does not come up."""
    from tests.orchestrator.faults import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    try:
        server.start()
    except AssertionError as e:
        server.kill()
        pytest.fail(f"mlflow server did not start ({e}):\n"
                    f"{(server.root / 'server.log').read_text()}")
    yield server.url
    server.kill()


@pytest.fixture
def fmnist_dir() -> Path:
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST missing in {FMNIST}: run `make data` (scripts/ensure_data.sh)")
    return FMNIST


def write_png_folder(root: Path, train: int, val: int, classes: int = 10) -> Path:
    """root/{train,val}/class_<c>/*.png: real Fashion-MNIST images as 28x28 grayscale PNGs,
    `train` + `val` per class (an ImageNet-style folder as a user would bring one)."""
    import numpy as np
    from PIL import Image

    from trainers.data import read_idx

    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST missing in {FMNIST}: run `make data`")
    n = 100 * (train + val)
    images = read_idx(FMNIST / "train-images-idx3-ubyte.gz")[:n]
    labels = read_idx(FMNIST / "train-labels-idx1-ubyte.gz")[:n]
    for c in range(classes):
        idx = np.flatnonzero(labels == c)[:train + val]
        for split, chosen in (("train", idx[:train]), ("val", idx[train:])):
            (root / split / f"class_{c}").mkdir(parents=True)
            for i in chosen:
                Image.fromarray(images[i], mode="L").save(root / split / f"class_{c}" / f"{i}.png")
    return root


def tiny_overrides(tmp_path: Path, **extra: object) -> list[str]:
    """Dot-list overrides for a tiny, fast Fashion-MNIST run under tmp_path."""
    base = {
        "output_dir": str(tmp_path / "runs"),
        "data.max_train_samples": 640,
        "data.max_eval_samples": 200,
        "data.batch_size": 64,
        "model.embed_dim": 32,
        "model.depth": 2,
        "model.num_heads": 2,
        "model.patch_size": 7,
        "pretrain.epochs": 2,
        "pretrain.warmup_epochs": 0.2,
    }
    if os.environ.get(DENSE_CACHE_ENV):  # under pytest: the session's shared cache
        base["cache_dir"] = os.environ[DENSE_CACHE_ENV]
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
