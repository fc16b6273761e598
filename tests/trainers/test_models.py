"""Building timm ViTs from config, and loading user weights from a local file."""

from __future__ import annotations

import pytest
import torch

from search_space.models import build_vit
from trainers.checkpoint import save_weights
from trainers.config import TrainConfig
from trainers.model_factory import build_dense, dense_model_kwargs


def test_overrides_reach_timm():
    m = build_vit("vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=3,
                  num_classes=7, embed_dim=48, depth=3, num_heads=3)
    assert m.embed_dim == 48 and len(m.blocks) == 3 and m.num_classes == 7
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_data_defaults_fill_the_model_shape():
    cfg = TrainConfig.model_validate({"model": {"patch_size": 4, "embed_dim": 32, "depth": 1,
                                                "num_heads": 2}})
    kw = dense_model_kwargs(cfg)
    assert (kw["in_chans"], kw["num_classes"], kw["img_size"]) == (1, 10, 28)
    assert build_dense(cfg, device="meta").patch_embed.proj.in_channels == 1


def test_bad_names_and_shapes_are_clear():
    with pytest.raises(ValueError, match="vit_tinyy.*not a timm model"):
        build_vit("vit_tinyy_patch16_224")
    with pytest.raises(ValueError, match="resnet18.*only timm VisionTransformer"):
        build_vit("resnet18", device="meta")
    with pytest.raises(ValueError, match="unknown model override"):
        build_vit("vit_tiny_patch16_224", widht=3)
    cfg = TrainConfig.model_validate({"model": {"patch_size": 16}})
    with pytest.raises(ValueError, match="not divisible by patch size 16"):
        build_dense(cfg, device="meta")
    cfg = TrainConfig.model_validate({"model": {"patch_size": 4, "in_chans": 3}})
    with pytest.raises(ValueError, match="in_chans=3.*1 channel"):
        build_dense(cfg, device="meta")


def test_pretrained_file_is_loaded_offline(tmp_path):
    kw = dict(img_size=32, patch_size=8, in_chans=3, num_classes=5, embed_dim=32, depth=2,
              num_heads=2)
    src = build_vit("vit_tiny_patch16_224", **kw)
    f = tmp_path / "weights.safetensors"
    save_weights(src, f)
    dst = build_vit("vit_tiny_patch16_224", pretrained_file=f, **kw)
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="missing.safetensors.*never downloaded"):
        build_vit("vit_tiny_patch16_224", pretrained_file=tmp_path / "missing.safetensors", **kw)
