"""The report's arithmetic: groups per method and budget, costs, the OFB-vs-two-stage ratio."""

from __future__ import annotations

import pytest

from orchestrator.report import Dense, build, plot_pareto

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
    assert ofb50["top1_mean"] == pytest.approx(0.87) and ofb50["search_h"] == pytest.approx(0.2)
    assert ofb50["top1_sd"] == pytest.approx(0.02 ** 0.5 / 10)  # sample sd of 0.88, 0.86
    assert ofb50["top1_before_ft"] == pytest.approx(0.82) and g[("ofb", "30pct")]["top1_sd"] is None
    assert ofb50["macs_of_dense"] == pytest.approx(0.505)
    # total = the pretrain share (0.5 h over 5 trials) + search + fine-tune, averaged
    assert ofb50["total_h"] == pytest.approx(0.1 + 0.2 + 0.01)
    m = rep.metrics
    assert m["cost_ratio/ofb_vs_two_stage_taylor/50pct"] == pytest.approx(0.2 / 0.4)
    assert m["top1_gain/ofb_vs_two_stage_taylor/50pct"] == pytest.approx(0.02)  # mean - mean
    assert m["top1_vs_control/two_stage_taylor/50pct"] == pytest.approx(-0.04)
    assert "top1_vs_control/dense_control/100pct" not in m
    assert m["cost_ratio/ofb_search_vs_dense_training"] == pytest.approx((0.2 + 0.1) / 2 / 0.5)
    assert "87.00% +/- 1.41" in rep.text
    line = next(x for x in rep.text.splitlines() if x.startswith("ofb vs two_stage_taylor"))
    assert line.split()[-4:] == ["50pct", "0.2000", "0.4000", "0.500"]
    assert "dense training cost is the reference" not in rep.text
    alone = build([r for r in ROWS if r["method"] == "ofb"], Dense(0.9, DENSE_MACS, 0.5))
    assert "dense training cost is the reference" in alone.text


def test_pareto_png(tmp_path):
    png = plot_pareto(ROWS, Dense(0.9, DENSE_MACS, 0.4), tmp_path / "p.png", "t")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
