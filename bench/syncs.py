"""Device-to-host syncs per training step, counted on the CPU stand-in device (not a test).

On a GPU every `.item()`, `bool(tensor)`, `nonzero`, boolean-mask index and copy to the host
stalls the CPU until the device queue drains; a step that forces many of them cannot keep a GPU
busy. This counts them with tests/device_strict.py (CUDA's rules, CPU compute) for the shared
loop of every registered method and for plain supervised training.

    python bench/syncs.py                    # the built-in default model (goal: <= 5 per step)
    python bench/syncs.py --model deit_s --steps 6 --batch 2     # DeiT-S at 224 pixels

Each step's count is taken between two batches of one `train_one_epoch`, so elimination steps,
slicing and the epoch-end statistics are included in the mean and show in the max.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search_space.arch import ViTArch  # noqa: E402
from search_space.models import build_vit  # noqa: E402
from tests.device_strict import DEVICE, StrictDevice, mark_steps  # noqa: E402
from trainers.config import SearchConfig  # noqa: E402
from trainers.loop import train_one_epoch  # noqa: E402
from trainers.methods import get_method, list_methods  # noqa: E402

MODELS = {
    "default": dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=128,
                    depth=4, num_heads=4),
    "deit_s": dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=384,
                   depth=12, num_heads=6),
}


def per_step(name: str | None, spec: dict, batches: list, steps: int) -> list[int]:
    torch.manual_seed(0)
    dense = build_vit("vit_tiny_patch16_224", **spec)
    marks: list[int] = []
    with StrictDevice() as mode:
        if name is None:
            model, method = dense.to(DEVICE), None
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        else:
            cfg = SearchConfig(method=name, budget=0.5, epochs=1, lr_warmup_epochs=0,
                               ofb={"ramp_epochs": 0.2, "eliminations_per_epoch": 3})
            method = get_method(name)(cfg, steps, ViTArch.from_timm(dense))
            method.setup(DEVICE)
            model = method.wrap(dense).to(DEVICE)
            opt = torch.optim.AdamW(method.param_groups(model), lr=1e-3)
        train_one_epoch(model, mark_steps(batches, mode, marks), opt, None, DEVICE,
                        grad_clip=5.0, method=method, max_steps=steps)
        marks.append(mode.syncs)
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=sorted(MODELS), default="default")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--methods", nargs="*", default=None, help="default: every registered one")
    a = p.parse_args()
    spec = MODELS[a.model]
    g = torch.Generator().manual_seed(0)
    s, c = spec["img_size"], spec["in_chans"]
    batches = [(torch.randn(a.batch, c, s, s, generator=g),
                torch.randint(0, spec["num_classes"], (a.batch,), generator=g))
               for _ in range(a.steps)]
    print(f"syncs per training step, {a.model} model ({s}px, D{spec['embed_dim']}, depth "
          f"{spec['depth']}), {a.steps} steps of batch {a.batch}, stand-in device:")
    for name in [None, *(a.methods if a.methods is not None else list_methods())]:
        counts = per_step(name, spec, batches, a.steps)
        print(f"  {name or 'supervised':<20} mean {statistics.fmean(counts):5.2f}  "
              f"median {statistics.median(counts):4.0f}  max {max(counts):4d}  "
              f"(goal <= 5 mean)", flush=True)


if __name__ == "__main__":
    main()
