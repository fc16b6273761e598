"""Training throughput of the default dense ViT on this machine: bf16 vs fp32, 1 vs N threads.

Prints img/s per setting and the ratios, measured in one run. Not a test.
    python bench/train_throughput.py [--steps 20] [--batch 64]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from search_space.models import build_vit
from trainers.loop import autocast


def images_per_second(threads: int, precision: str, batch: int, steps: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_vit("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1,
                      num_classes=10, embed_dim=192, depth=6, num_heads=6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    dev = torch.device("cpu")
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        with autocast(dev, precision):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args()
    n = torch.get_num_threads()
    r = {}
    for threads in sorted({1, n}):
        for prec in ("fp32", "bf16"):
            r[threads, prec] = images_per_second(threads, prec, a.batch, a.steps)
            print(f"threads={threads} {prec}: {r[threads, prec]:.0f} img/s", flush=True)
    for threads in sorted({1, n}):
        print(f"bf16/fp32 at {threads} thread(s): {r[threads, 'bf16'] / r[threads, 'fp32']:.2f}")
    if n > 1:
        print(f"{n} threads / 1 thread (bf16): {r[n, 'bf16'] / r[1, 'bf16']:.2f}")


if __name__ == "__main__":
    main()
