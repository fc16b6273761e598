"""Subnets: a timm VisionTransformer with per-block widths and mixers, exported as arch.json +
weights, the end of every method (each method extracts its own; OFB's fold is in
search_space/ofb/extract.py).

`load_subnet(folder)` needs only torch, timm, safetensors and search_space's core modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from search_space.arch import ViTArch
from search_space.mixers import build_block_
from search_space.tokens import install_token_pruning
from search_space.weights import load_checked

ARCH_FILE, WEIGHTS_FILE, ONNX_FILE = "arch.json", "model.safetensors", "model.onnx"
# arch.json's format: raised when a change would make older readers misread a file; a reader
# refuses a newer one instead of guessing (files without the key are format 1)
ARCH_FORMAT = 1


def build_from_arch(arch: ViTArch, device: str | torch.device | None = None) -> VisionTransformer:
    """An untrained timm ViT with the blocks of `arch`: each its registered mixer and MLP.

    depth = len(arch.blocks) (a block-skipping method's subnet is simply shallower).
    """
    with torch.device(device or "cpu"):
        model = VisionTransformer(
            img_size=arch.img_size, patch_size=arch.patch_size, in_chans=arch.in_chans,
            num_classes=arch.num_classes, embed_dim=arch.embed_dim, depth=arch.depth,
            num_heads=1, qkv_bias=arch.qkv_bias, class_token=arch.class_token,
            reg_tokens=arch.reg_tokens, no_embed_class=arch.no_embed_class,
            global_pool=arch.global_pool, fc_norm=arch.fc_norm or None,
            pre_norm=arch.pre_norm, init_values=1e-5 if arch.layer_scale else None,
            weight_init="skip")
        grid = arch.img_size // arch.patch_size
        for blk, b in zip(model.blocks, arch.blocks, strict=True):
            build_block_(blk, arch.embed_dim, b, arch.qkv_bias, arch.num_prefix_tokens, grid)
        install_token_pruning(model, arch)
    return model


def export_subnet(model: nn.Module, arch: ViTArch, folder: str | Path,
                  extra: dict | None = None) -> Path:
    """Write `arch.json` (+ `extra` facts such as MACs) and `model.safetensors` to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(folder / WEIGHTS_FILE))
    (folder / ARCH_FILE).write_text(arch_json(arch.to_dict(), extra))
    return folder


def arch_json(arch: dict, extra: dict | None = None) -> str:
    """arch.json's text: `{"arch": {...}, "format": ARCH_FORMAT, ...extra}`."""
    return json.dumps({"arch": arch, "format": ARCH_FORMAT, **(extra or {})}, indent=2,
                      sort_keys=True)


def read_arch(folder: str | Path) -> ViTArch:
    """The architecture in a folder's arch.json: `{"arch": {...ViTArch...}, ...extra}` (every
    subnet, checkpoint and dense cache writes this), or a bare ViTArch dict (older caches).
    A file that is not JSON, comes from a newer format, or holds a value a block cannot have
    is refused naming the file, the block and the field."""
    path = Path(folder) / ARCH_FILE
    try:
        blob = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable arch.json ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(blob).__name__}")
    fmt = blob.get("format", 1)
    if not isinstance(fmt, int) or fmt > ARCH_FORMAT:
        raise ValueError(f"{path}: arch.json format {fmt!r} is newer than this version reads "
                         f"(up to {ARCH_FORMAT}); update ofb-orchestrator to load this subnet")
    if isinstance(blob.get("arch"), dict):
        blob = blob["arch"]
    elif "blocks" not in blob:
        raise ValueError(f"{path}: expected {{'arch': {{...}}}} or a ViTArch dict with "
                         f"'blocks', got keys {sorted(blob)}")
    return _arch_from(blob, path)


def _arch_from(d: dict, path: Path) -> ViTArch:
    try:
        return ViTArch.from_dict(d)
    except (TypeError, ValueError, KeyError) as e:  # from_dict names the block and field
        raise ValueError(f"{path}: arch.{e}" if str(e).startswith("blocks") else
                         f"{path}: arch is not a valid architecture: {e}") from None


def load_subnet(folder: str | Path, device: str | torch.device = "cpu") -> VisionTransformer:
    """Rebuild an exported subnet from its folder (no project state needed).

    arch.json is `{"arch": {...ViTArch...}, ...extra}`; a bare ViTArch dict (older dense-cache
    files) is accepted too.
    """
    folder = Path(folder)
    for f in (ARCH_FILE, WEIGHTS_FILE):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder} is not a subnet folder: {f} is missing")
    arch = read_arch(folder)
    model = build_from_arch(arch, device=device)
    load_checked(model, folder / WEIGHTS_FILE, arch, device=device)
    return model.eval()


def dummy_input(model: nn.Module, arch: ViTArch, batch: int = 1) -> torch.Tensor:
    """Zeros of the model's input shape, on the model's device: (batch, C, H, W)."""
    device = next(model.parameters()).device
    return torch.zeros(batch, arch.in_chans, arch.img_size, arch.img_size, device=device)


def export_onnx(model: nn.Module, arch: ViTArch, path: str | Path, batch: int = 1) -> Path:
    """ONNX export with a dynamic batch dimension (legacy TorchScript exporter: no extra deps).

    The dummy input is built on the model's device (a model on a GPU exports as it is)."""
    path = Path(path)
    x = dummy_input(model, arch, batch)
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    for m, _ in fused:
        m.fused_attn = False
    try:
        torch.onnx.export(model.eval(), (x,), str(path), input_names=["images"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    finally:
        for m, f in fused:
            m.fused_attn = f
    return path
