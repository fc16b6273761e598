"""The embedded Ray tells its workers where its state API is (a second Ray on the machine made
Train's clean-up of a dead driver fail: fault row 4), and the port picker prefers a port."""

from __future__ import annotations

import os
import socket

import pytest

from orchestrator.ray_setup import dashboard_url, free_port


@pytest.mark.ray
def test_workers_are_told_the_embedded_dashboard(ray_cluster):
    import ray

    url = dashboard_url()
    assert url and url.startswith("http://127.0.0.1:")

    @ray.remote(num_cpus=0)
    def api_server() -> str | None:
        return os.environ.get("RAY_API_SERVER_ADDRESS")

    assert ray.get(api_server.remote()) == url
    from ray.util.state import list_nodes

    nodes = {n.node_id for n in list_nodes(address=url)}  # it is this Ray's state API
    assert ray.get_runtime_context().get_node_id() in nodes


def test_a_preferred_port_is_kept_while_free_and_replaced_when_taken():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
        assert free_port(prefer=taken) != taken
    assert free_port(prefer=taken) == taken
