"""The security review of README.md, as checks: no pickle loads of user files, servers on
loopback, cluster files that expose neither the dashboard nor MLflow and leave Ray's token
authentication alone, and submitted jobs without secrets in their runtime env."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, load_config
from orchestrator.schedules.jobs import job_spec

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("orchestrator", "trainers", "search_space", "bench", "scripts")
           for p in (REPO / d).rglob("*.py")]
CLUSTER_FILES = [REPO / "cluster.yaml", REPO / "cluster-onprem.yaml"]
# calls that unpickle (run code from) a file
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"),
              ("cloudpickle", "loads"), ("dill", "load"), ("joblib", "load"),
              ("yaml", "unsafe_load"), ("yaml", "load"), ("numpy", "load"), ("np", "load")}


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name):
            yield node, (node.func.value.id, node.func.attr)


def test_no_pickle_loads_of_user_files():
    """torch.load only with weights_only=True; no pickle/yaml.load/np.load(allow_pickle)."""
    assert len(SOURCES) > 50
    bad = []
    for path in SOURCES:
        for node, (mod, fn) in _calls(path):
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if (mod, fn) == ("torch", "load"):
                w = kw.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    bad.append(f"{where} torch.load without weights_only=True")
            elif (mod, fn) in UNPICKLERS:
                a = kw.get("allow_pickle")
                if fn == "load" and mod in ("numpy", "np") and not (
                        isinstance(a, ast.Constant) and a.value is True):
                    continue  # np.load refuses pickles by default
                bad.append(f"{where} {mod}.{fn}")
    assert not bad, bad


def test_servers_bind_to_loopback_by_default():
    for f in CLUSTER_FILES:
        text = f.read_text()
        assert "--dashboard-host=127.0.0.1" in text, f
        assert "0.0.0.0" not in text, f
    script = (REPO / "scripts" / "mlflow_server.sh").read_text()
    assert re.search(r"mlflow server --host 127\.0\.0\.1", script)
    assert "dashboard_host=\"127.0.0.1\"" in (REPO / "orchestrator" / "ray_setup.py").read_text()


def test_cluster_files_expose_neither_dashboard_nor_mlflow_and_keep_token_auth():
    for f in CLUSTER_FILES:
        cfg = yaml.safe_load(f.read_text())
        provider = yaml.safe_dump(cfg.get("provider", {}))
        for port in ("8265", "5000", "6379"):
            assert port not in provider, f"{f.name}: provider opens port {port}"
        for key in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands",
                    "head_setup_commands", "worker_setup_commands"):
            for cmd in cfg.get(key) or []:
                assert "RAY_AUTH_MODE=disabled" not in cmd, f"{f.name} {key}: {cmd}"


def test_submitted_jobs_carry_no_secrets():
    cfg = load_config(None, ["output_dir=/shared/runs"])
    env = job_spec(cfg, None, [], "nightly", "20260301T0200Z", 1).runtime_env["env_vars"]
    assert not [k for k in env if re.search("TOKEN|SECRET|PASSWORD|KEY", k, re.I)], env
    for name in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "OPENAI_API_KEY"):
        with pytest.raises(ConfigError, match=rf"\['{name}'\] look like secrets"):
            job_spec(cfg, None, [], "nightly", "20260301T0200Z", 1, extra_env={name: "x"})
