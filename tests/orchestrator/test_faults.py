"""The fault table's rows that no other test covers (bench/faults.py prints the whole table):
a Train worker killed during the subnet export, the trial driver killed, the orchestrator
SIGKILLed mid-sweep and rerun, a second sweep in the same folder, two sweeps at once in one
output folder, the MLflow server down for a while or until a sweep has ended, a full disk under
a checkpoint, the Ray head restarted between two schedule calls. Each test runs the bench's own
driver (fault_drivers.py) on a real Ray, real data, a real MLflow server; each fault must be
survived or refused clearly, with nothing lost. (A worker killed in the search or the fine-tune:
test_search_ray.py, test_trial_run.py.)
"""

from __future__ import annotations

import pytest

from tests.orchestrator import fault_drivers as faults
from tests.orchestrator.faults import Row


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One dense model for every test here (the drivers' sweeps share its settings)."""
    return tmp_path_factory.mktemp("fault-cache")


def check(row: Row, resumed: str) -> None:
    print(f"[fault] {row.fault}: {row.happened} | {row.intact} ({row.seconds:.0f} s)")
    assert row.ok, row
    assert row.lost == 0 and row.duplicates == 0, row
    assert row.resumed == resumed, row


@pytest.mark.ray
@pytest.mark.parametrize("what", ["export", "driver"])
def test_a_killed_worker_or_trial_driver_resumes(ray_cluster, tmp_path, fmnist_dir, cache, what):
    row = faults.killed_in_process(tmp_path, cache, what)
    check(row, "yes")
    assert ("reached storage" if what == "export" else "registered") in row.happened
    assert row.intact == "parquet 1/1, MLflow 1/1, subnets 1/1"


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    [row] = faults.disk_full(tmp_path)
    check(row, "n.a.")
    assert "cannot write" in row.happened and "ckpt/optimizer.pt" in row.happened
    assert "weights.safetensors" in row.happened
    assert row.intact.startswith("previous checkpoint loads, epoch 0, same weights")


@pytest.mark.ray
@pytest.mark.slow
def test_two_sweeps_at_once_train_the_dense_model_once_and_keep_their_own_trials(
        tmp_path, fmnist_dir):
    """Two sweeps started at once on one output folder: one new MLflow store, one empty dense
    cache (fault 8a)."""
    [row] = faults.two_sweeps(tmp_path)
    check(row, "n.a.")
    assert "opened by 2 processes at once: 2/2 ok" in row.happened
    assert "dense model trained 1 time(s), 1 sweep(s) waited for it" in row.happened
    assert row.intact == ("alpha: parquet 1/1, MLflow 1/1, subnets 1/1; "
                          "beta: parquet 1/1, MLflow 1/1, subnets 1/1")


@pytest.mark.ray
@pytest.mark.slow
def test_a_sigkilled_sweep_resumes_and_a_second_one_in_its_folder_is_refused(
        tmp_path, fmnist_dir, cache):
    killed, busy = faults.orchestrator_killed(tmp_path, cache)
    check(killed, "yes")
    assert killed.intact == "parquet 2/2, MLflow 2/2, subnets 2/2"
    check(busy, "n.a.")
    assert "is in use by another sweep" in busy.happened and "kept running" in busy.intact


@pytest.mark.ray
@pytest.mark.slow
def test_a_short_mlflow_outage_is_covered_by_the_clients_retries(tmp_path, fmnist_dir, cache):
    [row] = faults.mlflow_killed(tmp_path, cache, "short")
    check(row, "n.a.")
    assert "sweep exited 0, 0 tracking warning(s)" in row.happened
    assert row.intact == "parquet 2/2, MLflow 2/2, subnets 2/2"


@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_down_until_the_sweep_ends_then_a_rerun_logs_what_was_missed(
        tmp_path, fmnist_dir, cache):
    [row] = faults.mlflow_killed(tmp_path, cache, "long")
    check(row, "n.a.")
    assert "sweep exited 0 with the server down, parquet 2/2" in row.happened
    assert "logged 0 missed" not in row.happened
    assert row.intact == "parquet 2/2, MLflow 2/2, subnets 2/2"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("no_ray_address")
def test_a_slot_is_not_run_again_after_the_head_restarts(tmp_path, fmnist_dir, cache):
    [row] = faults.head_restarted(tmp_path, cache)
    check(row, "n.a.")
    assert "1 attempt(s) in the ledger (SUCCEEDED), 0 job(s)" in row.happened
