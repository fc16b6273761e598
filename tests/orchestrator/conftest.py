"""Fixtures of the orchestrator tests: a real Ray head for the Jobs API tests (one per module)."""

from __future__ import annotations

import pytest

from tests.orchestrator.ray_head import start_head


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    h = start_head(tmp_path_factory.mktemp("head") / "head.log")
    yield h
    h.stop()


@pytest.fixture
def no_ray_address(monkeypatch):
    """RAY_ADDRESS / RAY_API_SERVER_ADDRESS would override every Jobs client's --address."""
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
