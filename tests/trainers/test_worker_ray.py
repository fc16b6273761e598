"""The run's seed reaches the batch order of Ray's DistributedSampler (real 2-worker Train run).

Ray builds that sampler with seed 0; before `worker.prepare_loader` seeded it, every seed of a
deterministic method (ViT-Slim, the Taylor pruner, the fine-tune) repeated one result."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.ray


def _first_batches(config: dict) -> None:
    import json
    from pathlib import Path

    import ray.train
    from torch.utils.data import TensorDataset

    from trainers import worker
    from trainers.data import make_loader

    ds = TensorDataset(torch.arange(64))
    out = {}
    for seed in (0, 1):
        loader = worker.prepare_loader(make_loader(ds, 8, shuffle=True, seed=seed), seed)
        worker.set_epoch(loader, 0)
        out[f"seed{seed}"] = next(iter(loader))[0].tolist()
    plain = ray.train.torch.prepare_data_loader(make_loader(ds, 8, shuffle=True))
    out["ray_default"] = next(iter(plain))[0].tolist()
    rank = ray.train.get_context().get_world_rank()
    (Path(config["out"]) / f"rank{rank}.json").write_text(json.dumps(out))


def test_seed_sets_the_distributed_batch_order(ray_cluster, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    TorchTrainer(
        _first_batches, train_loop_config={"out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(name="seeded-sampler", storage_path=str(tmp_path)),
    ).fit()
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["seed0"] == r0["ray_default"]  # seed 0: the order runs had before the fix
    assert r0["seed1"] != r0["seed0"] and r1["seed1"] != r1["seed0"]
    assert not set(r0["seed1"]) & set(r1["seed1"])  # still one shard per worker


def _checkpoints(config: dict) -> None:
    from pathlib import Path

    import torch

    from trainers import worker

    env = worker.WorkerEnv(0, 1, torch.device("cpu"), "fp32")
    for i, mode in enumerate(("SYNC", "ASYNC")):
        def write(d: Path, i: int = i) -> None:
            (d / "state.json").write_text(json.dumps({"epoch": i}))
            (Path(config["out"]) / f"local{i}.txt").write_text(str(d))

        worker.report(env, {"epoch": i}, write, upload=mode)


def test_checkpoints_upload_sync_and_async_and_leave_no_temp_folder(ray_cluster, tmp_path):
    """G6: an ASYNC upload reads the checkpoint folder after report() returns, so it must not
    be a TemporaryDirectory; Ray deletes it once uploaded."""
    from pathlib import Path

    import ray.train
    from ray.train.torch import TorchTrainer

    result = TorchTrainer(
        _checkpoints, train_loop_config={"out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(name="ckpt-modes", storage_path=str(tmp_path)),
    ).fit()
    assert result.error is None
    with result.checkpoint.as_directory() as d:
        assert json.loads((Path(d) / "state.json").read_text()) == {"epoch": 1}  # the ASYNC one
    for i in (0, 1):
        assert not Path((tmp_path / f"local{i}.txt").read_text()).exists()
