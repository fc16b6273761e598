"""A folder of 28x28 grayscale PNGs, end to end on the session's Ray with 2 workers: dense
pretrain -> OFB search (PMIM reconstructs one channel) -> subnet -> fine-tune, with the images
read at model.img_size and model.in_chans (they used to be resized to 224 in every worker)."""

from __future__ import annotations

import pytest

from orchestrator.config import load_config
from orchestrator.phases import run_finetune, run_pretrain, run_search
from search_space.subnet import read_arch
from tests.conftest import tiny_overrides, write_png_folder

pytestmark = pytest.mark.ray


def test_grayscale_png_folder_runs_end_to_end(ray_cluster, tmp_path):
    root = write_png_folder(tmp_path / "pngs", 40, 10)
    cfg = load_config(None, tiny_overrides(tmp_path, **{
        "name": "pngs", "data.dataset": "imagefolder", "data.root": str(root),
        "data.val_fraction": 0.2, "data.augment": False, "model.img_size": 28,
        "model.in_chans": 1, "pretrain.epochs": 10, "search.epochs": 1,
        "search.ofb.ramp_epochs": 0.3, "search.lr_warmup_epochs": 0.3, "finetune.epochs": 1,
        "mlflow.enabled": False}))
    dense = run_pretrain(cfg)
    assert dense.metrics["test_top1"] > 0.3  # 10 classes: chance is 0.1
    res = run_search(cfg, dense)
    arch = read_arch(res.subnet)
    assert (arch.img_size, arch.in_chans, arch.num_classes) == (28, 1, 10)
    assert res.final["macs"] < res.final["dense_macs"]
    tuned = run_finetune(cfg, res.subnet)
    assert 0.0 <= tuned.metrics["test_top1"] <= 1.0 and tuned.metrics["epoch"] == 1
