"""The dense model of a config: timm ViT + data-set defaults for in_chans, classes and size."""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from search_space.arch import ViTArch
from search_space.models import build_vit
from trainers.data import dataset_shape


def dense_model_kwargs(cfg: Any) -> dict[str, Any]:
    """timm keywords for `cfg.model`, filling shape keys the user left unset from `cfg.data`.

    The data set decides what the model may ask for (`dataset_shape` refuses, e.g., in_chans=2
    for an image folder or img_size=56 for Fashion-MNIST), so model and data agree by build."""
    kw = cfg.model.overrides()
    in_chans, num_classes, img_size = dataset_shape(cfg.data, kw.get("img_size"),
                                                    kw.get("in_chans"))
    kw.setdefault("in_chans", in_chans)
    kw.setdefault("num_classes", num_classes)
    kw.setdefault("img_size", img_size)
    return kw


def build_dense(cfg: Any, device: str | torch.device | None = None,
                pretrained: bool = True) -> VisionTransformer:
    """Build the config's dense ViT (with the user's weights file when `pretrained`)."""
    kw = dense_model_kwargs(cfg)
    model = build_vit(cfg.model.name, cfg.model.pretrained_file if pretrained else None,
                      device=device, **kw)
    arch = ViTArch.from_timm(model)
    if arch.img_size % arch.patch_size:
        raise ValueError(f"image size {arch.img_size} is not divisible by patch size "
                         f"{arch.patch_size} (model.name={cfg.model.name!r}); set "
                         "model.patch_size to a divisor, e.g. model.patch_size=4")
    return model
