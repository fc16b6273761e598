"""Build dense timm ViTs from a name plus overrides, optionally from a local weights file.

Nothing is ever downloaded: this project runs on machines without hub access, so a pretrained
model comes from a file the user names (`pretrained_file`), loaded through timm's own
`pretrained_cfg_overlay=dict(file=...)` path so its key remapping, pos-embed resampling and
head/in_chans adaptation all apply.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

# timm keywords a user may override on any VisionTransformer.
VIT_OVERRIDES = (
    "img_size",
    "patch_size",
    "in_chans",
    "num_classes",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "class_token",
    "global_pool",
    "drop_rate",
    "drop_path_rate",
    "init_values",
)


def check_model_name(name: str) -> None:
    """Raise a clear error unless `name` is a timm VisionTransformer."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(
            f"model.name={name!r} is not a timm model. Close names: {close}. "
            "See timm.list_models('vit_*') / ('deit_*')."
        )


def build_vit(
    name: str,
    pretrained_file: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> VisionTransformer:
    """Create a timm ViT; `overrides` go to its constructor (img_size, patch_size, embed_dim...).

    Args:
        name: timm model name, e.g. ``deit_tiny_patch16_224``.
        pretrained_file: local ``.safetensors``/``.pth``/``.bin`` file with the dense weights.
        device: ``"meta"`` builds without memory, e.g. only to count MACs.
        **overrides: keywords from `VIT_OVERRIDES`.
    """
    check_model_name(name)
    bad = sorted(set(overrides) - set(VIT_OVERRIDES))
    if bad:
        raise ValueError(f"unknown model override(s) {bad}; allowed: {list(VIT_OVERRIDES)}")
    kwargs: dict[str, Any] = dict(overrides)
    if pretrained_file is not None:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"model.pretrained_file={str(path)!r} does not exist; give a local weights file "
                "(.safetensors, .pth or .bin): weights are never downloaded"
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        overlay: dict[str, Any] = dict(file=str(path))
        head = _head_classes(path)
        if head is not None:  # keep the file's head when its class count is the model's
            overlay["num_classes"] = head
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = timm.create_model(name, **kwargs)
    except Exception as e:
        if pretrained_file is None:
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        why = _shape_mismatch(Path(pretrained_file).expanduser(), name, overrides) or \
            f"{type(e).__name__}: {first}"
        raise ValueError(f"model.pretrained_file={str(pretrained_file)!r} cannot be loaded into "
                         f"model.name={name!r} with {overrides or 'its defaults'}: {why} (a "
                         "truncated or corrupt file, or weights of another model)") from e
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"model.name={name!r} builds a {type(model).__name__}; only timm VisionTransformer "
            "models (vit_*, deit_*) are searchable"
        )
    return model


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a weights file without reading its data ({} if unreadable)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        sd = torch.load(path, map_location="meta", weights_only=True)
        sd = sd.get("model", sd.get("state_dict", sd)) if isinstance(sd, dict) else {}
        return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    except Exception:  # noqa: BLE001 - the caller reports the loader's own error instead
        return {}


def _shape_mismatch(path: Path, name: str, overrides: dict[str, Any]) -> str | None:
    """The first tensor whose shape differs between the file and the model asked for (timm's
    own message can blame the input channels for a width mismatch). Tensors timm adapts on
    load (patch projection channels, position embedding, head) are not compared."""
    got = _file_shapes(path)
    if not got:
        return None
    with torch.device("meta"):
        want = timm.create_model(name, **overrides).state_dict()
    for k, v in want.items():
        if k in got and got[k] != tuple(v.shape) and not k.startswith(
                ("pos_embed", "patch_embed.proj.", "head.")):
            return (f"{k!r} is {list(got[k])} in the file but {list(v.shape)} in the model "
                    "(its width, depth or heads differ from model.*)")
    return None


def _head_classes(path: Path) -> int | None:
    """Rows of `head.weight` in a weights file, read without loading the whole file if we can."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                if "head.weight" in f.keys():
                    return int(f.get_slice("head.weight").get_shape()[0])
            return None
        sd = torch.load(path, map_location="meta", weights_only=True)
        sd = sd.get("model", sd.get("state_dict", sd)) if isinstance(sd, dict) else {}
        w = sd.get("head.weight")
        return int(w.shape[0]) if w is not None else None
    except Exception:  # timm reports unreadable files itself, with its own message
        return None


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP/FSDP-style wrappers."""
    return getattr(model, "module", model)
