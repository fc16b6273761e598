"""The sweep as users run it: `python -m orchestrator.run` in its own process, interrupted with
Ctrl-C and resumed by the same command, and spread over a two-node Ray cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import tiny_overrides

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SPACE = {"search.budget": {"type": "choice", "values": [0.4, 0.5, 0.6]}}


def _args(tmp_path, samples: int, **extra) -> list[str]:
    over = tiny_overrides(tmp_path, **{
        "name": "cli", "data.max_train_samples": 640, "search.epochs": 6,
        "search.lr_warmup_epochs": 0.5, "search.ofb.ramp_epochs": 0.5,
        "search.ofb.alpha_lr": 0.05,
        "search.ofb.eliminations_per_epoch": 4, "finetune.epochs": 0.5, **extra})
    return over + [f"sweep.num_samples={samples}", f"sweep.space={json.dumps(SPACE)}",
                   "sweep.points_to_evaluate=[]"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def test_interrupted_sweep_resumes_with_the_same_command(tmp_path, fmnist_dir):
    cmd = [sys.executable, "-m", "orchestrator.run", *_args(
        tmp_path, 3, **{"sweep.max_concurrent_trials": 1})]
    trials = tmp_path / "runs" / "cli" / "trials"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not list(trials.glob("*/finetune/result.json")):
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.5)
    done_first = list(trials.glob("*/finetune/result.json"))
    assert done_first, "no trial finished within 600 s"
    first_id = done_first[0].parent.parent.name.removeprefix("trial-")
    stamp = done_first[0].stat().st_mtime
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    proc.wait(timeout=180)
    res = json.loads((tmp_path / "runs" / "cli" / "result.json").read_text()) if (
        tmp_path / "runs" / "cli" / "result.json").exists() else None
    assert res is None or len(res["sweep"]["trials"]) < 3, "the sweep was not interrupted"

    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[sweep] resuming" in again.stdout and "Pareto front" in again.stdout
    rows = json.loads((tmp_path / "runs" / "cli" / "result.json").read_text())["sweep"]["trials"]
    assert len(rows) == 3
    assert first_id in {r["trial_id"] for r in rows}
    assert done_first[0].stat().st_mtime == stamp  # the finished trial was kept, not rerun


def test_sweep_spreads_over_two_nodes(tmp_path, fmnist_dir):
    args = _args(tmp_path, 2, **{"name": "twonodes"})
    script = (
        "import sys\n"
        "from ray.cluster_utils import Cluster\n"
        # the head offers ofb_driver, as cluster.yaml's does: trial drivers ask for it (G5)
        "c = Cluster(initialize_head=True, head_node_args={'num_cpus': 2,"
        " 'resources': {'ofb_driver': 1000}})\n"
        "c.add_node(num_cpus=2)\n"
        "c.wait_for_nodes()\n"
        "from orchestrator.run import main\n"
        f"rc = main(['--address', c.address, *{args!r}])\n"
        "import ray; ray.shutdown(); c.shutdown()\n"
        "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=_env(), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "4 CPU" in r.stdout  # the driver joined the two-node cluster
    rows = json.loads((tmp_path / "runs" / "twonodes" / "result.json").read_text())
    nodes = {t["node_id"] for t in rows["sweep"]["trials"]}
    assert len(rows["sweep"]["trials"]) == 2 and len(nodes) == 2, nodes
