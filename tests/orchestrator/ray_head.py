"""A real Ray head for the Jobs API tests (../shared/SCHEDULING.md section 4): `ray start --head
--block` with its own temp dir and every port its own, beside the suite's embedded Ray.

It is ended by terminating its process (the --block process takes its GCS, raylet and dashboard
with it), never by `ray stop`, which would kill every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

RAY = Path(sys.executable).parent / "ray"
READY_S = 120


@dataclass
class Head:
    proc: subprocess.Popen
    url: str  # dashboard / Jobs API
    temp_dir: str
    log: Path

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.url)

    def session(self) -> str:
        with urllib.request.urlopen(f"{self.url}/api/version", timeout=5) as r:
            return json.loads(r.read())["session_name"]

    def wait(self, submission_id: str, timeout: float = 300,
             until: tuple[str, ...] = ("SUCCEEDED", "FAILED", "STOPPED")) -> str:
        """The job's status once it is in `until` (default: terminal)."""
        client, deadline = self.client(), time.time() + timeout
        while True:
            status = str(client.get_job_status(submission_id).value)
            if status in until:
                return status
            if time.time() > deadline:
                raise TimeoutError(f"{submission_id} still {status} after {timeout} s:\n"
                                   + client.get_job_logs(submission_id)[-3000:])
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM (the --block process takes its GCS, raylet and dashboard down, exiting 1),
        then SIGKILL for what is left of its process group after 10 s: the head's own
        graceful shutdown waits ~30 s on idle workers, time a test head does not need."""
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def head_env() -> dict[str, str]:
    """The head's environment, which its jobs' drivers inherit: this venv's `python` first on
    PATH, no RAY_ADDRESS of another cluster, no token auth."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_AUTH_MODE"] = "disabled"
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def start_head(log: Path, num_cpus: int = 2) -> Head:
    """Start the head and wait until it accepts jobs (the dashboard answers first; its job
    agent a few seconds later)."""
    tmp = tempfile.mkdtemp(prefix="ofbh", dir="/tmp")  # short: raylet sockets live under it
    dport = free_port()
    out = open(log, "w")
    proc = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--num-cpus={num_cpus}",
         "--disable-usage-stats", f"--temp-dir={tmp}", f"--port={free_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dport}",
         f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
         f"--object-manager-port={free_port()}"],
        env=head_env(), start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
        # a suite started in the background (CI) inherits SIGINT ignored, and so would every
        # job of the head: a shell can't trap it then, a Python driver never sees Ctrl-C
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    head = Head(proc, f"http://127.0.0.1:{dport}", tmp, log)
    deadline = time.time() + READY_S
    while True:
        if proc.poll() is not None or time.time() > deadline:
            head.stop()
            raise RuntimeError(f"the Ray head did not come up:\n{log.read_text()[-3000:]}")
        try:
            head.session()
            head.client().submit_job(entrypoint="true")  # raises until the job agent is up
            return head
        except Exception:  # connection refused, then "No available agent"
            time.sleep(1)
