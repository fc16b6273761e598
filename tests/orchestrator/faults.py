"""Real faults for Ray tests: kill a Ray Train worker once a run has checkpointed; and the tools
of the fault drivers (fault_drivers.py, shared by tests/orchestrator/test_faults.py and
`bench/faults.py`): processes found and SIGKILLed, subprocess runs, a tiny sweep's config, an
MLflow server that can be killed and restarted, and what a sweep left, read back.

Processes are found by walking /proc down from a process we started (Ray's workers are children
of the raylet its driver started, titled `ray::RayTrainWorker...`, `ray::ImplicitFunc...`), so a
fault never touches another Ray on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
SPACE = {"search.budget": {"type": "choice", "values": [0.4, 0.6]}}


def kill_one_train_worker() -> int:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[
        ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert actors, "no live Ray Train worker to kill"
    pid = actors[-1].pid
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_for(ready: Callable[[], Any], timeout: float, what: str,
             proc: subprocess.Popen | None = None, poll: float = 0.1) -> Any:
    """`ready()`'s first truthy value within `timeout` s; fails early if `proc` has ended."""
    deadline = time.time() + timeout
    while not (value := ready()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"waiting for {what}: the process ended ({proc.returncode})")
        if time.time() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        time.sleep(poll)
    return value


def run_and_kill_after_checkpoint(fn: Callable[[], Any], run_dir: Path,
                                  wait_s: float = 300, join_s: float = 900,
                                  pattern: str = "checkpoint_*/state.json") -> Any:
    """Run `fn` in a thread; SIGKILL one Train worker once a file matching `pattern` (default:
    the first checkpoint) appears in `run_dir`; return `fn`'s result (its exception is
    re-raised here)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = e

    th = threading.Thread(target=target)
    th.start()
    wait_for(lambda: list(run_dir.glob(pattern)), wait_s, pattern)
    time.sleep(0.5)  # let Ray register the checkpoint it just wrote
    kill_one_train_worker()
    th.join(timeout=join_s)
    assert not th.is_alive(), f"the run did not end within {join_s} s of the kill"
    if "error" in box:
        raise box["error"]
    return box["result"]


# -- processes ----------------------------------------------------------------------------
def _proc(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, command line) of a live process, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        return int(stat[1]), int(stat[19]), cmd
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> dict[int, tuple[int, int, str]]:
    """Every live process below `root`: pid -> (parent, start time, command line)."""
    procs = {int(d.name): p for d in Path("/proc").iterdir()
             if d.name.isdigit() and (p := _proc(int(d.name)))}
    found, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, p in procs.items():
            if p[0] == parent and pid not in found:
                found[pid] = p
                todo.append(pid)
    return found


def kill_newest(root: int, title: str) -> int:
    """SIGKILL the newest process below `root` whose title starts with `title` (Ray titles its
    actors `ray::<Class>.<method>`); its pid."""
    hits = [(p[1], pid) for pid, p in descendants(root).items() if p[2].startswith(title)]
    assert hits, f"no {title} process below pid {root}"
    pid = max(hits)[1]
    os.kill(pid, signal.SIGKILL)
    return pid


def kill_leftovers(below: dict[int, tuple[int, int, str]]) -> None:
    """SIGKILL what is still alive of `descendants(...)` taken earlier: Ray workers leave their
    process group, and outlive a stopped raylet for a while."""
    time.sleep(1)
    for pid, (_, start, _) in below.items():
        if (p := _proc(pid)) is not None and p[1] == start:  # the same process, still there
            os.kill(pid, signal.SIGKILL)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process we started in its own session, and everything below it."""
    below = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    kill_leftovers(below)


@dataclass
class Run:
    """One `python -m orchestrator.run` in its own session, its output in a log file."""
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 900) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc)
            raise AssertionError(f"{self.log} still running after {timeout:.0f} s:\n"
                                 + self.text()[-3000:]) from None


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """`python -m orchestrator.run ARGS`: its own embedded Ray (no RAY_ADDRESS), its own
    process group, from the repo root."""
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "w")  # the child keeps its copy
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.run", *args], stdout=out,
                            stderr=subprocess.STDOUT, env={**environ, **(env or {})},
                            cwd=REPO, start_new_session=True)
    out.close()
    return Run(proc, log)


# -- the sweep every fault runs, and what it left -------------------------------------------
def overrides(root: Path, cache: Path, name: str, samples: int, **extra: object) -> list[str]:
    """A tiny sweep of `samples` trials (one at a time) under root/runs; the dense model cached
    in `cache`, which every fault shares."""
    over = tiny_overrides(root, **{
        "name": name, "cache_dir": str(cache), "pretrain.epochs": 1, "search.epochs": 1,
        "search.lr_warmup_epochs": 0.5, "search.ofb.ramp_epochs": 0.5, "finetune.epochs": 1,
        **extra})
    return over + [f"sweep.num_samples={samples}", f"sweep.space={json.dumps(SPACE)}",
                   "sweep.points_to_evaluate=[]", "sweep.max_concurrent_trials=1"]


def finished(run_dir: Path) -> list[Path]:
    """The finished trials' fine-tune results (trial folders hold them once a trial is done)."""
    return sorted((run_dir / "trials").glob("trial-*/finetune/result.json"))


@dataclass
class Outcome:
    """What a sweep left: trials finished on disk, and where each is recorded."""
    finished: set[str]
    parquet: list[str]  # trial ids, repeats kept (a duplicate shows)
    mlflow: list[str]  # trial ids of complete child runs (FINISHED, model logged)
    parents: int  # sweep runs of this folder
    subnets: int  # results.parquet rows whose subnet loads

    @property
    def lost(self) -> int:
        """Finished trials missing from results.parquet or MLflow, and subnets that fail."""
        return (len(self.finished - set(self.parquet)) + len(self.finished - set(self.mlflow))
                + len(self.parquet) - self.subnets)

    @property
    def duplicates(self) -> int:
        return (len(self.parquet) - len(set(self.parquet)) + len(self.mlflow)
                - len(set(self.mlflow)) + max(self.parents - 1, 0))

    def text(self) -> str:
        n = len(self.finished)
        return (f"parquet {len(set(self.parquet))}/{n}, MLflow {len(set(self.mlflow))}/{n}, "
                f"subnets {self.subnets}/{n}"
                + (f", {self.duplicates} duplicate(s)" if self.duplicates else ""))


def parquet_rows(run_dir: Path) -> list[dict]:
    import pyarrow.parquet as pq

    table = run_dir / "results.parquet"
    return pq.read_table(table).to_pylist() if table.exists() else []


def outcome(run_dir: Path, uri: str | None = None, experiment: str | None = None) -> Outcome:
    """Read back a sweep's folder and its MLflow store (default: the embedded one) and
    experiment (default: the sweep's name)."""
    from mlflow import MlflowClient

    from search_space.subnet import load_subnet

    done = {f.parent.parent.name.removeprefix("trial-") for f in finished(run_dir)}
    rows = parquet_rows(run_dir)
    subnets = 0
    for r in rows:
        try:
            load_subnet(r["subnet_path"])
            subnets += 1
        except (OSError, ValueError):
            pass
    uri = uri or f"sqlite:///{run_dir.parent / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment or run_dir.name)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    parents = [r.info.run_id for r in runs if r.data.tags.get("ofb_sweep_dir") == str(run_dir)]
    complete = [r.data.tags["trial_id"] for r in runs
                if r.data.tags.get("mlflow.parentRunId") in parents
                and r.info.status == "FINISHED" and "ofb_model_uri" in r.data.tags]
    return Outcome(done, [r["trial_id"] for r in rows], complete, len(parents), subnets)


@dataclass
class Row:
    fault: str
    happened: str
    resumed: str  # yes / no / n.a.
    intact: str
    lost: int
    duplicates: int = 0
    seconds: float = 0.0
    ok: bool = True  # survived, or refused clearly

    @classmethod
    def of(cls, fault: str, happened: str, resumed: bool | None, out: Outcome, ok: bool,
           t0: float) -> Row:
        word = "n.a." if resumed is None else "yes" if resumed else "no"
        return cls(fault, happened, word, out.text(), out.lost, out.duplicates,
                   time.perf_counter() - t0, ok and out.lost == 0 and not out.duplicates)


def phase_result(run_dir: Path, phase: str) -> dict:
    """One trial's stored phase result (search: `final`, finetune: `metrics`)."""
    blob = json.loads(next((run_dir / "trials").glob(f"trial-*/{phase}/result.json")).read_text())
    return blob["final"] if phase == "search" else blob["metrics"]


class MlflowServer:
    """A real `mlflow server` (SQLite store, proxied artifacts) that can be killed and started
    again on the same port and store (tests/conftest.py's `mlflow_server` starts it so)."""

    def __init__(self, root: Path):
        from tests.conftest import free_port

        self.root, self.proc = root, None
        self.url = f"http://127.0.0.1:{free_port()}"

    def start(self, timeout: float = 120) -> None:
        import urllib.request

        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             self.url.rsplit(":", 1)[1], "--workers", "1", "--backend-store-uri",
             f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination",
             str(self.root / "artifacts")], stdout=log, stderr=subprocess.STDOUT,
            cwd=self.root, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                 "MLFLOW_DISABLE_TELEMETRY": "true"})
        log.close()

        def up() -> bool:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return True
            except OSError:
                return False

        wait_for(up, timeout, f"MLflow server at {self.url}", self.proc, poll=0.5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc)
