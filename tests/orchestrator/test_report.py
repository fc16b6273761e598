"""The report's arithmetic (groups per method and budget, costs, the OFB-vs-two-stage ratio)
and the ranking of trials under sweep.max_macs: top-1 as measured, feasible trials first."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.config import load_config
from orchestrator.pareto_plot import plot_pareto
from orchestrator.records import OBJECTIVE_TOP1, TrialRecord, as_record
from orchestrator.report import TOP1_VS_MACS, Dense, build, pareto_front

DENSE_MACS = 1_000_000


def _row(method, budget, top1, search_h, finetune_h=0.01, trial="t"):
    return {"trial_id": trial, "method": method, "target_macs": budget * DENSE_MACS,
            "dense_macs": DENSE_MACS, "macs": int(budget * DENSE_MACS * 1.01),
            "params": 1000, "top1": top1, "top1_before_finetune": top1 - 0.05,
            "search_device_hours": search_h, "finetune_device_hours": finetune_h}


ROWS = [_row("ofb", 0.5, 0.88, 0.10, trial="a"), _row("ofb", 0.5, 0.86, 0.30, trial="b"),
        _row("ofb", 0.3, 0.85, 0.10, trial="c"),
        _row("two_stage_taylor", 0.5, 0.85, 0.40, trial="d"),
        _row("dense_control", 1.0, 0.89, 0.0, trial="e")]


def test_groups_costs_and_ratios():
    rep = build(ROWS, Dense(top1=0.9, macs=DENSE_MACS, device_hours=0.5))
    g = {(x["method"], x["budget"]): x for x in rep.groups}
    assert set(g) == {("ofb", "50pct"), ("ofb", "30pct"), ("two_stage_taylor", "50pct"),
                      ("dense_control", "100pct")}
    ofb50 = g[("ofb", "50pct")]
    assert ofb50["trials"] == 2 and ofb50["top1_best"] == 0.88
    assert ofb50["top1_mean"] == pytest.approx(0.87)
    assert ofb50["search_cpu_core_hours"] == pytest.approx(0.2)  # rows without a kind: CPU
    assert ofb50["top1_sd"] == pytest.approx(0.02 ** 0.5 / 10)  # sample sd of 0.88, 0.86
    assert ofb50["top1_before_ft"] == pytest.approx(0.82) and g[("ofb", "30pct")]["top1_sd"] is None
    assert ofb50["macs_of_dense"] == pytest.approx(0.505)
    # total = the pretrain share (0.5 h over 5 trials) + search + fine-tune, averaged
    assert ofb50["total_cpu_core_hours"] == pytest.approx(0.1 + 0.2 + 0.01)
    assert not any(k.startswith(("search_gpu", "total_gpu")) for k in ofb50)
    m = rep.metrics
    assert m["cost_ratio/ofb_vs_two_stage_taylor/50pct"] == pytest.approx(0.2 / 0.4)
    assert m["top1_gain/ofb_vs_two_stage_taylor/50pct"] == pytest.approx(0.02)  # mean - mean
    assert m["top1_vs_control/two_stage_taylor/50pct"] == pytest.approx(-0.04)
    assert "top1_vs_control/dense_control/100pct" not in m
    assert m["cost_ratio/ofb_search_vs_dense_training"] == pytest.approx((0.2 + 0.1) / 2 / 0.5)
    assert "87.00% +/- 1.41" in rep.text
    line = next(x for x in rep.text.splitlines() if x.startswith("ofb vs two_stage_taylor"))
    assert line.split()[-6:] == ["50pct", "0.2000", "CPU-core-hours", "0.4000", "CPU-core-hours",
                                 "0.500"]
    assert "dense training cost is the reference" not in rep.text
    alone = build([r for r in ROWS if r["method"] == "ofb"], Dense(0.9, DENSE_MACS, 0.5))
    assert "dense training cost is the reference" in alone.text


def test_pareto_png(tmp_path):
    png = plot_pareto(ROWS, Dense(0.9, DENSE_MACS, 0.4), tmp_path / "p.png", "t")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000


# -- feasibility (sweep.max_macs): top-1 stays as measured, feasible trials rank first ---------
def _feasibility_rows():
    ok = {**_row("ofb", 0.5, 0.88, 0.1, trial="ok"), "feasible": True}
    over = {**_row("ofb", 0.5, 0.91, 0.1, trial="over"), "feasible": False}
    return ok, over


def test_infeasible_trial_keeps_its_top1_and_ranks_last(tmp_path):
    ok, over = _feasibility_rows()
    rep = build([over, ok], Dense(0.9, DENSE_MACS, 0.5))
    (g,) = rep.groups
    assert g["top1_best"] == 0.88  # the best feasible trial, not the higher infeasible one
    assert g["top1_mean"] == pytest.approx((0.88 + 0.91) / 2)  # both as measured
    assert g["infeasible"] == 1
    head = rep.text.splitlines()[1].split()
    assert "infeasible" in head and "above sweep.max_macs" in rep.text
    assert "infeasible" not in build([ok], Dense(0.9, DENSE_MACS, 0.5)).text
    one = [SimpleNamespace(metric="top1", mode="max")]
    assert [r["trial_id"] for r in pareto_front([over, ok], one)] == ["ok"]
    assert [r["trial_id"] for r in pareto_front([over], one)] == ["over"]  # nothing feasible
    assert [r.trial_id for r in pareto_front([as_record(over), as_record(ok)], TOP1_VS_MACS)
            ] == ["ok"]
    png = plot_pareto([over, ok], Dense(0.9, DENSE_MACS, 0.4), tmp_path / "p.png", "t")
    assert png.read_bytes()[:4] == b"\x89PNG"


def _fake_trial(max_macs, macs, top1=0.8):
    cfg = SimpleNamespace(sweep=SimpleNamespace(max_macs=max_macs), run_dir=Path("/t"),
                          search=SimpleNamespace(method="ofb", target_gmacs=None, budget=0.5))
    from orchestrator.phases import PhaseCost

    # 12 cores x 30 s of search work = 0.1 CPU-core-hours; 3 s of evaluation apart
    cost = PhaseCost("cpu_core", 12.0, 30.0, 60.0, eval_seconds=3.0)
    search = SimpleNamespace(subnet=Path("/t/search/subnet"), cost=cost, final={
        "macs": macs, "params": 10, "dense_macs": 2_000, "test_top1_before_finetune": 0.7})
    tuned = SimpleNamespace(metrics={"test_top1": top1}, cost=cost)
    return cfg, search, tuned


def test_trial_result_and_the_search_metric():
    from orchestrator.phases import trial_result
    from orchestrator.sweep import search_metrics

    rec = trial_result(*_fake_trial(max_macs=1_000, macs=1_200), wall=100.0)
    assert isinstance(rec, TrialRecord) and rec.top1 == 0.8 and rec.feasible is False
    assert rec.trial_overhead_s == pytest.approx(40.0) and rec.budget == "50pct"
    assert rec.search_device_hours == pytest.approx(0.1)  # evaluation not included
    assert rec.search_eval_device_hours == pytest.approx(0.01)
    report = rec.tune_report()
    assert report["phase"] == "done" and report["top1"] == 0.8
    assert report[OBJECTIVE_TOP1] == pytest.approx(0.8 - 1.0)
    assert "trial_id" not in report  # Tune adds its own
    fine = trial_result(*_fake_trial(max_macs=1_000, macs=900), wall=100.0)
    assert fine.feasible and fine.tune_report()[OBJECTIVE_TOP1] == 0.8
    assert trial_result(*_fake_trial(max_macs=None, macs=10**9), wall=1.0).feasible
    cfg = load_config(None, ['sweep.objectives=[{"metric": "top1", "mode": "max"}]',
                             "sweep.max_macs=1000"])
    assert search_metrics(cfg) == ([OBJECTIVE_TOP1], ["max"])
    cfg = load_config(None, ["sweep.num_samples=2"])
    assert search_metrics(cfg) == (["top1", "macs"], ["max", "min"])


class _Registry:
    """The slice of MlflowClient that register_best uses."""

    def __init__(self):
        self.aliases: dict[str, str] = {}

    def get_run(self, run_id):
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id),
                               data=SimpleNamespace(tags={"ofb_model_uri": f"runs:/{run_id}"}))

    def set_registered_model_alias(self, name, alias, version):
        self.aliases[alias] = version


def test_registry_aliases_go_to_feasible_trials_only():
    from orchestrator.tracking import Tracker

    ok, over = _feasibility_rows()
    worse = {**_row("ofb", 0.5, 0.80, 0.1, trial="worse"), "feasible": True}
    t = Tracker.__new__(Tracker)  # no MLflow store: only the ranking is under test
    t.cfg = SimpleNamespace(name="s", mlflow=SimpleNamespace(registered_model=None))
    t.client = _Registry()
    t._version_of = lambda name, run_id, uri: run_id
    rows = [{**r, "mlflow_run_id": f"run-{r['trial_id']}"} for r in (over, worse, ok)]
    done = t.register_best(rows)
    assert t.client.aliases == {"best-50pct": "run-ok", "ofb-50pct": "run-ok"}
    assert set(done) == {"best-50pct", "ofb-50pct"}
    t.client = _Registry()
    t.register_best([rows[0]])
    assert t.client.aliases == {}  # an infeasible subnet never becomes "best"


def test_imports_go_one_way():
    """report may import tracking; tracking must not import report; both use records."""
    import ast

    import orchestrator

    def imports(module: str) -> set[str]:
        tree = ast.parse((Path(orchestrator.__file__).parent / f"{module}.py").read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} \
            | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert "orchestrator.report" not in imports("tracking")
    assert "orchestrator.records" in imports("tracking") & imports("report") & imports("results")
    assert not {m for m in imports("records") if m.startswith(("orchestrator.", "ray", "mlflow"))}


def test_latency_budgets_show_their_target_and_measured_latency():
    lat = [{**_row("ofb", 0.5, 0.87, 0.1, trial="l1"), "target_latency_ms": 7.0,
            "latency_ms": 6.8},
           {**_row("ofb", 0.5, 0.86, 0.1, trial="l2"), "target_latency_ms": 7.0,
            "latency_ms": 7.2}]
    rep = build(lat, Dense(top1=0.9, macs=DENSE_MACS, device_hours=0.5))
    (g,) = rep.groups
    assert g["latency_target_ms"] == 7.0 and g["latency_ms"] == pytest.approx(7.0)
    assert "latency target" in rep.text and "7.000 ms" in rep.text
    assert "latency target" not in build(ROWS, Dense(0.9, DENSE_MACS, 0.5)).text
