"""The configs fit the cluster they are meant for, the sweep sizes itself for a cluster that
autoscales from zero GPUs, and GPU sharing between ranks is refused before start (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ClusterShape, ConfigError, load_config
from orchestrator.sweep import trials_that_fit

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
GPU_CONFIGS = [("configs/deit_s_imagenet.yaml", []), (None, ["scaling.use_gpu=true"])]


def _per_worker(cfg) -> dict[str, float]:
    s = cfg.scaling
    return {"CPU": s.cpus_per_worker, "GPU": s.gpus_per_worker if s.use_gpu else 0}


def test_cluster_yaml_declares_every_node_types_resources():
    for name, t in CLUSTER["available_node_types"].items():
        assert {"CPU", "GPU"} <= set(t["resources"]), name
    shape = ClusterShape.from_launcher(CLUSTER)
    assert shape is not None and shape.head.name == CLUSTER["head_node_type"]
    assert shape.max_workers == CLUSTER["max_workers"]
    # GPU nodes get the driver check before setup; the placeholder image is marked as one
    for t in CLUSTER["available_node_types"].values():
        if t["resources"]["GPU"]:
            assert "nvidia-smi" in t["initialization_commands"][0]
            assert ">= 580" in t["initialization_commands"][0]
            assert "REPLACE" in t["node_config"]["ImageId"]


@pytest.mark.parametrize("path,overrides", GPU_CONFIGS)
def test_gpu_config_fits_cluster_yaml(path, overrides):
    cfg = load_config(path and ROOT / path, overrides)
    s, need = cfg.scaling, _per_worker(cfg)
    assert s.use_gpu
    types = CLUSTER["available_node_types"]
    # each worker fits on one node of a type the cluster may run
    fits_on = [n for n, t in types.items() if t.get("max_workers", 0) > 0
               and all(t["resources"].get(k, 0) >= q for k, q in need.items())]
    assert fits_on, f"one worker {need} fits on no worker node type"
    # the trial's GPUs never exceed what the cluster can reach (within the global cap)
    by_gpus = sorted(((t["resources"]["GPU"], t["max_workers"]) for n, t in types.items()
                      if n != CLUSTER["head_node_type"]), reverse=True)
    max_gpus, left = 0, CLUSTER["max_workers"]
    for gpus, count in by_gpus:
        max_gpus, left = max_gpus + gpus * min(count, left), left - min(count, left)
    assert s.num_workers * s.gpus_per_worker <= max_gpus
    # and all its workers can be placed at once, one node holding whole workers only
    shape = ClusterShape.from_launcher(CLUSTER)
    assert shape.max_placeable(need) >= s.num_workers
    assert trials_that_fit(cfg, {"CPU": 8, "GPU": 0}, shape) >= 1


def test_deit_config_uses_the_shared_file_system():
    cfg = load_config(ROOT / "configs/deit_s_imagenet.yaml")
    for value in (cfg.data.root, cfg.model.pretrained_file, cfg.output_dir):
        assert value.startswith("/mnt/shared/"), value
    workers = cfg.data.loader_workers
    assert workers == "auto" or workers < cfg.scaling.cpus_per_worker


def test_onprem_resources_are_detected_at_ray_start():
    # provider `local` refuses available_node_types: no declared resources to check, so the
    # shape is unknown (cluster_shape then falls back to the nodes that are up)
    raw = yaml.safe_load((ROOT / "cluster-onprem.yaml").read_text())
    assert "available_node_types" not in raw
    assert ClusterShape.from_launcher(raw) is None


def _sweep(*extra: str):
    return load_config(None, ["scaling.use_gpu=true", *extra])


def test_no_gpu_up_yet_never_raises(capsys):
    cfg = _sweep("sweep.max_concurrent_trials=2")
    assert trials_that_fit(cfg, {"CPU": 8, "GPU": 0}) == 2
    assert "running 2 at once (sweep.max_concurrent_trials)" in capsys.readouterr().out
    n = trials_that_fit(_sweep(), {"CPU": 8, "GPU": 0})
    assert n >= 1 and "Ray's autoscaler starts nodes" in capsys.readouterr().out
    assert trials_that_fit(_sweep(), {"CPU": 0}) == 1  # not even a CPU node


def test_cpu_shortfall_on_a_cluster_of_unknown_size():
    cpu = load_config(None, ["scaling.cpus_per_worker=8"])
    with pytest.raises(ValueError, match="cluster that autoscales, set sweep.max_concurre"):
        trials_that_fit(cpu, {"CPU": 8, "GPU": 0})
    wanted = load_config(None, ["scaling.cpus_per_worker=8", "sweep.max_concurrent_trials=3"])
    assert trials_that_fit(wanted, {"CPU": 8}) == 3  # the user says the cluster grows
    assert trials_that_fit(wanted, {"CPU": 32}) == 2  # nodes up: never more than they fit


def test_known_shape_sizes_by_the_autoscalers_maximum(capsys):
    shape = ClusterShape.from_launcher(CLUSTER)
    # default config: 2 workers x (1 CPU, 1 GPU); 2 x g5.12xlarge (8) + 4 x g5.xlarge (4)
    assert trials_that_fit(_sweep(), {"CPU": 8, "GPU": 0}, shape) == 6
    assert "what fits once the autoscaler has added nodes" in capsys.readouterr().out
    assert trials_that_fit(_sweep("sweep.max_concurrent_trials=3"), {"CPU": 8}, shape) == 3
    assert trials_that_fit(_sweep("sweep.max_concurrent_trials=99"), {"CPU": 8}, shape) == 6
    # nodes up that already fit more than the config declares: what is up counts
    assert trials_that_fit(_sweep(), {"CPU": 100, "GPU": 20}, shape) == 10
    # a CPU-only sweep is sized by the nodes without GPUs (the head's 8 CPUs here), so it
    # does not start GPU nodes for CPU work; still 1 when only a GPU node type could hold it
    assert trials_that_fit(load_config(None, []), {"CPU": 8}, shape) == 4
    big = load_config(None, ["scaling.cpus_per_worker=6"])
    assert trials_that_fit(big, {"CPU": 8}, shape) == 1


def test_demand_that_can_never_fit_raises():
    shape = ClusterShape.from_launcher(CLUSTER)
    with pytest.raises(ValueError, match="one worker fits on no node.*gpu_worker_4x"):
        trials_that_fit(_sweep("scaling.cpus_per_worker=64"), {"CPU": 8}, shape)
    with pytest.raises(ValueError, match="at most 12 of its workers fit"):
        trials_that_fit(_sweep("scaling.num_workers=13"), {"CPU": 8}, shape)
    # embedded: this machine is all there is, so no GPU is an error, as is too few CPUs
    with pytest.raises(ValueError, match="one trial needs 2 x 1 CPU and 2 x 1 GPU"):
        trials_that_fit(_sweep(), {"CPU": 2}, ClusterShape.fixed({"CPU": 2}))
    with pytest.raises(ValueError, match="one trial needs 2 x 1 CPU"):
        trials_that_fit(load_config(None, []), {"CPU": 1})


def test_shape_counts_whole_workers_per_node():
    raw = {"max_workers": 3, "head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 4}},
        "a": {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 5},
        "b": {"resources": {"CPU": 12, "GPU": 4}, "max_workers": 1}}}
    shape = ClusterShape.from_launcher(raw)
    assert shape.max_placeable({"CPU": 3, "GPU": 1}) == 4 + 1 + 1  # b, then 2 of a (cap 3)
    assert shape.max_placeable({"CPU": 2}) == 2 + 6 + 2 + 2  # head too, for CPU workers
    assert shape.max_placeable({"CPU": 3, "GPU": 0.5}) == 4 + 1 + 1
    raw["available_node_types"]["a"]["resources"] = {}  # left to detection: unknown
    assert ClusterShape.from_launcher(raw) is None


@pytest.mark.parametrize("overrides", [
    ["scaling.gpus_per_worker=0.5", "scaling.num_workers=2"],
    ["scaling.gpus_per_worker=1.5", "scaling.num_workers=4"],
])
def test_gpu_shared_between_ranks_is_refused(overrides):
    with pytest.raises(ConfigError, match=r"scaling.gpus_per_worker=\S+ with scaling.num_workers"
                       r"=\d.*whole number.*only with scaling.num_workers=1"):
        load_config(None, ["scaling.use_gpu=true", *overrides])


def test_fractional_gpu_allowed_for_one_worker_or_without_gpus():
    cfg = load_config(None, ["scaling.use_gpu=true", "scaling.gpus_per_worker=0.5",
                             "scaling.num_workers=1"])
    assert cfg.scaling.gpus_per_worker == 0.5
    load_config(None, ["scaling.gpus_per_worker=0.5", "scaling.num_workers=2"])  # CPU run
    load_config(None, ["scaling.use_gpu=true", "scaling.gpus_per_worker=2",
                       "scaling.num_workers=2"])


def test_sweep_space_cannot_set_scaling():
    # trials share one scaling section, so the per-choice GPU check is not needed
    space = {"scaling.gpus_per_worker": {"type": "choice", "values": [0.5, 1]}}
    with pytest.raises(ConfigError, match="scaling.gpus_per_worker.*cannot be swept"):
        load_config(None, [f"sweep.space={json.dumps(space)}", "sweep.points_to_evaluate=[]"])


def test_cluster_shape_reads_the_head_nodes_autoscaler_config(tmp_path, monkeypatch):
    from orchestrator import sweep

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    embedded = sweep.cluster_shape(_sweep(), {"CPU": 2})
    assert embedded == ClusterShape.fixed({"CPU": 2})
    cfg = _sweep("ray.address=auto")
    monkeypatch.setattr(sweep, "BOOTSTRAP_CONFIG", tmp_path / "missing.yaml")
    assert sweep.cluster_shape(cfg, {"CPU": 8}) is None  # a cluster of unknown size
    (tmp_path / "boot.yaml").write_text((ROOT / "cluster.yaml").read_text())
    monkeypatch.setattr(sweep, "BOOTSTRAP_CONFIG", tmp_path / "boot.yaml")
    assert sweep.cluster_shape(cfg, {"CPU": 8}) == ClusterShape.from_launcher(CLUSTER)


def test_embedded_ray_refuses_a_trial_this_machine_cannot_hold():
    """Ray embedded never grows: a GPU trial on a machine without GPUs (or more CPUs than it
    has) would wait forever for its workers; refused before Ray starts, with the numbers."""
    from orchestrator.run import check_machine_fits

    gpu = load_config(None, ["scaling.use_gpu=true", "scaling.num_workers=2"])
    with pytest.raises(ConfigError, match=r"needs 2 GPUs; this machine has 0"):
        check_machine_fits(gpu, cpus=2, gpus=0)
    check_machine_fits(gpu, cpus=2, gpus=2)
    cpu = load_config(None, ["scaling.num_workers=3"])
    with pytest.raises(ConfigError, match=r"needs 3 CPUs; this machine has 2"):
        check_machine_fits(cpu, cpus=2, gpus=0)
    check_machine_fits(cpu, cpus=4, gpus=0)
    remote = load_config(None, ["scaling.use_gpu=true", "ray.address=auto"])
    check_machine_fits(remote, cpus=2, gpus=0)  # a cluster may scale up: not checked here


def test_trial_drivers_pin_to_the_head_only_where_it_offers_them_room():
    """G5: a head started with --resources '{"ofb_driver": 1000}' hosts every trial driver;
    a cluster without that resource (embedded Ray, an older head) must not wait for it."""
    from orchestrator.sweep import DRIVER_RESOURCES, driver_resources

    assert driver_resources({"CPU": 2.0}) == DRIVER_RESOURCES
    assert driver_resources({"CPU": 8.0, "ofb_driver": 1000.0}) == {
        **DRIVER_RESOURCES, "ofb_driver": 1}
