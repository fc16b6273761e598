"""`orchestrator.run --schedule NAME --slot SLOT|auto`: the driver finds its slot, names its run
after it and follows the ledger (no Ray: the run stops at the ledger or at --dry-run)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from orchestrator.config import ConfigError, load_config
from orchestrator.run import main
from orchestrator.schedules import driver
from orchestrator.schedules.ledger import Ledger

UTC = timezone.utc
NOW = datetime(2026, 3, 1, 2, 7, tzinfo=UTC)


def _cfg(tmp_path, **schedule):
    over = {"name": "nightly", "cron": "0 2 * * *", **schedule}
    return load_config(None, [f"output_dir={tmp_path}",
                              *(f"schedule.{k}={v}" for k, v in over.items())])


def _job(monkeypatch, **metadata):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {}, "metadata": metadata}))


def test_slot_auto_from_metadata_kuberay_or_the_due_tick(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert driver.resolve_slot(cfg, "auto", NOW) == "20260301T0200Z"  # the due tick
    assert driver.resolve_slot(cfg, "20260215T0200Z", NOW) == "20260215T0200Z"
    with pytest.raises(ValueError, match="YYYYMMDDTHHMMZ"):
        driver.resolve_slot(cfg, "yesterday", NOW)
    # a KubeRay RayCronJob child: <cronjob>-<unix minutes>-<rand5>
    minutes = int(datetime(2026, 2, 20, 2, 0, tzinfo=UTC).timestamp()) // 60
    _job(monkeypatch, job_submission_id=f"ofb-nightly-{minutes}-ab3c9")
    assert driver.resolve_slot(cfg, "auto", NOW) == "20260220T0200Z"
    _job(monkeypatch, job_submission_id="ofb-nightly-20260218t0200z-a1",
         ofb_slot="20260218T0200Z")  # submitted by orchestrator.schedule / submit
    assert driver.resolve_slot(cfg, "auto", NOW) == "20260218T0200Z"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """apply() exports the slot for the parent run's tags: keep it out of other tests."""
    for k in ("OFB_SCHEDULE", "OFB_SLOT", "OFB_ATTEMPT", "OFB_DATA_DIGEST"):
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)


def test_run_is_named_after_its_slot(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    assert driver.schedule_tags() == {}
    driver.apply(cfg, "nightly", "20260301T0200Z")
    _job(monkeypatch, job_submission_id="ofb-nightly-20260301t0200z-a1")
    tags = driver.schedule_tags()
    assert len(tags.pop("ofb_data_digest")) == 16
    assert tags == {
        "ofb_schedule": "nightly", "ofb_slot": "20260301T0200Z", "ofb_attempt": "1",
        "ofb_slot_time": "2026-03-01T02:00:00+00:00",
        "ray_submission_id": "ofb-nightly-20260301t0200z-a1"}
    assert cfg.name == "nightly-20260301T0200Z" and cfg.mlflow.experiment == "nightly"
    assert cfg.mlflow.registered_model == "nightly-subnet"
    with pytest.raises(ConfigError, match="schedule is named 'nightly'"):
        driver.apply(_cfg(tmp_path), "weekly", "20260301T0200Z")


def test_driver_follows_the_ledger(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    cfg, led = _cfg(tmp_path), Ledger(tmp_path, "nightly")
    go, why = driver.enter(cfg, "nightly", "20260301T0200Z", NOW)
    assert go and "claimed" in why
    _job(monkeypatch, job_submission_id="another-driver")
    assert not driver.enter(cfg, "nightly", "20260301T0200Z", NOW)[0]  # a second driver
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    driver.finish(cfg, "nightly", "20260301T0200Z", "SUCCEEDED", 0, "run123")
    last = led.read("20260301T0200Z")["attempts"][-1]
    assert (last["status"], last["driver_exit_code"], last["mlflow_run_id"]) == (
        "SUCCEEDED", 0, "run123")
    # a submitted attempt: the driver takes it over by its submission id
    led.claim("20260302T0200Z", {"attempts": [{"submission_id": "ofb-n-a1",
                                               "status": "PENDING"}]})
    _job(monkeypatch, job_submission_id="ofb-n-a1")
    assert driver.enter(cfg, "nightly", "20260302T0200Z", NOW)[0]
    assert led.read("20260302T0200Z")["attempts"][-1]["status"] == "RUNNING"
    # overlap: that slot still runs; skip records the new one, allow runs it
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    go, why = driver.enter(cfg, "nightly", "20260303T0200Z", NOW)
    assert not go and "SKIPPED" in why and led.read("20260303T0200Z")["decision"] == "SKIPPED"
    assert driver.enter(_cfg(tmp_path, overlap="allow"), "nightly", "20260304T0200Z", NOW)[0]


def test_run_stops_at_a_finished_slot_without_ray(tmp_path, capsys):
    Ledger(tmp_path, "nightly").claim("20260301T0200Z", {
        "attempts": [{"submission_id": "x", "status": "SUCCEEDED"}]})
    code = main(["--schedule", "nightly", "--slot", "20260301T0200Z", f"output_dir={tmp_path}",
                 "schedule.cron=0 2 * * *", "schedule.name=nightly", "data.max_train_samples=64"])
    assert code == 0 and "already SUCCEEDED" in capsys.readouterr().out
    assert main(["--slot", "20260301T0200Z", f"output_dir={tmp_path}"]) == 2
    assert "--slot needs --schedule" in capsys.readouterr().err


def test_dense_cache_key_follows_the_data_only_when_scheduled(tmp_path):
    """G8: with refresh_dense on_data_change the dense model's key follows the data's content;
    unscheduled keys (every cached dense model users have) do not change."""
    from tests.conftest import write_png_folder

    assert load_config("configs/compare_methods.yaml").pretrain_key() == "ccbb5fc0ca267ed4"
    data = write_png_folder(tmp_path / "data", train=2, val=1)
    base = [f"output_dir={tmp_path}", "data.dataset=imagefolder", f"data.root={data}",
            "schedule.name=nightly", "schedule.cron=0 2 * * *"]

    def key(mode: str | None = None, slot: str = "20260301T0200Z") -> str:
        cfg = load_config(None, base + ([f"schedule.refresh_dense={mode}"] if mode else []))
        if mode:
            driver.apply(cfg, "nightly", slot)
        return cfg.pretrain_key()

    plain = key()
    assert key("never") == plain
    before = key("on_data_change")
    assert before != plain and before == key("on_data_change", "20260302T0200Z")
    assert key("always") != key("always", "20260302T0200Z")
    class0 = data / "train" / "class_0"
    (class0 / "new.png").write_bytes(next(class0.iterdir()).read_bytes())  # refreshed folder
    assert key("on_data_change") != before and key() == plain == key("never")


def test_warm_start_puts_the_previous_slots_front_first(tmp_path, capsys):
    from orchestrator.results import write_results

    dense = 1_000_000
    rows = [{"trial_id": f"t{i}", "method": "ofb", "target_macs": b * dense, "macs": m,
             "params": 1000, "dense_macs": dense, "top1": t, "top1_before_finetune": t,
             "search_device_hours": 0.01, "finetune_device_hours": 0.01,
             "device_kind": "cpu_core", "search.budget": b}
            for i, (b, m, t) in enumerate([(0.3, 300_000, 0.80), (0.5, 500_000, 0.85),
                                           (0.7, 690_000, 0.84),  # dominated by 0.5
                                           (0.9, 880_000, 0.90)])]  # 0.9: not in this space
    write_results(tmp_path / "nightly-20260301T0200Z" / "results.parquet", rows,
                  ["search.budget"])
    space = '{"search.budget": {"type": "choice", "values": [0.3, 0.5, 0.7]}}'
    cfg = load_config(None, [f"output_dir={tmp_path}", "schedule.name=nightly",
                             "schedule.cron=0 2 * * *", f"sweep.space={space}",
                             'sweep.points_to_evaluate=[{"search.budget": 0.5}]'])
    driver.apply(cfg, "nightly", "20260302T0200Z")
    assert cfg.sweep.points_to_evaluate == [{"search.budget": 0.3}, {"search.budget": 0.5}]
    assert "1 point(s) of slot 20260301T0200Z" in capsys.readouterr().out
    first = load_config(None, [f"output_dir={tmp_path}", "schedule.name=nightly",
                               "schedule.cron=0 2 * * *", f"sweep.space={space}",
                               "schedule.warm_start=none", "sweep.points_to_evaluate=[]"])
    driver.apply(first, "nightly", "20260302T0200Z")
    assert first.sweep.points_to_evaluate == []
