"""The ready-made launchers parse, call commands that exist, and name valid schedules (text
only: no cron daemon, systemd or Airflow in tests)."""

from __future__ import annotations

import ast
import configparser
import shlex
from pathlib import Path

from croniter import croniter

from orchestrator.config import load_config
from orchestrator.schedules.jobs import preflight

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy" / "schedule"


def test_nightly_config_is_a_valid_schedule():
    cfg = load_config(ROOT / "configs" / "nightly.yaml")
    assert cfg.schedule is not None and cfg.schedule.name == "nightly"
    preflight(cfg)  # absolute output_dir, an MLflow server: submittable


def test_crontab_line_calls_the_reconcile_every_10_minutes():
    lines = [ln for ln in (DEPLOY / "crontab").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1
    fields = lines[0].split(maxsplit=5)
    assert croniter.is_valid(" ".join(fields[:5])) and fields[:5] == ["*/10", "*", "*", "*", "*"]
    cmd = shlex.split(fields[5].replace("$HOME", "/home/u"))
    assert "orchestrator.schedule" in cmd and "configs/nightly.yaml" in cmd
    assert cmd[cmd.index("--every") + 1] == "600"  # the period it is called at


def test_systemd_units():
    svc = configparser.ConfigParser(interpolation=None, strict=False)
    svc.read(DEPLOY / "ofb-schedule.service")
    assert svc["Service"]["Type"] == "oneshot"
    assert "-m orchestrator.schedule --config configs/nightly.yaml --every 600" in \
        svc["Service"]["ExecStart"]
    timer = configparser.ConfigParser(interpolation=None, strict=False)
    timer.read(DEPLOY / "ofb-schedule.timer")
    assert timer["Timer"]["OnCalendar"] == "*:0/10" and timer["Timer"]["Persistent"] == "true"


def test_airflow_dag_submits_the_logical_date_slot_once():
    src = (DEPLOY / "airflow_dag.py").read_text()
    tree = ast.parse(src)  # Airflow is not installed here: parsed, not imported
    calls = {n.func.id: n for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    dag = {k.arg: k.value for k in calls["DAG"].keywords}
    assert ast.literal_eval(dag["max_active_runs"]) == 1
    assert croniter.is_valid(ast.literal_eval(dag["schedule"]))
    assert "orchestrator.submit" in src and "logical_date.strftime('%Y%m%dT%H%MZ')" in src
    cmd = next(n for n in ast.walk(calls["BashOperator"]) if isinstance(n, ast.JoinedStr))
    text = "".join(v.value for v in cmd.values if isinstance(v, ast.Constant))
    assert "--follow" in text and "--attempt" not in text  # a retry: no second job on a slot


def test_raycronjob_manifest():
    import shlex

    import yaml

    from orchestrator.run import _parse

    doc = yaml.safe_load((DEPLOY / "raycronjob.yaml").read_text())
    assert doc["kind"] == "RayCronJob" and len(doc["metadata"]["name"]) <= 36
    spec = doc["spec"]
    assert croniter.is_valid(spec["schedule"]) and "TZ=" not in spec["schedule"]
    entry = shlex.split(spec["jobTemplate"]["entrypoint"])
    assert entry[:3] == ["python", "-m", "orchestrator.run"]
    args = _parse(entry[3:])  # the flags exist and parse
    assert (args.schedule, args.slot, args.config) == ("nightly", "auto", "configs/nightly.yaml")
    env = yaml.safe_load(spec["jobTemplate"]["runtimeEnvYAML"])["env_vars"]
    assert env["RAY_JOB_STOP_SIGNAL"] == "SIGINT"
    nightly = load_config(ROOT / "configs" / "nightly.yaml")
    assert nightly.schedule.cron == spec["schedule"] and nightly.output_dir.startswith("/mnt")
