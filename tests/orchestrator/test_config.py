"""Config loading, overrides and validation: every bad value fails before Ray starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import Config, ConfigError, load_config, parse_overrides


def test_builtin_default_is_valid():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.data.dataset == "fashion_mnist" and cfg.scaling.num_workers == 2
    assert cfg.run_dir.name == cfg.name


def test_overrides_apply_with_yaml_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: mine\npretrain:\n  epochs: 5\n")
    cfg = load_config(f, ["pretrain.epochs=0.5", "scaling.use_gpu=true", "model.depth=3",
                          "data.root=/x/y"])
    assert cfg.name == "mine" and cfg.pretrain.epochs == 0.5 and cfg.scaling.use_gpu is True
    assert cfg.model.depth == 3 and cfg.data.root == "/x/y"


@pytest.mark.parametrize("overrides,message", [
    (["pretrain.epoch=3"], "pretrain.epoch: unknown key"),
    (["data.batchsize=3"], "data.batchsize: unknown key"),
    (["model.depth=abc"], "model.depth: Input should be a valid integer"),
    (["data.batch_size=0"], "data.batch_size: Input should be greater than or equal to 1"),
    (["data.dataset=mnist"], "data.dataset: Input should be 'fashion_mnist'"),
    (["model.embed_dim=100", "model.num_heads=3"], "embed_dim=100 is not divisible"),
    (["scaling.precision=fp16"], "scaling.precision"),
    (["name=has space"], "name: String should match pattern"),
    (["search.budget_metric=flops"], "search.budget_metric: Input should be 'macs' or 'latency'"),
    (["search.budget_metric=latency", "search.method=uvc"],
     "budget_metric='latency' is not supported by search.method='uvc'; it supports"),
    (["search.budget_metric=latency", "search.target_gmacs=0.01"], "search.target_gmacs is a"),
])
def test_each_bad_value_is_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_several_errors_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["pretrain.epoch=3", "model.depth=abc"])
    assert "pretrain.epoch" in str(e.value) and "model.depth" in str(e.value)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["pretrain.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_pretrain_key_ignores_resources_but_not_recipe():
    a = load_config(None, [])
    b = load_config(None, ["scaling.num_workers=1", "data.loader_workers=2"])
    c = load_config(None, ["pretrain.lr=0.01"])
    assert a.pretrain_key() == b.pretrain_key() != c.pretrain_key()


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.run", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_errors_exit_before_ray(tmp_path):
    r = _run(f"output_dir={tmp_path}", "pretrain.epoch=3")
    assert r.returncode == 2 and "pretrain.epoch: unknown key" in r.stderr
    assert "Ray" not in r.stdout and not (tmp_path / "fmnist_vit").exists()
    r = _run(f"output_dir={tmp_path}", f"data.root={tmp_path / 'none'}")
    assert r.returncode == 2 and "none" in r.stderr and "dataset-fashion-mnist" in r.stderr
    r = _run(f"output_dir={tmp_path}", "model.name=vit_nonexistent")
    assert r.returncode == 2 and "vit_nonexistent" in r.stderr


def test_cli_dry_run_prints_resolved_config(tmp_path):
    r = _run("--dry-run", f"output_dir={tmp_path}", "pretrain.epochs=1")
    assert r.returncode == 0, r.stderr
    assert "epochs: 1" in r.stdout and "M MACs/image" in r.stdout


def test_phase_keys_follow_their_settings():
    a = load_config(None, [])
    b = load_config(None, ["search.budget=0.3"])
    c = load_config(None, ["finetune.epochs=3", "scaling.num_workers=1"])
    assert a.search_key() != b.search_key() and a.finetune_key() != b.finetune_key()
    assert a.search_key() == c.search_key() and a.finetune_key() != c.finetune_key()
    assert a.pretrain_key() == b.pretrain_key()


def test_unreachable_tracking_server_fails_before_ray(tmp_path):
    from tests.conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    r = _run(f"output_dir={tmp_path}", f"mlflow.tracking_uri={uri}")
    assert r.returncode == 2
    assert f"mlflow.tracking_uri={uri!r}: no MLflow server answers there" in r.stderr
    assert "mlflow server --host 127.0.0.1" in r.stderr and "Ray" not in r.stdout
    r = _run("--dry-run", f"output_dir={tmp_path}", "mlflow.tracking_uri=./mlruns")
    assert r.returncode == 2 and "MLflow 3 refuses file stores" in r.stderr


def test_search_key_hashes_only_the_active_method():
    a = load_config(None, ["sweep=null"])
    assert a.search_key() != load_config(None, ["sweep=null", "search.ofb.temperature=0.8"]
                                         ).search_key()
    for other in ("search.vit_slim.l1_attn=0.1", "search.two_stage.score_batches=2"):
        assert load_config(None, ["sweep=null", other]).search_key() == a.search_key(), other
    slim = load_config(None, ["sweep=null", "search.method=vit_slim"])
    assert slim.search_key() == load_config(None, [
        "sweep=null", "search.method=vit_slim", "search.ofb.temperature=0.8"]).search_key()


@pytest.mark.parametrize("old,new", [
    ("search.temperature=0.8", "search.ofb.temperature"),
    ("search.warmup_epochs=1", "search.lr_warmup_epochs"),
    ("search.score_batches=4", "search.two_stage.score_batches"),
    ("search.slim_tokens=true", "search.vit_slim.tokens"),
])
def test_moved_flat_keys_are_refused_with_their_new_name(old, new):
    with pytest.raises(ConfigError, match=f"is now {new}"):
        load_config(None, [old])


def test_cli_method_section_resolves_and_old_key_is_refused(tmp_path):
    r = _run("--dry-run", f"output_dir={tmp_path}", "search.method=ofb",
             "search.ofb.temperature=0.8")
    assert r.returncode == 0, r.stderr
    assert "temperature: 0.8" in r.stdout
    r = _run("--dry-run", f"output_dir={tmp_path}", "search.temperature=0.8")
    assert r.returncode == 2 and "search.temperature is now search.ofb.temperature" in r.stderr
    r = _run("--dry-run", f"output_dir={tmp_path}",
             'sweep.space={"search.mask_ratio": {"type": "uniform", "low": 0.1, "high": 0.3}}',
             "sweep.points_to_evaluate=[]")
    assert r.returncode == 2 and "search.ofb.mask_ratio" in r.stderr


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    if cfg.sweep is not None:  # every point names registered methods and valid values
        assert cfg.sweep.num_samples >= len(cfg.sweep.points_to_evaluate)
