"""Image folders follow the model: size and channels from model.img_size / model.in_chans.

The folder holds real Fashion-MNIST images saved as 28x28 grayscale PNGs; every mismatch between
data and model must be refused before Ray starts, with one message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import load_config
from trainers.config import DataConfig
from trainers.data import DataError, build_splits, check_fits, dataset_shape

CLASSES = 10
SMALL_VIT = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=7"]


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory) -> Path:
    """root/{train,val}/<class>/*.png: 4 + 2 real Fashion-MNIST images per class."""
    from tests.conftest import write_png_folder

    return write_png_folder(tmp_path_factory.mktemp("pngs"), 4, 2, CLASSES)


def _data(root: Path) -> DataConfig:
    return DataConfig(dataset="imagefolder", root=str(root), val_fraction=0.25)


@pytest.mark.parametrize("img_size", [28, 56])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_splits_follow_the_model(png_folder, img_size, in_chans):
    s = build_splits(_data(png_folder), img_size=img_size, in_chans=in_chans)
    assert (s.in_chans, s.img_size, s.num_classes) == (in_chans, img_size, CLASSES)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 20)
    for ds in (s.train, s.val, s.test):
        x, y = ds[0]
        assert tuple(x.shape) == (in_chans, img_size, img_size)
        assert 0 <= int(y) < CLASSES
    x, y = s.test[0]  # val/ is sorted: the first image is class_0's
    assert int(y) == 0 and x.std() > 0.1  # a real image, normalised
    if in_chans == 3:  # a grayscale image read as RGB: three equal channels before Normalize
        raw = x * x.new_tensor([0.229, 0.224, 0.225])[:, None, None] \
            + x.new_tensor([0.485, 0.456, 0.406])[:, None, None]
        assert np.allclose(raw[0], raw[1], atol=1e-5) and np.allclose(raw[1], raw[2], atol=1e-5)
    assert dataset_shape(_data(png_folder), img_size, in_chans) == (in_chans, CLASSES, img_size)


def test_default_shape_is_rgb_224(png_folder):
    assert dataset_shape(_data(png_folder)) == (3, CLASSES, 224)


def test_other_channel_counts_are_refused(png_folder):
    for bad in (2, 4):
        with pytest.raises(DataError, match=rf"model.in_chans={bad} .*allowed: 1 .*or 3"):
            build_splits(_data(png_folder), img_size=28, in_chans=bad)
        with pytest.raises(DataError, match=rf"model.in_chans={bad} "):
            dataset_shape(_data(png_folder), 28, bad)


def test_check_fits_names_both_shapes(png_folder):
    s = build_splits(_data(png_folder), img_size=28, in_chans=1)
    check_fits(s, 1, 28, CLASSES)  # agrees: nothing raised
    with pytest.raises(DataError, match=r"images are \(1, 28, 28\).*model takes \(1, 56, 56\)"):
        check_fits(s, 1, 56, CLASSES)
    with pytest.raises(DataError, match=r"images are \(1, 28, 28\).*model takes \(3, 28, 28\)"):
        check_fits(s, 3, 28, CLASSES)
    with pytest.raises(DataError, match="model.num_classes=5 but the data has 10 classes"):
        check_fits(s, 1, 28, 5)


def _main_without_ray(monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    """orchestrator.run's main with Ray start-up replaced by a failure: must exit before it."""
    import orchestrator.ray_setup
    from orchestrator.run import main

    def no_ray(*a, **k):
        raise AssertionError("Ray started although the config is refused")

    monkeypatch.setattr(orchestrator.ray_setup, "start_ray", no_ray)
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (["model.in_chans=2"], "error: model.in_chans=2 with data.dataset=imagefolder; allowed: 1"),
    (["model.num_classes=4"], "error: model.num_classes=4 but the data has 10 classes"),
])
def test_preflight_refuses_folder_mismatch_before_ray(png_folder, tmp_path, monkeypatch, capsys,
                                                      extra, message):
    argv = ["data.dataset=imagefolder", f"data.root={png_folder}", "model.img_size=28",
            f"output_dir={tmp_path}", *SMALL_VIT, *extra]
    code, err = _main_without_ray(monkeypatch, capsys, argv)
    assert code == 2 and err.startswith(message) and err.count("error:") == 1, err


def test_preflight_refuses_fixed_size_mismatch_before_ray(tmp_path, monkeypatch, capsys,
                                                          fmnist_dir):
    argv = [f"data.root={fmnist_dir}", "model.img_size=56", f"output_dir={tmp_path}", *SMALL_VIT]
    code, err = _main_without_ray(monkeypatch, capsys, argv)
    assert code == 2 and err.count("error:") == 1, err
    assert "model.img_size=56 but data.dataset='fashion_mnist' images are 28x28" in err


def test_preflight_passes_a_grayscale_folder(png_folder, tmp_path, capsys):
    from orchestrator.run import preflight

    cfg = load_config(None, ["data.dataset=imagefolder", f"data.root={png_folder}",
                             "model.img_size=28", "model.in_chans=1", f"output_dir={tmp_path}",
                             *SMALL_VIT])
    preflight(cfg)
    assert "test images of 1x28x28" in capsys.readouterr().out


def test_dry_run_cli(png_folder, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator.run", "--dry-run", "data.dataset=imagefolder",
         f"data.root={png_folder}", "model.img_size=28", "model.in_chans=1",
         f"output_dir={tmp_path}", *SMALL_VIT],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "36 train / 4 val / 20 test images of 1x28x28" in r.stdout
    assert "Ray" not in r.stdout  # validated and printed, nothing started
