"""A real 2-worker dense pretrain on Fashion-MNIST: checkpoints, survives a killed worker by
resuming from its checkpoint, and is served from the cache the second time."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from orchestrator.config import load_config
from orchestrator.phases import run_pretrain
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.ray


def _kill_one_train_worker() -> int:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[
        ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert actors, "no live Ray Train worker to kill"
    pid = actors[-1].pid
    os.kill(pid, signal.SIGKILL)
    return pid


def test_pretrain_checkpoints_resumes_after_kill_and_caches(ray_cluster, tmp_path, fmnist_dir):
    cfg = load_config(None, tiny_overrides(tmp_path, **{
        "pretrain.epochs": 5, "data.max_train_samples": 1280, "scaling.max_failures": 2}))
    run_dir = cfg.cache_path / "ray" / f"pretrain-{cfg.pretrain_key()}"
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = run_pretrain(cfg)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = e

    th = threading.Thread(target=target)
    th.start()
    deadline = time.time() + 240
    while time.time() < deadline and not list(run_dir.glob("checkpoint_*/state.json")):
        time.sleep(0.1)
    assert list(run_dir.glob("checkpoint_*/state.json")), "no checkpoint within 240 s"
    time.sleep(0.5)  # let Ray register the checkpoint it just wrote
    _kill_one_train_worker()
    th.join(timeout=600)
    assert not th.is_alive()
    if "error" in box:
        raise box["error"]
    res = box["result"]
    m = res.metrics
    assert m["epoch"] == m["epochs"] == 5
    assert m["resumed_from_epoch"] >= 1, "the restarted workers did not resume from a checkpoint"
    assert 0.0 <= m["test_top1"] <= 1.0 and m["test_top1"] > 0.3  # 10 classes: chance is 0.1
    assert not res.cached and (res.path / "model.safetensors").stat().st_size > 0
    arch = json.loads((res.path / "arch.json").read_text())
    assert arch["embed_dim"] == 32 and len(arch["blocks"]) == 2
    assert res.cost.device_kind == "cpu_core" and res.cost.devices == 2
    assert res.cost.worker_seconds > 0
    assert res.cost.device_hours == pytest.approx(2 * res.cost.worker_seconds / 3600)

    t0 = time.perf_counter()
    again = run_pretrain(cfg)
    assert again.cached and time.perf_counter() - t0 < 5
    assert again.metrics == m and again.path == res.path
