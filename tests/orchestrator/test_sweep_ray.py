"""A real Tune + Optuna sweep of tiny OFB searches on the session's local Ray."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from orchestrator.config import ConfigError, load_config
from orchestrator.phases import run_pretrain
from orchestrator.report import pareto_front
from orchestrator.sweep import run_sweep, trials_that_fit
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.ray

SPACE = {
    "search.ofb.temperature": {"type": "loguniform", "low": 0.5, "high": 2.0},
    "search.ofb.mask_ratio": {"type": "uniform", "low": 0.1, "high": 0.4},
    "search.budget": {"type": "choice", "values": [0.4, 0.6]},
}


def _cfg(tmp_path, sweep: dict | None = None, **extra):
    over = tiny_overrides(tmp_path, **{
        "name": "sw", "data.max_train_samples": 640, "search.epochs": 6,
        "search.lr_warmup_epochs": 0.5, "search.ofb.ramp_epochs": 0.5,
        "search.ofb.alpha_lr": 0.05,
        "search.ofb.eliminations_per_epoch": 4, "finetune.epochs": 0.5, **extra})
    over += ["sweep.num_samples=3", f"sweep.space={json.dumps(SPACE)}",
             'sweep.points_to_evaluate=[{"search.ofb.temperature": 1.0, '
             '"search.ofb.mask_ratio": 0.25, '
             '"search.budget": 0.6}]']
    over += [f"sweep.{k}={v}" for k, v in (sweep or {}).items()]
    return load_config(None, over)


def test_three_trial_sweep(ray_cluster, tmp_path, fmnist_dir):
    cfg = _cfg(tmp_path)
    dense = run_pretrain(cfg)
    rows = run_sweep(cfg, dense, ray_cluster)
    assert len(rows) == 3
    for r in rows:
        assert set(SPACE) <= set(r), r
        assert r["macs"] > 0 and r["params"] > 0 and 0 <= r["top1"] <= 1
        assert r["search_device_hours"] > 0 and r["finetune_device_hours"] > 0
    first = [r for r in rows if r["search.ofb.temperature"] == 1.0]
    assert first and first[0]["search.budget"] == 0.6  # points_to_evaluate ran
    assert (cfg.run_dir / "optuna.db").stat().st_size > 0
    import pyarrow.parquet as pq

    table = pq.read_table(cfg.run_dir / "results.parquet").to_pylist()
    assert sorted(t["trial_id"] for t in table) == sorted(r["trial_id"] for r in rows)
    assert all(t["method"] == "ofb" and t["macs"] > 0 and t["target_macs"] > 0 for t in table)
    assert {t["search.budget"] for t in table} <= {0.4, 0.6}
    # the embedded MLflow store (no tracking_uri): an SQLite file under the output folder
    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking_uri)
    assert cfg.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    for t in table:
        run = client.get_run(t["mlflow_run_id"])
        assert run.data.tags["trial_id"] == t["trial_id"] and run.info.status == "FINISHED"
    front = pareto_front(rows, cfg.sweep.objectives)
    assert 1 <= len(front) <= 3
    for r in rows:  # nothing beats a front member on both objectives
        for f in front:
            assert not (r["top1"] > f["top1"] and r["macs"] < f["macs"])
    again = run_sweep(cfg, dense, ray_cluster)  # the same command resumes: nothing reruns
    assert sorted(r["trial_id"] for r in again) == sorted(r["trial_id"] for r in rows)


def test_sweep_validation_and_fit(tmp_path):
    no_points = "sweep.points_to_evaluate=[]"
    with pytest.raises(ConfigError, match="model.depth.*cannot be swept"):
        load_config(None, [no_points,
                           'sweep.space={"model.depth": {"type": "choice", "values": [2]}}'])
    with pytest.raises(ConfigError, match="search.temprature: unknown key"):
        load_config(None, [no_points, 'sweep.space={"search.temprature": '
                           '{"type": "uniform", "low": 0.1, "high": 1}}'])
    with pytest.raises(ConfigError, match="low < high"):
        load_config(None, [no_points, 'sweep.space={"search.ofb.mask_ratio": '
                           '{"type": "uniform", "low": 0.4, "high": 0.1}}'])
    with pytest.raises(ConfigError, match="points_to_evaluate names.*not in sweep.space"):
        load_config(None, ['sweep.space={"search.ofb.mask_ratio": '
                           '{"type": "uniform", "low": 0.1, "high": 0.4}}'])
    cfg = _cfg(tmp_path)
    assert trials_that_fit(cfg, {"CPU": 2}) == 1 and trials_that_fit(cfg, {"CPU": 8}) == 4
    with pytest.raises(ValueError, match="one trial needs 2 x 1 CPU"):
        trials_that_fit(cfg, {"CPU": 1})


def test_asha_stops_lagging_trials_and_releases_their_workers(ray_cluster, tmp_path, fmnist_dir):
    import ray

    cfg = _cfg(tmp_path, name="asha", sweep={
        "num_samples": 4, "scheduler": "asha", "asha_grace_epochs": 1,
        "max_concurrent_trials": 1, "points_to_evaluate": "[]"})
    dense = run_pretrain(cfg)
    rows = run_sweep(cfg, dense, ray_cluster)
    started = list((cfg.run_dir / "trials").glob("trial-*"))
    assert len(started) == 4
    assert 1 <= len(rows) < 4, "ASHA stopped no trial"  # stopped trials never finish
    deadline = time.time() + 60  # early-stopped Train V2 runs give their workers back
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < 2:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) >= 2


def test_one_sweep_compares_methods_at_one_budget(ray_cluster, tmp_path, fmnist_dir):
    """method is a sweep dimension: OFB, ViT-Slim, the Taylor pruner and the dense control."""
    from orchestrator.report import Dense, build
    from search_space.subnet import load_subnet

    methods = ["ofb", "vit_slim", "two_stage_taylor", "dense_control"]
    space = {"search.method": {"type": "choice", "values": methods},
             "search.budget": {"type": "choice", "values": [0.5]}}
    over = tiny_overrides(tmp_path, **{
        "name": "cmp", "data.max_train_samples": 1280, "model.embed_dim": 48,
        "model.num_heads": 4, "search.epochs": 12, "search.lr_warmup_epochs": 0.5,
        "search.ofb.ramp_epochs": 0.5, "search.ofb.alpha_lr": 0.05,
        "search.ofb.macs_tolerance": 0.02, "search.ofb.defer_elimination": True,
        "search.ofb.eliminations_per_epoch": 4, "search.two_stage.score_batches": 4,
        "finetune.epochs": 0.5,
        "search.vit_slim.tokens": True, "mlflow.log_models": False})  # ViT-Slim prunes tokens too
    over += [f"sweep.num_samples={len(methods)}", f"sweep.space={json.dumps(space)}",
             "sweep.points_to_evaluate=" + json.dumps(
                 [{"search.method": m, "search.budget": 0.5} for m in methods])]
    cfg = load_config(None, over)
    dense = run_pretrain(cfg)
    rows = {r["method"]: r for r in run_sweep(cfg, dense, ray_cluster)}
    assert set(rows) == set(methods)
    half = 0.5 * dense.macs
    for m in ("vit_slim", "two_stage_taylor"):
        assert 0.98 * half <= rows[m]["macs"] <= half, m
    # OFB with our one-sided budget-first option (recorded): towards the target; a module
    # decided by argmax at the epoch cap may leave it above (measured here once: 1.064x), and
    # then the report flags it
    assert 0.85 * half <= rows["ofb"]["macs"] < dense.macs
    assert "ofb.macs_tolerance" in rows["ofb"]["additions"]
    assert not rows["vit_slim"]["additions"] and not rows["two_stage_taylor"]["additions"]
    assert rows["dense_control"]["macs"] == dense.macs == rows["dense_control"]["target_macs"]
    for r in rows.values():
        arch = json.loads((Path(r["subnet_path"]) / "arch.json").read_text())
        assert arch["macs"] == r["macs"]
        assert load_subnet(r["subnet_path"])(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
        assert 0 <= r["top1_before_finetune"] <= 1 and r["search_device_hours"] >= 0
        tokens = arch["arch"]["tokens"]  # token positions per block: ViT-Slim's alone
        assert (tokens is not None) == (r["method"] == "vit_slim"), r["method"]
    kept = [set(t) for t in json.loads((Path(rows["vit_slim"]["subnet_path"]) / "arch.json")
                                       .read_text())["arch"]["tokens"]]
    assert all(b <= a for a, b in zip(kept, kept[1:], strict=False)) and 0 in kept[-1]
    rep = build(list(rows.values()), Dense(0.8, dense.macs, dense.cost.device_hours))
    ofb = next(g for g in rep.groups if g["method"] == "ofb")
    assert ofb["over_target"] == (rows["ofb"]["macs"] > rows["ofb"]["target_macs"])
    assert {(g["method"], g["budget"]) for g in rep.groups} == {
        ("ofb", "50pct"), ("vit_slim", "50pct"), ("two_stage_taylor", "50pct"),
        ("dense_control", "100pct")}
    assert "cost_ratio/ofb_vs_two_stage_taylor/50pct" in rep.metrics
    assert "cost_ratio/ofb_vs_vit_slim/50pct" in rep.metrics
