"""One sweep as a Ray job (../shared/SCHEDULING.md section 2): what `orchestrator.submit` sends
through the Jobs SDK, and the refusals it makes before sending anything.

A job's driver runs in the uploaded package folder on the head, so everything it writes must
go to absolute paths that outlive that folder (G1); its git commit travels as env vars, since
the upload leaves `.git` out (G7); its stop signal is SIGINT with a wait, so a stopped sweep
checkpoints and can resume; it never sets the keys the orchestrator's own `ray.init` sets for
its workers, which Ray refuses to merge (G2).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import Config, ConfigError
from orchestrator.ray_setup import WORKER_ENV
from orchestrator.schedules.slots import submission_id

STOP_ENV = {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": "120"}
# env var names refused in a job's runtime env (visible in the dashboard and the job list)
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_KEY",
                         re.I)
EXCLUDES = ["runs/", "*.db", "mlruns/", ".venv/", ".git/", "__pycache__/"]
REPO = Path(__file__).resolve().parents[2]


def preflight(cfg: Config) -> None:
    """Refuse what a job would lose or break, with one message naming each bad value."""
    bad = []
    for key in ("output_dir", "cache_dir"):
        v = getattr(cfg, key)
        if v is not None and not Path(v).expanduser().is_absolute():
            bad.append(f"{key}={v!r} is relative: a job's working folder is deleted with the "
                       "head's session; give an absolute path on storage every node shares")
    uri = cfg.mlflow.tracking_uri
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        bad.append(f"mlflow.tracking_uri={uri!r} is a relative SQLite path; use "
                   "sqlite:////absolute/path.db or an MLflow server")
    if bad:
        raise ConfigError("cannot submit: " + "; ".join(bad))


def git_state(repo: Path = REPO) -> tuple[str, bool]:
    """(commit, dirty) of the code: OFB_GIT_COMMIT / OFB_GIT_DIRTY inside a submitted job
    (its upload has no .git, G7), else git; ('unknown', False) outside git."""
    if os.environ.get("OFB_GIT_COMMIT"):
        return os.environ["OFB_GIT_COMMIT"], os.environ.get("OFB_GIT_DIRTY", "0") == "1"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=repo, capture_output=True, text=True, check=True,
                                    timeout=10).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


@dataclass
class JobSpec:
    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)


def _config_arg(config_file: str) -> str:
    """The config as the job sees it: relative to the uploaded repo when it lies inside it (the
    job's cwd is the unpacked upload), else the absolute path, which must then exist on the head
    (shared storage)."""
    p = Path(config_file).expanduser().resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def job_spec(cfg: Config, config_file: str | None, overrides: list[str], schedule: str,
             slot: str, attempt: int, python: str = "python", upload: bool = True,
             extra_env: dict[str, str] | None = None, dry_run: bool = False) -> JobSpec:
    """The job of one attempt at one slot (or of an ad-hoc run: schedule 'adhoc', which is
    named `adhoc-<slot>` and keeps no ledger). A scheduled job runs `orchestrator.run --schedule
    S --slot X`, so its driver takes over the ledger entry and names its run after the slot;
    `dry_run` makes the job only validate its config (the wiring, checked without training)."""
    secret = sorted(k for k in extra_env or {} if SECRET_NAME.search(k))
    if secret:
        raise ConfigError(f"env vars {secret} look like secrets; a job's runtime env is shown "
                          "to anyone who can read the Ray dashboard or `ray job list`: give "
                          "secrets to the cluster's nodes (their environment or a file) instead")
    clash = sorted(set(extra_env or {}) & set(WORKER_ENV))
    if clash:
        raise ConfigError(f"env vars {clash} are set by the orchestrator for its workers; a job "
                          "that sets them too fails Ray's runtime-env merge (leave them out)")
    commit, dirty = git_state()
    env = {**(extra_env or {}), **STOP_ENV, "OFB_GIT_COMMIT": commit,
           "OFB_GIT_DIRTY": str(int(dirty)), "OFB_SCHEDULE": schedule, "OFB_SLOT": slot,
           "OFB_ATTEMPT": str(attempt)}
    runtime_env: dict[str, Any] = {"env_vars": env}
    if upload:
        runtime_env.update(working_dir=str(REPO), excludes=EXCLUDES)
    args = [python, "-m", "orchestrator.run"]
    if config_file:
        args += ["--config", _config_arg(config_file)]
    if schedule != "adhoc":
        args += ["--schedule", schedule, "--slot", slot]
    if dry_run:
        args += ["--dry-run"]
    if schedule == "adhoc":  # options first: argparse takes the key=value list once
        args += [f"name={schedule}-{slot}"]
    args += list(overrides)
    sid = submission_id(schedule, slot, attempt)
    meta = {"ofb_schedule": schedule, "ofb_slot": slot, "ofb_attempt": str(attempt),
            "ofb_git_commit": commit, "ofb_config_name": cfg.name}
    return JobSpec(sid, " ".join(shlex.quote(a) for a in args), runtime_env, meta)
