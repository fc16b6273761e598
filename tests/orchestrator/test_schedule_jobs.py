"""What a scheduled sweep sends to Ray, and what is refused before anything is sent (no Ray)."""

from __future__ import annotations

import pytest

from orchestrator.config import ConfigError, load_config
from orchestrator.ray_setup import WORKER_ENV
from orchestrator.schedules.jobs import EXCLUDES, job_spec, preflight


@pytest.mark.parametrize("overrides,match", [
    (["output_dir=./runs"], "output_dir='./runs' is relative"),
    (["output_dir=/abs", "cache_dir=cache"], "cache_dir='cache' is relative"),
    (["output_dir=/abs", "mlflow.tracking_uri=sqlite:///rel.db"], "relative SQLite path"),
])
def test_preflight_refuses_what_a_job_would_lose(overrides, match):
    with pytest.raises(ConfigError, match=match):
        preflight(load_config(None, overrides))


def test_preflight_accepts_absolute_paths_and_servers():
    preflight(load_config(None, ["output_dir=/shared/runs", "cache_dir=/shared/cache",
                                 "mlflow.tracking_uri=http://mlflow:5000"]))
    preflight(load_config(None, ["output_dir=/shared/runs",
                                 "mlflow.tracking_uri=sqlite:////shared/mlflow.db"]))


def test_job_spec_carries_slot_commit_and_stop_signal():
    cfg = load_config(None, ["output_dir=/shared/runs"])
    j = job_spec(cfg, "configs/ofb_quick.yaml", ["seed=1"], "nightly", "20260301T0200Z", 2)
    assert j.submission_id == "ofb-nightly-20260301t0200z-a2"
    assert j.entrypoint == ("python -m orchestrator.run --config configs/ofb_quick.yaml "
                            "--schedule nightly --slot 20260301T0200Z seed=1")
    adhoc = job_spec(cfg, "/elsewhere/x.yaml", [], "adhoc", "20260301T0200Z", 1, dry_run=True)
    assert adhoc.entrypoint == ("python -m orchestrator.run --config /elsewhere/x.yaml "
                                "--dry-run name=adhoc-20260301T0200Z")
    env = j.runtime_env["env_vars"]
    assert env["RAY_JOB_STOP_SIGNAL"] == "SIGINT" and int(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 60
    assert len(env["OFB_GIT_COMMIT"]) == 40 and env["OFB_SLOT"] == "20260301T0200Z"
    assert not set(env) & set(WORKER_ENV)  # Ray refuses to merge a key set twice (G2)
    assert j.runtime_env["excludes"] == EXCLUDES and "runs/" in EXCLUDES
    assert all(isinstance(v, str) for v in j.metadata.values())  # Ray's metadata: strings only
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        job_spec(cfg, None, [], "nightly", "20260301T0200Z", 1,
                 extra_env={"HF_HUB_OFFLINE": "0"})
    assert "working_dir" not in job_spec(cfg, None, [], "n", "20260301T0200Z", 1,
                                         upload=False).runtime_env


def test_worker_env_leaves_out_what_the_job_sets(monkeypatch):
    """G2: inside a Ray job whose runtime env sets one of our worker keys, the driver's own
    ray.init must not set it again (Ray fails the merge); outside a job nothing changes."""
    import json

    from orchestrator.ray_setup import job_env_vars, worker_env

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job_env_vars() == {} and set(WORKER_ENV) <= set(worker_env())
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1", "OFB_SLOT": "x"}},
         "metadata": {"job_submission_id": "ofb-n-1-a1"}}))
    assert job_env_vars()["OFB_SLOT"] == "x"
    env = worker_env()
    assert "HF_HUB_OFFLINE" not in env and "TOKENIZERS_PARALLELISM" in env
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    assert job_env_vars() == {}


def test_submitted_runs_keep_their_commit(monkeypatch):
    """G7: a job's upload leaves .git out; the commit comes from the env the submit sets."""
    from orchestrator.tracking import _code_version

    monkeypatch.delenv("OFB_GIT_COMMIT", raising=False)
    local = _code_version()["mlflow.source.git.commit"]
    assert len(local) == 40
    monkeypatch.setenv("OFB_GIT_COMMIT", "f" * 40)
    monkeypatch.setenv("OFB_GIT_DIRTY", "1")
    tags = _code_version()
    assert tags["mlflow.source.git.commit"] == "f" * 40 and tags["ofb_git_dirty"] == "True"


def test_submit_refuses_before_contacting_ray(capsys):
    """Exit 2 with one message naming the bad value: a relative output_dir, then a cluster
    address where no dashboard answers (nothing is submitted in either case)."""
    from orchestrator.submit import main

    assert main(["output_dir=./runs"]) == 2
    assert "output_dir='./runs' is relative" in capsys.readouterr().err
    assert main(["--address", "http://127.0.0.1:9", "output_dir=/shared/runs"]) == 2
    assert "no Ray dashboard answers there" in capsys.readouterr().err
    assert main(["--env", "HF_HUB_OFFLINE=0", "output_dir=/shared/runs"]) == 2
    assert "['HF_HUB_OFFLINE'] are set by the orchestrator" in capsys.readouterr().err
    assert main(["--env", "NOVALUE", "output_dir=/shared/runs"]) == 2
    assert "--env 'NOVALUE': give KEY=VALUE" in capsys.readouterr().err
    assert main(["--schedule", "weekly", "output_dir=/shared/runs"]) == 2
    assert "the config has no `schedule` section" in capsys.readouterr().err


def test_schedule_refuses_before_contacting_ray(capsys):
    from orchestrator.schedule import main

    assert main(["output_dir=/shared/runs"]) == 2
    assert "no `schedule` section" in capsys.readouterr().err
    assert main(["--now", "2026-03-01T02:05", "output_dir=/shared/runs",
                 "schedule.cron=0 2 * * *"]) == 2
    assert "has no time zone" in capsys.readouterr().err
    assert main(["output_dir=/shared/runs", "schedule.cron=0 2 * * *",
                 "schedule.address=http://127.0.0.1:9"]) == 2
    assert "schedule.address http://127.0.0.1:9: no Ray dashboard" in capsys.readouterr().err
