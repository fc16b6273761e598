"""Data loaders on GPU nodes: loader processes ("auto" from the worker's CPUs), pinned memory for
CUDA only, and sharding that keeps every loader setting (Ray's `prepare_data_loader` rebuilds
the loader without `persistent_workers` and `prefetch_factor`).

No Ray cluster: `prepare_loader` runs under a faked 2-rank Train context, through Ray's real
`prepare_data_loader` (which only wraps the loader for the device move)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler, RandomSampler, TensorDataset

from trainers.config import TrainConfig
from trainers.data import (
    AUTO_LOADER_WORKERS_CAP,
    loader_workers,
    make_loader,
    pin_memory_for,
    shard_loader,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(("cpus", "on_gpu"), [(1, 0), (2, 1), (4, 3), (4.5, 3), (8, 7), (9, 8),
                                              (32, AUTO_LOADER_WORKERS_CAP), (0.5, 0)])
def test_auto_loader_workers_follow_the_workers_cpus(cpus, on_gpu):
    assert loader_workers("auto", cpus, CUDA) == on_gpu
    assert loader_workers("auto", cpus, CPU) == 0  # the CPUs run the compute threads
    assert loader_workers(3, cpus, CPU) == 3 and loader_workers(0, cpus, CUDA) == 0  # explicit


def test_pin_memory_only_for_cuda():
    assert pin_memory_for(CUDA) and pin_memory_for(torch.device("cuda"))
    assert not pin_memory_for(CPU) and not pin_memory_for(torch.device("meta"))


def test_loader_options_from_the_config():
    from trainers.worker import loader_options

    default = TrainConfig()
    assert default.data.loader_workers == "auto" and default.scaling.cpus_per_worker == 1
    assert loader_options(default, CPU) == {"workers": 0, "pin_memory": False}  # this machine
    assert loader_options(default, CUDA) == {"workers": 0, "pin_memory": True}
    gpu = TrainConfig.model_validate({"scaling": {"use_gpu": True, "cpus_per_worker": 6}})
    assert loader_options(gpu, CUDA) == {"workers": 5, "pin_memory": True}
    fixed = TrainConfig.model_validate({"data": {"loader_workers": 2},
                                        "scaling": {"cpus_per_worker": 6}})
    assert loader_options(fixed, CUDA)["workers"] == 2 and loader_options(fixed, CPU) == {
        "workers": 2, "pin_memory": False}


def _settings(loader) -> dict:
    return {k: getattr(loader, k) for k in (
        "batch_size", "num_workers", "persistent_workers", "prefetch_factor", "pin_memory",
        "drop_last", "generator", "timeout", "worker_init_fn", "in_order")}


def _worker_init(worker_id: int) -> None:
    torch.manual_seed(worker_id)


def test_shard_keeps_every_setting_and_splits_the_data():
    ds = TensorDataset(torch.arange(40))
    base = make_loader(ds, 4, shuffle=True, workers=2, seed=3, drop_last=True, pin_memory=True)
    base.worker_init_fn = _worker_init
    shards = [shard_loader(base, rank, 2, seed=7) for rank in (0, 1)]
    for rank, s in enumerate(shards):
        assert _settings(s) == _settings(base)
        assert s.persistent_workers and s.num_workers == 2 and s.pin_memory
        assert isinstance(s.sampler, DistributedSampler)
        assert (s.sampler.rank, s.sampler.num_replicas, s.sampler.seed) == (rank, 2, 7)
        assert s.sampler.shuffle
    # eval loaders: not shuffled, not persistent (built per evaluation pass)
    ev = shard_loader(make_loader(ds, 8, shuffle=False, workers=2, persistent=False), 1, 2)
    assert not ev.sampler.shuffle and ev.num_workers == 2 and not ev.persistent_workers
    assert shard_loader(base, 0, 1) is base  # one rank: the seeded loader as it is
    assert shard_loader(shards[0], 0, 2) is shards[0]  # already sharded


def test_sharded_persistent_workers_survive_epochs():
    """Two epochs over sharded loaders with 2 persistent loader processes each: the same
    workers (one iterator) serve both epochs; per epoch the ranks' shards are disjoint and
    cover the data, and set_epoch reshuffles."""
    ds = TensorDataset(torch.arange(24))
    shards = [shard_loader(make_loader(ds, 4, shuffle=True, workers=2), r, 2, seed=1)
              for r in (0, 1)]
    orders, iterators = [], {}
    for epoch in (0, 1):
        per_rank = []
        for r, s in enumerate(shards):
            s.sampler.set_epoch(epoch)
            per_rank.append([x for (b,) in s for x in b.tolist()])
            assert iterators.setdefault(r, s._iterator) is s._iterator  # not respawned
        a, b = map(set, per_rank)
        assert not a & b and a | b == set(range(24))
        orders.append(per_rank)
    assert orders[0] != orders[1]
    for s in shards:
        s._iterator._shutdown_workers()


@pytest.fixture
def fake_train_context(monkeypatch):
    """Ray Train's worker context and device for rank `ranks[0]` of `ranks[1]`, no cluster."""
    import ray.train
    import ray.train.torch

    where = {"rank": 0, "world": 2}
    ctx = SimpleNamespace(get_world_rank=lambda: where["rank"],
                          get_world_size=lambda: where["world"])
    monkeypatch.setattr(ray.train, "get_context", lambda: ctx)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: CPU)
    return where


def test_prepared_loader_keeps_persistent_workers(fake_train_context):
    from trainers import worker

    ds = TensorDataset(torch.arange(32))
    cfg = TrainConfig.model_validate({"data": {"loader_workers": 2}})
    for rank in (0, 1):
        fake_train_context["rank"] = rank
        loader = worker.prepare_loader(make_loader(
            ds, 4, shuffle=True, seed=5, drop_last=True, **worker.loader_options(cfg, CPU)), 5)
        assert loader.persistent_workers and loader.num_workers == 2
        assert not loader.pin_memory and loader.prefetch_factor == 2
        assert isinstance(loader.sampler, DistributedSampler)
        assert (loader.sampler.rank, loader.sampler.seed) == (rank, 5)
        assert len(loader) == 4
        worker.set_epoch(loader, 0)
        assert sum(len(b) for (b,) in loader) == 16
    fake_train_context["world"] = 1
    one = worker.prepare_loader(make_loader(ds, 4, shuffle=True, workers=2), 5)
    assert isinstance(one.sampler, RandomSampler) and one.persistent_workers
