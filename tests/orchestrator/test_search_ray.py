"""End to end on a real local Ray with 2 workers: pretrain -> OFB search (one worker killed
mid-search, resumed from its checkpoint) -> subnet within 5% of the target MACs -> fine-tune."""

from __future__ import annotations

import json

import pytest

from orchestrator.config import load_config
from orchestrator.phases import run_finetune, run_pretrain, run_search
from search_space.arch import ViTArch
from search_space.cost import count_macs, measure_macs
from search_space.subnet import load_subnet
from tests.conftest import tiny_overrides
from tests.orchestrator.faults import run_and_kill_after_checkpoint

pytestmark = pytest.mark.ray


def test_search_survives_a_killed_worker_and_meets_the_budget(ray_cluster, tmp_path, fmnist_dir):
    cfg = load_config(None, tiny_overrides(tmp_path, **{
        "name": "e2e", "data.max_train_samples": 1280, "model.embed_dim": 48,
        "model.num_heads": 4, "search.epochs": 12, "search.lr_warmup_epochs": 0.5,
        "search.ofb.ramp_epochs": 0.5,
        "search.ofb.alpha_lr": 0.05, "search.ofb.eliminations_per_epoch": 4, "search.budget": 0.5,
        "search.ofb.macs_tolerance": 0.02, "search.ofb.defer_elimination": True,
        "finetune.epochs": 1, "scaling.max_failures": 2}))
    dense = run_pretrain(cfg)
    run_dir = cfg.run_dir / "ray" / f"search-{cfg.search_key()}"
    res = run_and_kill_after_checkpoint(lambda: run_search(cfg, dense), run_dir)
    f = res.final
    assert f["resumed_from_epoch"] >= 1, "the search restarted from scratch, not its checkpoint"
    # modules still open at the cap are decided by argmax, and the record says how many
    assert (f["argmax_modules"] > 0) == bool(f["note"])
    assert 0.85 * 0.5 * f["dense_macs"] <= f["macs"] <= 0.5 * f["dense_macs"]  # one-sided
    hist = res.history
    assert {"val_top1", "expected_macs", "current_macs", "live_candidates", "lambda",
            "mask_ratio"} <= set(hist[0])
    assert hist[-1]["live_candidates"] < hist[0]["live_candidates"]

    model = load_subnet(res.subnet)
    arch = ViTArch.from_dict(json.loads((res.subnet / "arch.json").read_text())["arch"])
    assert count_macs(arch) == f["macs"]
    assert measure_macs(model, arch) == pytest.approx(f["macs"], rel=0.01)
    assert 0.0 <= f["test_top1_before_finetune"] <= 1.0
    assert res.cost.device_hours > 0

    tuned = run_finetune(cfg, res.subnet)
    assert tuned.metrics["test_top1"] > 0.3 and (tuned.path / "model.safetensors").exists()
    again = run_search(cfg, dense)  # finished phases are not run twice
    assert again.final == f
