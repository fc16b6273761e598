"""UVC end to end on a real local Ray with 2 workers: pretrain -> UVC search (one worker killed
after a checkpoint: the counts, duals, gates and gate optimiser resume) -> subnet exported,
reloaded in a fresh process and as ONNX -> fine-tune."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from orchestrator.config import load_config
from orchestrator.phases import run_finetune, run_pretrain, run_search
from search_space.cost import count_macs, measure_macs
from search_space.subnet import export_onnx, load_subnet, read_arch
from tests.conftest import tiny_overrides
from tests.orchestrator.faults import run_and_kill_after_checkpoint

pytestmark = pytest.mark.ray


def test_uvc_search_resumes_exports_and_reloads(ray_cluster, tmp_path, fmnist_dir):
    cfg = load_config(None, tiny_overrides(tmp_path, **{
        "name": "uvc", "model.depth": 3, "model.num_heads": 4, "search.method": "uvc",
        "search.epochs": 4, "search.lr_warmup_epochs": 0.5, "search.budget": 0.5,
        "search.uvc.gate_warmup_epochs": 0.5, "search.uvc.gate_window": 5,
        "search.uvc.count_step": "fraction", "finetune.epochs": 1,
        "scaling.max_failures": 2}))
    dense = run_pretrain(cfg)
    run_dir = cfg.run_dir / "ray" / f"search-{cfg.search_key()}"
    res = run_and_kill_after_checkpoint(lambda: run_search(cfg, dense), run_dir)
    f = res.final
    assert f["resumed_from_epoch"] >= 1, "the search restarted from scratch, not its checkpoint"
    assert f["additions"] == {"uvc.count_step": "fraction"}
    assert f["target_macs"] == pytest.approx(0.5 * f["dense_macs"])
    hist = res.history
    assert {"z", "kept_blocks", "heads_pruned", "v_dims_pruned", "neurons_pruned",
            "current_macs", "params_fraction", "val_top1"} <= set(hist[0])
    assert hist[-1]["z"] > hist[0]["z"] or hist[-1]["current_macs"] <= 0.5 * f["dense_macs"]
    assert f["macs"] < f["dense_macs"], "the fraction step prunes within 4 short epochs"

    arch = read_arch(res.subnet)
    assert count_macs(arch) == f["macs"]
    code = textwrap.dedent(f"""
        import torch
        from search_space.subnet import load_subnet
        m = load_subnet({str(res.subnet)!r})
        print(sum(p.numel() for p in m.parameters()), m(torch.zeros(2, 1, 28, 28)).shape)
    """)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120).stdout.split()
    assert int(out[0]) == f["params"]
    model = load_subnet(res.subnet)
    assert measure_macs(model, arch) == f["macs"]
    onnx = export_onnx(model, arch, tmp_path / "uvc.onnx")
    assert onnx.stat().st_size > 0
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)

    tuned = run_finetune(cfg, res.subnet)
    assert tuned.metrics["test_top1"] > 0.3
