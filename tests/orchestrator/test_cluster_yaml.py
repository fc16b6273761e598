"""The cluster launcher configs pass Ray's own schema validation (what `ray up` checks first)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-onprem.yaml"])
def test_cluster_config_validates(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / name).read_text())
    validate_config(prepare_config(raw))
    cmds = " ".join(raw["setup_commands"])
    assert "make install" in cmds
    assert "docker" not in raw  # no container image, so no frozen rayproject/ray-ml image
    assert any("--head" in c for c in raw["head_start_ray_commands"])
    assert any("dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"])
    head = next(c for c in raw["head_start_ray_commands"] if "--head" in c)
    assert "ofb-orchestrator/.venv/bin:$PATH" in head  # `python` of submitted jobs (jobs.py)
    assert "ofb_driver" in head  # trial drivers pinned to the head (G5)
