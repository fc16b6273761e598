"""The comparison's rules, without Ray: equal training for every method's weights."""

from __future__ import annotations

import pytest

from orchestrator.config import load_config
from orchestrator.phases import equal_training


@pytest.mark.parametrize("method,extra", [("ofb", 0), ("vit_slim", 0), ("uvc", 0),
                                          ("two_stage_taylor", 3), ("two_stage_magnitude", 3),
                                          ("dense_control", 3)])
def test_methods_whose_search_trains_no_weights_fine_tune_longer(method, extra):
    cfg = load_config(None, [f"search.method={method}", "search.epochs=3", "finetune.epochs=1"])
    out = equal_training(cfg)
    assert out.finetune.epochs == 1 + extra
    assert (out.finetune_key() == cfg.finetune_key()) is (extra == 0)
    assert cfg.finetune.epochs == 1  # the trial's own config is left as it was


def test_deit_s_config_passes_dry_run_with_an_image_folder(tmp_path):
    """The published DeiT-S settings load and validate (`--dry-run`, no Ray, no GPU) with the
    data root pointed at a local image folder."""
    import subprocess
    import sys

    from tests.conftest import write_png_folder

    root = write_png_folder(tmp_path / "imgs", train=2, val=1)
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator.run", "--config", "configs/deit_s_imagenet.yaml",
         "--dry-run", "--address", "auto", f"data.root={root}", f"output_dir={tmp_path}",
         "model.pretrained_file=null", "model.num_classes=10"],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "target_gmacs: 1.0" in r.stdout and "epochs: 100" in r.stdout


def test_report_flags_a_subnet_above_its_target_and_marks_additions():
    from orchestrator.records import TrialRecord
    from orchestrator.report import Dense, build

    def rec(method, macs, additions="", trial="t"):
        return TrialRecord(trial_id=trial, method=method, target_macs=500, macs=macs,
                           params=10, dense_macs=1000, top1=0.8, top1_before_finetune=0.7,
                           search_device_hours=0.1, finetune_device_hours=0.1,
                           device_kind="cpu_core", argmax_modules=2, additions=additions)

    rows = [rec("ofb", 520, '{"ofb.macs_tolerance": 0.02}'), rec("two_stage_taylor", 495)]
    r = build(rows, Dense(0.9, 1000, 1.0))
    g = {x["method"]: x for x in r.groups}
    assert g["ofb"]["over_target"] == 1 and g["two_stage_taylor"]["over_target"] == 0
    assert g["ofb"]["target_of_dense"] == 0.5 and g["ofb"]["argmax_modules"] == 2
    assert "1 !" in r.text and "ofb.macs_tolerance" in r.text
    assert "equal training" in r.text


def test_report_never_averages_the_published_method_with_our_variant():
    """A sweep that runs OFB as published and with our additions reports them as two groups,
    each compared with the baselines; metric names stay valid for MLflow."""
    import re

    from orchestrator.records import TrialRecord
    from orchestrator.report import Dense, build

    def rec(method, top1, hours, additions=""):
        return TrialRecord(trial_id="t", method=method, target_macs=500, macs=480, params=10,
                           dense_macs=1000, top1=top1, search_device_hours=hours,
                           finetune_device_hours=0.1, device_kind="cpu_core",
                           additions=additions)

    tol = '{"ofb.defer_elimination": true, "ofb.macs_tolerance": 0.02}'
    rows = [rec("ofb", 0.80, 0.2), rec("ofb", 0.82, 0.2), rec("ofb", 0.90, 0.4, tol),
            rec("vit_slim", 0.85, 0.8)]
    r = build(rows, Dense(0.9, 1000, 1.0))
    g = {x["label"]: x for x in r.groups}
    assert set(g) == {"ofb[published]", "ofb[ofb.defer_elimination,ofb.macs_tolerance]",
                      "vit_slim"}
    assert g["ofb[published]"]["top1_mean"] == pytest.approx(0.81)
    assert g["ofb[ofb.defer_elimination,ofb.macs_tolerance]"]["trials"] == 1
    ratios = {k: v for k, v in r.metrics.items() if k.startswith("cost_ratio/ofb")
              and "_vs_vit_slim" in k}
    assert sorted(ratios.values()) == pytest.approx([0.25, 0.5])
    assert all(re.fullmatch(r"[\w./ -]+", k) for k in r.metrics), list(r.metrics)
    assert "ofb[published] vs vit_slim search" in r.text


def test_vit_slim_l1_weights_are_the_published_effective_ones(tmp_path):
    import subprocess
    import sys

    from tests.conftest import write_png_folder
    from trainers.config import SearchConfig

    o = SearchConfig(method="vit_slim").vit_slim
    assert (o.l1_attn, o.l1_mlp, o.l1_tok) == (2e-4 / 4, 5e-5 / 4, 1e-4 / 4)
    root = write_png_folder(tmp_path / "imgs", train=2, val=1)
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator.run", "--config",
         "configs/vit_slim_deit_s_reference.yaml", "--dry-run", "--address", "auto",
         f"data.root={root}", f"output_dir={tmp_path}", "model.pretrained_file=null",
         "model.num_classes=10"],
        capture_output=True, text=True, timeout=300)
    assert "l1_attn: 5.0e-05" in r.stdout or "l1_attn: 5e-05" in r.stdout, r.stderr[-1500:]
