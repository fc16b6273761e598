"""Realized speed of exported subnets: inference throughput gain over MACs reduction, against
their dense model, at one batch size (issue 14: batch 64). Measured in one run, interleaved
(dense, subnet, dense, ...) so that machine drift hits both; prints ratios, asserts nothing.

    python bench/subnet_speed.py --sweep runs/compare_methods [--budget 0.5] [--batch 64]
    python bench/subnet_speed.py --dense runs/cache/dense/<key> SUBNET_DIR [SUBNET_DIR ...]

A ratio of 1 means the subnet runs as much faster as its MACs promise; below 1, costs the MAC
count leaves out (norms, softmax, GELU, BatchNorm, per-op overhead) take their share.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from search_space.cost import count_macs
from search_space.subnet import load_subnet, read_arch


def seconds_per_batch(model: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    with torch.no_grad():
        for _ in range(2):
            model(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x)
    return (time.perf_counter() - t0) / reps


def from_sweep(folder: Path, budget: float | None) -> tuple[Path, list[tuple[str, Path]]]:
    import pyarrow.parquet as pq

    rows = pq.read_table(folder / "results.parquet").to_pylist()
    dense = Path(json.loads((folder / "dense.json").read_text())["path"])
    out = []
    for r in sorted(rows, key=lambda r: (r["method"], r["target_macs"] or 0)):
        frac = (r["target_macs"] or r["dense_macs"]) / r["dense_macs"]
        if budget is not None and abs(frac - budget) > 1e-6 or not r["subnet_path"]:
            continue
        extra = json.loads(r["additions"] or "{}") if isinstance(r["additions"], str) else (
            r["additions"] or {})
        variant = f"[{'+'.join(k.split('.')[-1] for k in extra)}]" if extra else ""
        out.append((f"{r['method']}{variant} {frac:.0%} {r['trial_id']}",
                    Path(r["subnet_path"])))
    return dense, out


def describe(folder: Path) -> str:
    blocks = read_arch(folder).blocks
    return " ".join(b.mixer if b.mixer != "attn" else f"attn{b.num_heads}" for b in blocks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("subnets", nargs="*", type=Path)
    p.add_argument("--dense", type=Path, help="the dense model's folder (cache/dense/<key>)")
    p.add_argument("--sweep", type=Path, help="a sweep folder: its results.parquet's subnets")
    p.add_argument("--budget", type=float, help="with --sweep: only trials at this budget")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.sweep:
        dense_dir, subnets = from_sweep(a.sweep, a.budget)
    elif a.dense and a.subnets:
        dense_dir, subnets = a.dense, [(s.parent.parent.name, s) for s in a.subnets]
    else:
        p.error("give --sweep DIR, or --dense DIR and subnet folders")
    dense, d_arch = load_subnet(dense_dir), read_arch(dense_dir)
    img = d_arch.img_size
    x = torch.randn(a.batch, d_arch.in_chans, img, img)
    print(f"batch {a.batch}, {a.threads} thread(s), dense {count_macs(d_arch) / 1e6:.2f} M MACs")
    print(f"{'subnet':34} {'MACs red.':>9} {'speed-up':>9} {'ratio':>6}  blocks")
    for label, folder in subnets:
        sub, arch = load_subnet(folder), read_arch(folder)
        t_d = t_s = 0.0
        for _ in range(3):  # interleaved rounds
            t_d += seconds_per_batch(dense, x, a.reps)
            t_s += seconds_per_batch(sub, x, a.reps)
        red, gain = count_macs(d_arch) / count_macs(arch), t_d / t_s
        print(f"{label:34} {red:8.2f}x {gain:8.2f}x {gain / red:6.3f}  {describe(folder)}")


if __name__ == "__main__":
    main()
