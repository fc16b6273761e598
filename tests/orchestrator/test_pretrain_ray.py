"""A real 2-worker dense pretrain on Fashion-MNIST: checkpoints, survives a killed worker by
resuming from its checkpoint, and is served from the cache the second time."""

from __future__ import annotations

import json
import time

import pytest

from orchestrator.config import load_config
from orchestrator.phases import run_pretrain
from search_space.arch import ViTArch
from search_space.subnet import load_subnet
from tests.conftest import tiny_overrides
from tests.orchestrator.faults import run_and_kill_after_checkpoint

pytestmark = pytest.mark.ray


def test_pretrain_checkpoints_resumes_after_kill_and_caches(ray_cluster, tmp_path, fmnist_dir):
    cfg = load_config(None, tiny_overrides(tmp_path, **{
        "cache_dir": str(tmp_path / "cache"), "pretrain.epochs": 5,
        "data.max_train_samples": 1280, "scaling.max_failures": 2}))
    run_dir = cfg.cache_path / "ray" / f"pretrain-{cfg.pretrain_key()}"
    res = run_and_kill_after_checkpoint(lambda: run_pretrain(cfg), run_dir)
    m = res.metrics
    assert m["epoch"] == m["epochs"] == 5
    assert m["resumed_from_epoch"] >= 1, "the restarted workers did not resume from a checkpoint"
    assert 0.0 <= m["test_top1"] <= 1.0 and m["test_top1"] > 0.3  # 10 classes: chance is 0.1
    assert not res.cached and (res.path / "model.safetensors").stat().st_size > 0
    arch = json.loads((res.path / "arch.json").read_text())["arch"]  # the one schema
    assert arch["embed_dim"] == 32 and len(arch["blocks"]) == 2
    dense = load_subnet(res.path)  # the dense cache loads like any subnet
    assert ViTArch.from_timm(dense) == ViTArch.from_dict(arch)
    assert res.cost.device_kind == "cpu_core" and res.cost.devices == 2
    assert res.cost.worker_seconds > 0
    assert res.cost.device_hours == pytest.approx(2 * res.cost.worker_seconds / 3600)

    t0 = time.perf_counter()
    again = run_pretrain(cfg)
    assert again.cached and time.perf_counter() - t0 < 5
    assert again.metrics == m and again.path == res.path
