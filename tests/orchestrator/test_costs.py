"""GPU-hours and CPU-core-hours are different units: no total, mean or ratio mixes them.

The case that used to add them: the dense model came from the cache, trained on the CPU, and the
search and fine-tune ran on GPUs. Reports, MLflow metrics and the run summary keep one total per
unit, and every printed amount names its unit."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.pareto_plot import plot_pareto
from orchestrator.records import TrialRecord, add_hours, format_hours
from orchestrator.report import Dense, build
from orchestrator.report_sources import dense_of_run

DENSE_MACS = 1_000_000


def _rec(method, budget, search_h, finetune_h, kind="gpu", trial="t", top1=0.85, **kw):
    return TrialRecord(trial_id=trial, method=method, target_macs=budget * DENSE_MACS,
                       dense_macs=DENSE_MACS, macs=int(budget * DENSE_MACS), params=1000,
                       top1=top1, top1_before_finetune=top1 - 0.05, search_device_hours=search_h,
                       finetune_device_hours=finetune_h, device_kind=kind, **kw)


GPU_TRIALS = [_rec("ofb", 0.5, 0.2, 0.05, trial="a"), _rec("ofb", 0.5, 0.4, 0.05, trial="b"),
              _rec("two_stage_taylor", 0.5, 0.5, 0.05, trial="c"),
              _rec("dense_control", 1.0, 0.0, 0.05, trial="d")]
CPU_DENSE = Dense(top1=0.9, macs=DENSE_MACS, device_hours=8.0, device_kind="cpu_core")


def test_cpu_dense_and_gpu_trials_are_never_summed():
    rep = build(GPU_TRIALS, CPU_DENSE)
    g = {(x["method"], x["budget"]): x for x in rep.groups}
    ofb = g[("ofb", "50pct")]
    assert ofb["search_gpu_hours"] == pytest.approx(0.3) and "search_cpu_core_hours" not in ofb
    assert ofb["total_gpu_hours"] == pytest.approx(0.3 + 0.05)  # search + fine-tune
    assert ofb["total_cpu_core_hours"] == pytest.approx(8.0 / 4)  # the pretrain share alone
    for x in rep.groups:  # no unit-less or mixed cost anywhere
        assert not {"search_h", "total_h", "total_device_hours"} & set(x)
    m = rep.metrics
    assert m["search_gpu_hours/ofb"] == pytest.approx(0.3)
    assert m["cost_ratio/ofb_vs_two_stage_taylor/50pct"] == pytest.approx(0.3 / 0.5)  # GPU/GPU
    assert not any(k.endswith("_search_vs_dense_training") for k in m)  # GPU vs CPU: no ratio
    vs_dense = [c for c in rep.comparison if c["budget"] == "all"]
    assert vs_dense and all(c["ratio"] is None for c in vs_dense)
    assert all(c["a_hours"].keys() == {"gpu"} and c["b_hours"] == {"cpu_core": 8.0}
               for c in vs_dense)
    text = rep.text
    assert "search GPU-hours" in text and "total GPU-hours" in text
    assert "total CPU-core-hours" in text and "in different units" in text
    assert "8.0000 CPU-core-hours" in text
    mixed = f"{0.35 + 2.0:.4f}"  # what adding the units would have shown for OFB's total
    assert mixed not in text
    for line in text.splitlines():  # every line with an amount of hours names its unit
        if re.search(r"\d\.\d{4}\b", line) and not line.startswith(tuple(
                f"{x['method']} " for x in rep.groups)):
            assert "hours" in line, line


def test_a_group_with_trials_on_both_kinds_keeps_both_units():
    rows = [_rec("ofb", 0.5, 0.2, 0.1, kind="gpu", trial="g"),
            _rec("ofb", 0.5, 3.0, 1.0, kind="cpu_core", trial="c")]
    (g,) = build(rows, Dense(0.9, DENSE_MACS, 0.0, "gpu")).groups
    assert g["search_gpu_hours"] == pytest.approx(0.2 / 2)  # mean per trial, per unit
    assert g["search_cpu_core_hours"] == pytest.approx(3.0 / 2)
    assert g["total_gpu_hours"] == pytest.approx(0.3 / 2)
    assert g["total_cpu_core_hours"] == pytest.approx(4.0 / 2)


def test_mlflow_metric_names_carry_the_unit():
    rec = _rec("ofb", 0.5, 0.2, 0.05)
    m = rec.mlflow_metrics()
    assert m["search_gpu_hours"] == 0.2 and m["finetune_gpu_hours"] == 0.05
    assert not any("device_hours" in k or "cpu_core" in k for k in m)
    back = TrialRecord.from_mlflow("r", m, rec.mlflow_tags())
    assert (back.search_device_hours, back.finetune_device_hours, back.device_kind) == (
        0.2, 0.05, "gpu")
    old = TrialRecord.from_mlflow("r", {"search_device_hours": 0.3, "top1": 0.8},
                                  {"device_kind": "cpu_core"})  # a run logged before
    assert old.search_device_hours == 0.3 and old.phase_hours()["search"] == {"cpu_core": 0.3}


def test_search_on_cpu_finetune_on_gpu_keeps_each_phase_in_its_unit():
    from orchestrator.phases import PhaseCost, trial_result

    cfg = SimpleNamespace(sweep=None, run_dir=Path("/t"),
                          search=SimpleNamespace(method="ofb", target_gmacs=None, budget=0.5))
    search = SimpleNamespace(subnet=Path("/t/s"), cost=PhaseCost("cpu_core", 2, 3600, 3700),
                             final={"macs": 500, "params": 10, "dense_macs": 1000,
                                    "test_top1_before_finetune": 0.7})
    tuned = SimpleNamespace(metrics={"test_top1": 0.8}, cost=PhaseCost("gpu", 1, 1800, 1900))
    rec = trial_result(cfg, search, tuned, wall=6000.0)
    assert rec.phase_hours() == {"search": {"cpu_core": 2.0}, "finetune": {"gpu": 0.5}}
    assert rec.total_hours({"gpu": 0.25}) == {"cpu_core": 2.0, "gpu": 0.75}
    assert rec.mlflow_tags()["finetune_device_kind"] == "gpu"
    back = TrialRecord.from_mlflow("r", rec.mlflow_metrics(), rec.mlflow_tags())
    assert back.phase_hours() == rec.phase_hours()
    assert TrialRecord.from_row(rec.row()).phase_hours() == rec.phase_hours()  # parquet row
    assert PhaseCost("gpu", 2, 1800, 0).summary()["unit"] == "GPU-hours"


class _Client:
    """The slice of MlflowClient that Tracker.log_trial uses."""

    def __init__(self):
        self.metrics: dict[str, float] = {}
        self.tags: dict[str, str] = {}

    def log_batch(self, run_id, metrics=(), params=()):
        self.metrics.update({m.key: m.value for m in metrics})

    def log_artifact(self, run_id, path, folder=None):
        pass

    def set_tag(self, run_id, key, value):
        self.tags[key] = value

    def set_terminated(self, run_id, status):
        pass


def test_tracked_totals_are_per_unit():
    from orchestrator.tracking import Tracker

    t = Tracker.__new__(Tracker)  # no MLflow store: only what log_trial computes
    t.cfg = SimpleNamespace(mlflow=SimpleNamespace(log_models=False))
    t.client, t.dense_kind = _Client(), None
    dense = SimpleNamespace(metrics={"test_top1": 0.9}, macs=DENSE_MACS,
                            cost=SimpleNamespace(device_kind="cpu_core", device_hours=8.0),
                            path=Path("/d"))
    t.log_dense("parent", dense)
    assert t.client.metrics["pretrain_cpu_core_hours"] == 8.0
    assert t.client.tags["dense_device_kind"] == "cpu_core" and t.dense_kind == "cpu_core"
    t.log_trial("child", _rec("ofb", 0.5, 0.2, 0.05, subnet_path="/s"), 2.0)
    m = t.client.metrics
    assert m["pretrain_share_cpu_core_hours"] == 2.0 and m["total_cpu_core_hours"] == 2.0
    assert m["total_gpu_hours"] == pytest.approx(0.25) and m["search_gpu_hours"] == 0.2
    assert not any("device_hours" in k for k in m)


def test_dense_of_a_sweep_run():
    cached_cpu = dense_of_run({"pretrain_cpu_core_hours": 8.0, "dense_top1": 0.9},
                              {"dense_device_kind": "cpu_core"}, {"scaling.use_gpu": "True"})
    assert (cached_cpu.device_kind, cached_cpu.device_hours) == ("cpu_core", 8.0)
    old = dense_of_run({"pretrain_device_hours": 1.5}, {}, {"scaling.use_gpu": "True"})
    assert (old.device_kind, old.device_hours) == ("gpu", 1.5)


def test_run_summary_prints_units_and_per_unit_totals(capsys):
    from orchestrator.run import print_summary

    def cost(kind, hours):
        return {"device_kind": kind, "devices": 1, "worker_seconds": hours * 3600,
                "driver_seconds": 0, "device_hours": hours}

    s = {"pretrain": {"metrics": {"epoch": 3, "test_top1": 0.9}, "cost": cost("cpu_core", 8.0),
                      "cached": True, "path": "/d"},
         "search": {"final": {"macs": 500, "dense_macs": 1000, "params": 10}, "subnet": "/s",
                    "cost": cost("gpu", 0.5)},
         "finetune": {"metrics": {"test_top1": 0.8}, "path": "/f", "cost": cost("gpu", 0.25)}}
    cfg = SimpleNamespace(model=SimpleNamespace(name="vit"), search=SimpleNamespace(method="ofb"))
    print_summary(cfg, s)
    out = capsys.readouterr().out
    assert "total        0.7500 GPU-hours + 8.0000 CPU-core-hours" in out
    for line in out.splitlines():
        if re.search(r"\d\.\d{4} ", line):
            assert "hours" in line, line


def test_helpers_sum_like_with_like(tmp_path):
    assert add_hours({"gpu": 1.0}, {"cpu_core": 2.0}, {"gpu": 0.5}) == {"gpu": 1.5,
                                                                       "cpu_core": 2.0}
    assert format_hours({"cpu_core": 2.0, "gpu": 1.0}) == "1.0000 GPU-hours + 2.0000 CPU-core-hours"
    png = plot_pareto(GPU_TRIALS + [_rec("ofb", 0.3, 2.0, 0.1, kind="cpu_core", trial="x")],
                      CPU_DENSE, tmp_path / "p.png", "t")
    assert png.read_bytes()[:4] == b"\x89PNG"
