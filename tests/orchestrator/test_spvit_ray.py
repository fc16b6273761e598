"""SPViT end to end on a real local Ray with 2 workers: pretrain -> SPViT search (one worker
killed after a checkpoint: thresholds, mixing logits and BN statistics resume) -> the folded
subnet exported, reloaded in a fresh process and as ONNX -> fine-tune."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from orchestrator.config import load_config
from orchestrator.phases import run_finetune, run_pretrain, run_search
from search_space.cost import count_macs, measure_macs
from search_space.subnet import export_onnx, load_subnet, read_arch
from tests.conftest import tiny_overrides
from tests.orchestrator.faults import run_and_kill_after_checkpoint

pytestmark = pytest.mark.ray


def test_spvit_search_resumes_folds_exports_and_reloads(ray_cluster, tmp_path, fmnist_dir):
    cfg = load_config(None, tiny_overrides(tmp_path, **{
        "name": "spvit", "model.depth": 3, "model.num_heads": 4, "search.method": "spvit",
        "search.epochs": 4, "search.lr_warmup_epochs": 0.5, "search.budget": 0.5,
        "search.spvit.arc_lr": 0.1, "finetune.epochs": 1, "scaling.max_failures": 2}))
    dense = run_pretrain(cfg)
    run_dir = cfg.run_dir / "ray" / f"search-{cfg.search_key()}"
    res = run_and_kill_after_checkpoint(lambda: run_search(cfg, dense), run_dir)
    f = res.final
    assert f["resumed_from_epoch"] >= 1, "the search restarted from scratch, not its checkpoint"
    assert f["macs"] < f["dense_macs"]
    assert {"mixers", "neurons_kept", "current_macs", "val_top1"} <= set(res.history[0])
    arch = read_arch(res.subnet)
    assert count_macs(arch) == f["macs"]
    assert any(b.mixer != "attn" for b in arch.blocks) or any(
        b.mlp_hidden < 4 * 32 for b in arch.blocks)
    code = textwrap.dedent(f"""
        import torch
        from search_space.subnet import load_subnet
        m = load_subnet({str(res.subnet)!r})
        print(sum(p.numel() for p in m.parameters()), tuple(m(torch.zeros(2, 1, 28, 28)).shape))
    """)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    assert out.split()[0] == str(f["params"]) and "(2, 10)" in out
    model = load_subnet(res.subnet)
    assert measure_macs(model, arch) == f["macs"]
    assert export_onnx(model, arch, tmp_path / "spvit.onnx").stat().st_size > 0
    # the fine-tune runs on the folded subnet (its quality is not the point here: arc_lr 0.1
    # swings these few gates hard, and a subnet whose mixers and neurons all went off is legal)
    tuned = run_finetune(cfg, res.subnet)
    assert 0.0 <= tuned.metrics["test_top1"] <= 1.0 and (tuned.path / "model.safetensors").exists()
