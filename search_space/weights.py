"""Reading weights files a user hands us (subnets, checkpoints), with errors that name the file
and, for a file that does not fit its architecture, the block and arch.json field.

Without this a truncated file gives safetensors' `header too large` and a hand-edited arch.json
torch's raw list of size mismatches; neither says which file or which width is wrong.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from search_space.arch import ViTArch

# the arch.json field a block's tensor follows (by the key's suffix)
BLOCK_FIELDS = (
    ("attn.qkv.", "num_heads x head_dim (v_dims for the value rows)"),
    ("attn.proj.", "v_dims or num_heads x head_dim"),
    ("attn.conv.", "conv_dim"), ("attn.bn.", "conv_dim"),
    ("mlp.fc1.", "mlp_hidden"), ("mlp.fc2.", "mlp_hidden"),
    ("norm", "embed_dim"), ("ls", "embed_dim"),
)
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def read_state_dict(path: str | Path, device: str | torch.device = "cpu"
                    ) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a corrupt, truncated or foreign file is named."""
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own (non-OSError) type
        raise ValueError(f"{path}: not a readable safetensors weights file ({type(e).__name__}: "
                         f"{e}); it is truncated, corrupt or of another format. Re-export it or "
                         "restore it from a copy") from None


def where(key: str, arch: ViTArch | None) -> str:
    """Which part of arch.json a state-dict key follows, with its value when known."""
    m = _BLOCK_KEY.fullmatch(key)
    if m is None:
        return "embed_dim, img_size, patch_size or num_classes"
    i, rest = int(m.group(1)), m.group(2)
    field = next((f for prefix, f in BLOCK_FIELDS if rest.startswith(prefix)), "the block")
    if arch is None or i >= len(arch.blocks):
        return f"blocks[{i}] ({field})"
    b = arch.blocks[i]
    shown = {k: getattr(b, k) for k in ("mixer", "num_heads", "head_dim", "mlp_hidden",
                                        "v_dims", "conv_dim") if getattr(b, k)}
    return f"blocks[{i}] ({field}; arch.json has {shown})"


def check_fits(model: nn.Module, sd: dict[str, torch.Tensor], path: str | Path,
               arch: ViTArch | None = None) -> None:
    """Refuse a weights file that does not fit `model` (built from `arch`), naming the first
    missing, unexpected or wrongly shaped tensor and the arch.json field it follows."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    if missing or extra:
        k = (missing or extra)[0]
        what = "lacks" if missing else "has an extra"
        raise ValueError(f"{path} does not fit its architecture: it {what} tensor {k!r} "
                         f"({len(missing)} missing, {len(extra)} unexpected in all), which "
                         f"follows {where(k, arch)}: the weights and arch.json come from "
                         "different subnets, or arch.json was edited")
    for k, shape in want.items():
        got = tuple(sd[k].shape)
        if got != shape:
            raise ValueError(f"{path} does not fit its architecture: {k!r} is {list(got)} in "
                             f"the file but the architecture needs {list(shape)}; it follows "
                             f"{where(k, arch)}")


def load_checked(model: nn.Module, path: str | Path, arch: ViTArch | None = None,
                 strict: bool = True, device: str | torch.device = "cpu") -> None:
    """Load a safetensors file into `model` with the errors above (strict: every tensor)."""
    sd = read_state_dict(path, device)
    if strict:
        check_fits(model, sd, path, arch)
    model.load_state_dict(sd, strict=strict)
