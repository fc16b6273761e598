"""Start Ray embedded on this machine, or connect to a running cluster.

`--address`/`ray.address`/`RAY_ADDRESS` select a cluster ('auto' on the head node, or
'ray://host:10001'); without any, Ray starts inside this process (the embedded default).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import ray

from orchestrator import locks

# Environment every Ray worker of ours gets: no hub look-ups (offline machines), and worker
# prints once (Train V2's print patch tees them to the logger too, so each line came twice).
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def resolve_address(address: str | None) -> str | None:
    """None or 'local' means embedded; otherwise the cluster address (RAY_ADDRESS as fallback)."""
    if address in (None, ""):
        address = os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "local") else address


def job_env_vars() -> dict[str, str]:
    """The env vars of the Ray job this driver runs in ({} outside a job). Ray merges a job's
    runtime env with the driver's `ray.init(runtime_env=...)` and fails on any key set by both."""
    blob = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not blob:
        return {}
    try:  # a private format: read defensively
        return dict(json.loads(blob).get("runtime_env", {}).get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


DASHBOARD_PORT = 8265  # Ray's default, kept for an embedded Ray while it is free
START_LOCK = Path(tempfile.gettempdir()) / "ofb-orchestrator-ray-start.lock"
_dashboard: dict[str, str] = {}  # "url" of the dashboard this process started or joined


def free_port(prefer: int = 0) -> int:
    """A TCP port free on loopback now: `prefer` if it is, else the OS's pick."""
    for port in (prefer, 0) if prefer else (0,):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free TCP port on 127.0.0.1")


def dashboard_url() -> str | None:
    """The Ray dashboard's address once `start_ray` ran (None if Ray did not say)."""
    return _dashboard.get("url")


def worker_env(api_server: str | None = None) -> dict[str, str]:
    """What our Ray workers get: WORKER_ENV (the process's own values win), two pass-through
    settings and, for an embedded Ray, its state API's address, minus any key the surrounding
    Ray job already sets (it reaches workers anyway).

    Why the address: Ray Train's detached helpers (the placement-group cleaner that frees a dead
    controller's CPUs, the state actor) ask the state API whether a controller lives, and a
    worker finds that API from RAY_ADDRESS or else by looking for a local Ray. With two Rays on
    one machine (two sweeps, or a sweep beside a test run) that look-up fails ("multiple active
    Ray instances"), the cleaner's thread dies, and a killed trial driver's CPUs stay taken: its
    restarted trial waited for them for good."""
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
    if api_server is not None:
        env["RAY_API_SERVER_ADDRESS"] = api_server
    for k in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "TIMM_FUSED_ATTN"):
        if k in os.environ:
            env[k] = os.environ[k]
    job = job_env_vars()
    return {k: v for k, v in env.items() if k not in job}


def _one_start_at_a_time() -> AbstractContextManager:
    """An flock that our processes on this machine take from choosing an embedded Ray's ports
    until Ray has bound them (seen: two sweeps started at once both asked for 8265, and the
    second's Ray failed to start). Another user's lock file is not waited for."""
    try:
        open(START_LOCK, "a").close()
    except OSError:
        return nullcontext()
    return locks.hold(START_LOCK, wait=True)


def start_ray(address: str | None = None, health_check_interval_s: float = 0.2,
              num_cpus: int | None = None, quiet: bool = True) -> dict[str, Any]:
    """Start or join Ray once per process; returns the cluster's total resources."""
    if ray.is_initialized():
        return ray.cluster_resources()
    addr = resolve_address(address)
    # Read by the Train controller, which inherits the environment of the Ray processes.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(health_check_interval_s))
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if addr is None:  # one machine: no tokens, no preemption to watch for
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    kwargs: dict[str, Any] = dict(log_to_driver=True, configure_logging=True)
    if quiet:
        kwargs["logging_level"] = "WARNING"
    if addr is None:  # "local": a `ray start` head on this machine must not be joined (G4)
        # the dashboard's port is chosen here so that the workers can be told it (worker_env);
        # one start at a time, or two sweeps started together both pick a port free at the time
        with _one_start_at_a_time():
            port = free_port(prefer=DASHBOARD_PORT)
            ctx = ray.init(**kwargs, address="local", num_cpus=num_cpus, include_dashboard=True,
                           dashboard_host="127.0.0.1", dashboard_port=port, runtime_env={
                               "env_vars": worker_env(f"http://127.0.0.1:{port}")})
    else:
        ctx = ray.init(**kwargs, address=addr, runtime_env={"env_vars": worker_env()})
    if url := getattr(ctx, "dashboard_url", None):
        _dashboard["url"] = url if "://" in url else f"http://{url}"
    return ray.cluster_resources()
