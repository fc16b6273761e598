"""Measured latency per module, so a search can budget milliseconds on this device, not MACs.

MACs miss what a device does with a width (small heads, the stem, memory traffic), so a latency
budget needs measurements. Once per device we time (ms per batch, `torch.no_grad`, the fastest
of a few reps after warm-up: see `time_ms`) the three parts of a plain ViT over the widths a
search can reach: the stem + head (patch embed, cls/pos, final norm, head) over the embedding
width D; one attention branch `x + attn(norm1(x))` over (D, heads x head_dim); one MLP branch
`x + mlp(norm2(x))` over (D, hidden). Widths with several (heads, head_dim) splits store the
mean over splits (the summary prints how far apart they are).

The table is JSON in `~/.cache/ofb-orchestrator/latency/` (`$XDG_CACHE_HOME` respected,
`--cache-dir` overrides): latency belongs to the machine, not to a run, so it lives per user,
not under `runs/`; its name hashes device, torch version, threads, batch and the dense model.
`LatencyTable` interpolates it bilinearly in torch (clamped at the grid's edges), so expected
widths (0-d tensors) get gradients for a latency loss. On a busy machine measure with fewer
threads than cores (`--threads 1`): search_space/_timing.py says why.

Command line::

    python -m search_space.latency vit_tiny_patch16_224 --img-size 28 --patch-size 7 \
        --in-chans 1 --num-classes 10 --embed-dim 128 --depth 4 --num-heads 4 [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from search_space._timing import Branch, build_finite, device_key, time_ms
from search_space.arch import BlockArch, ViTArch

FORMAT = 2  # 2: attention per (heads, head_dim) cell too
_STEM_FIELDS = ("img_size", "patch_size", "in_chans", "num_classes", "class_token", "reg_tokens",
                "no_embed_class", "global_pool", "qkv_bias", "layer_scale", "fc_norm", "pre_norm")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ofb-orchestrator" / "latency"


def grid(n: int, divisions: int = 8, lo_frac: float = 0.0) -> list[int]:
    """Widths from n*lo_frac to n in steps of n/divisions, rounded to multiples of 8 when n is
    (hardware-friendly widths are what a search is told to prefer); n is always included."""
    step = max(n // divisions, 1)
    if n % 8 == 0 and step % 8:
        step = 8 * max(round(step / 8), 1)
    out = [w for w in range(step, n + 1, step) if w >= n * lo_frac]
    return out if out and out[-1] == n else [*out, n]


def _axis(xs: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower and upper grid index around x (clamped to the grid) and the upper one's weight."""
    if xs.numel() == 1:
        zero = torch.zeros_like(x, dtype=torch.long)
        return zero, zero, torch.zeros_like(x)
    x = torch.clamp(x, min=xs[0], max=xs[-1])  # tensor bounds: no host read
    i = (torch.searchsorted(xs, x.detach().contiguous(), right=True) - 1).clamp(0, len(xs) - 2)
    return i, i + 1, (x - xs[i]) / (xs[i + 1] - xs[i])


def _tensor(v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v if v.is_floating_point() else v.double()
    return torch.tensor(float(v), dtype=torch.float64)


@dataclass
class LatencyTable:
    """Measured ms per batch on one device; `ms` maps part -> values over (embed x widths)."""

    key: dict[str, Any]  # device_key + batch + model + dense arch: what the file name hashes
    embed: list[int]  # (nD,) grid of D
    widths: dict[str, list[int]]  # "attn": (nA,) heads x head_dim, "mlp": (nM,) hidden,
    #                               "attn_dims": (nd,) head dims of the cells
    ms: dict[str, list]  # "stem_head": (nD,), "attn": (nD, nA), "mlp": (nD, nM),
    #                      "attn_cells": (nD, H, nd) one attention per heads 1..H x head dim
    split_spread: float = 0.0  # max relative spread over (heads, head_dim) splits of one width
    seconds: float = 0.0  # how long measuring took
    loadavg: float = -1.0  # 1-min load average when measuring began (busy neighbours skew timings)

    @property
    def batch(self) -> int:
        return int(self.key["batch"])

    @property
    def dense(self) -> ViTArch:
        return ViTArch.from_dict(self.key["arch"])

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyTable:
        if d.get("format") != FORMAT:
            raise ValueError(f"latency table format {d.get('format')!r} is not {FORMAT}; "
                             "measure again with --force")
        return cls(**{k: v for k, v in d.items() if k != "format"})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")  # readers never see half a file
        tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))
        return tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        return cls.from_dict(json.loads(Path(path).read_text()))

    # --- predictions (differentiable in D and widths when they are tensors) ------------------
    def _grid(self, values: list, like: torch.Tensor) -> torch.Tensor:
        cache = self.__dict__.setdefault("_tensors", {})
        key = (tuple(values), like.dtype, like.device)
        if key not in cache:  # once per dtype and device: no upload per step
            cache[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
        return cache[key]

    def stem_head(self, D: Any) -> torch.Tensor:
        """ms of patch embed + cls/pos + final norm + head at embedding width D."""
        d = _tensor(D)
        i0, i1, t = _axis(self._grid(self.embed, d), d)
        v = self._grid(self.ms["stem_head"], d)
        return (1 - t) * v[i0] + t * v[i1]

    def _bilinear(self, part: str, D: Any, width: Any) -> torch.Tensor:
        d, w = _tensor(D), _tensor(width)
        dtype = torch.promote_types(d.dtype, w.dtype)
        d, w = d.to(dtype), w.to(dtype)
        i0, i1, t = _axis(self._grid(self.embed, d), d)
        j0, j1, u = _axis(self._grid(self.widths[part], w), w)
        V = self._values(part, dtype, w.device)  # (nD, nW)
        return (1 - t) * ((1 - u) * V[i0, j0] + u * V[i0, j1]) + t * (
            (1 - u) * V[i1, j0] + u * V[i1, j1])

    def attn_cell(self, D: Any, heads: Any, head_dim: Any) -> torch.Tensor:
        """ms of one attention branch with `heads` x `head_dim` (vectors: one value each), at
        embedding width D: the measured cell, interpolated over D and head_dim. Heads of one
        width differ (4 x 8 costs 40% more than 1 x 32 at D=128 here), which `attn` averages."""
        d, hd = _tensor(D), _tensor(head_dim)
        dtype = torch.promote_types(d.dtype, hd.dtype)
        d, hd = d.to(dtype), hd.to(dtype)
        h = torch.as_tensor(heads, device=hd.device).long() - 1  # row of the cell
        H = len(self.ms["attn_cells"][0])
        if int(h.max()) >= H or int(h.min()) < 0:
            raise ValueError(f"heads {heads} outside the table's 1..{H}")
        i0, i1, t = _axis(self._grid(self.embed, d), d)
        j0, j1, u = _axis(self._grid(self.widths["attn_dims"], hd), hd)
        V = self._values("attn_cells", dtype, hd.device)  # (nD, H, nd)
        return (1 - t) * ((1 - u) * V[i0, h, j0] + u * V[i0, h, j1]) + t * (
            (1 - u) * V[i1, h, j0] + u * V[i1, h, j1])

    def _values(self, part: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The measured values as a tensor, built once per dtype and device (a step's loss
        reads them every step: no upload each time)."""
        cache = self.__dict__.setdefault("_tensors", {})
        key = (part, dtype, device)
        if key not in cache:
            cache[key] = torch.tensor(self.ms[part], dtype=dtype, device=device)
        return cache[key]

    def attn(self, D: Any, width: Any) -> torch.Tensor:
        """ms of one attention branch (pre-norm + residual) with q/k/v width heads x head_dim."""
        return self._bilinear("attn", D, width)

    def mlp(self, D: Any, width: Any) -> torch.Tensor:
        """ms of one MLP branch (pre-norm + residual) with `width` hidden units."""
        return self._bilinear("mlp", D, width)

    def of_arch(self, arch: ViTArch) -> float:
        """Predicted ms per batch of a plain ViT: stem/head + each block's attention and MLP.

        A removed branch (mixer "none", mlp_hidden 0) counts 0 (its Zeros + add is not timed).
        Conv mixers, value-pruned attention (v_dims) and token pruning are not in the table:
        they raise; time such subnets with `measure_arch`.
        """
        dense = self.dense
        bad = [f for f in _STEM_FIELDS if getattr(arch, f) != getattr(dense, f)]
        if bad:
            raise ValueError(f"arch differs from the table's model in {bad}: "
                             f"{[(getattr(arch, f), getattr(dense, f)) for f in bad]} "
                             "(arch, table); measure a table for that model")
        if arch.tokens is not None:
            raise ValueError("arch prunes tokens; the latency table is measured at all "
                             f"{dense.num_tokens} tokens: use measure_arch")
        total = self.stem_head(arch.embed_dim)
        for i, b in enumerate(arch.blocks):
            if b.mixer not in ("attn", "none") or b.v_dims is not None:
                what = "v_dims" if b.mixer == "attn" else f"mixer {b.mixer!r}"
                raise ValueError(f"block {i} has {what}; the latency table covers plain "
                                 "attention, 'none' and MLPs only: use measure_arch")
            if b.mixer == "attn":
                total = total + self.attn_cell(arch.embed_dim, b.num_heads, b.head_dim)
            if b.mlp_hidden:
                total = total + self.mlp(arch.embed_dim, b.mlp_hidden)
        return float(total)

    def measure_arch(self, arch: ViTArch, batch: int | None = None, reps: int = 15) -> float:
        """Measured ms per batch of `arch` built by `build_from_arch`, on the table's device."""
        device = torch.device(self.key["device_type"])
        model = build_finite(arch, device)
        x = torch.randn(batch or self.batch, arch.in_chans, arch.img_size, arch.img_size,
                        device=device)  # (B, C, H, W)
        return time_ms(model, x, reps=reps, rep_ms=20.0)


def measure_table(name: str, dense: ViTArch, batch: int = 64, device: torch.device | None = None,
                  divisions: int = 8, reps: int = 7) -> LatencyTable:
    """Time the stem/head, attention and MLP branches over the grid a search can reach."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start, load = time.perf_counter(), os.getloadavg()[0] if hasattr(os, "getloadavg") else -1.0
    H = max(b.num_heads for b in dense.blocks)
    hd = max(b.head_dim for b in dense.blocks)
    hidden = max(b.mlp_hidden for b in dense.blocks)
    embed = grid(dense.embed_dim, divisions, 0.5)
    dims = grid(hd, divisions)
    cells = [(h, d) for h in range(1, H + 1) for d in dims]
    attn_w, mlp_w = sorted({h * d for h, d in cells}), grid(hidden, divisions)
    ms: dict[str, list] = {"stem_head": [], "attn": [], "mlp": [], "attn_cells": []}
    spread = 0.0
    for D in embed:
        model = build_finite(replace(dense, embed_dim=D, blocks=(BlockArch(1, 8, 8),)), device)
        model.blocks = nn.Sequential()  # the stem and head alone
        img = torch.randn(batch, dense.in_chans, dense.img_size, dense.img_size, device=device)
        ms["stem_head"].append(time_ms(model, img, reps))
        x = torch.randn(batch, dense.num_tokens, D, device=device)  # (B, T, D)
        by_width: dict[int, list[float]] = {}
        ms["attn_cells"].append([[0.0] * len(dims) for _ in range(H)])
        for h, d in cells:
            blk = build_finite(replace(dense, embed_dim=D, blocks=(BlockArch(h, d, 8),)),
                               device).blocks[0]
            t = time_ms(Branch(blk.norm1, blk.attn, blk.ls1), x, reps)
            by_width.setdefault(h * d, []).append(t)
            ms["attn_cells"][-1][h - 1][dims.index(d)] = t
        ms["attn"].append([statistics.fmean(by_width[w]) for w in attn_w])
        spread = max([spread] + [(max(v) - min(v)) / min(v) for v in by_width.values()])
        row = []
        for m in mlp_w:
            blk = build_finite(replace(dense, embed_dim=D, blocks=(BlockArch(1, 8, m),)),
                               device).blocks[0]
            row.append(time_ms(Branch(blk.norm2, blk.mlp, blk.ls2), x, reps))
        ms["mlp"].append(row)
    return LatencyTable(_key(name, dense, batch, device), embed,
                        {"attn": attn_w, "mlp": mlp_w, "attn_dims": dims},
                        ms, spread, time.perf_counter() - start, load)


def _key(name: str, dense: ViTArch, batch: int, device: torch.device | None) -> dict[str, Any]:
    """The table's identity, as JSON types (it is compared after a round trip)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    key = {**device_key(device), "batch": batch, "model": name, "arch": dense.to_dict()}
    return json.loads(json.dumps(key))


def table_path(name: str, dense: ViTArch, batch: int = 64, device: torch.device | None = None,
               cache_dir: str | Path | None = None) -> Path:
    """Where the table of this model, batch and device lives (hash of its key)."""
    key = _key(name, dense, batch, device)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir or default_cache_dir()).expanduser() / f"{name}-b{batch}-{digest}.json"


def dense_arch(name: str, **overrides: Any) -> ViTArch:
    """The dense ViTArch of a timm model name plus overrides (built on meta: no memory)."""
    from search_space.models import build_vit

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return ViTArch.from_timm(build_vit(name, device="meta", **overrides))


def load_table(name: str, batch: int = 64, cache_dir: str | Path | None = None,
               device: torch.device | None = None, **overrides: Any) -> LatencyTable:
    """The cached table of `name` (+ timm overrides) for this device; FileNotFoundError says how
    to measure it when there is none."""
    path = table_path(name, dense_arch(name, **overrides), batch, device, cache_dir)
    if not path.is_file():
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items())
        raise FileNotFoundError(
            f"no latency table for model {name!r} (batch {batch}, this device) at {path}; "
            f"measure it: python -m search_space.latency {name} --batch {batch} {flags}".rstrip())
    return LatencyTable.load(path)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m search_space.latency",
                                description="Measure (or find cached) per-module latency.")
    p.add_argument("model", help="timm model name, e.g. deit_small_patch16_224")
    for flag in ("img-size", "patch-size", "in-chans", "num-classes", "embed-dim", "depth",
                 "num-heads"):
        p.add_argument(f"--{flag}", type=int)
    p.add_argument("--mlp-ratio", type=float)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int,
                   help=f"torch intra-op threads (default {torch.get_num_threads()}); in the key")
    p.add_argument("--cache-dir", help=f"default: {default_cache_dir()}")
    p.add_argument("--force", action="store_true", help="measure even if a table is cached")
    p.add_argument("--check", action="store_true", help="also time the dense model end to end")
    p.add_argument("--subnet", nargs="+", metavar="DIR", help="exported subnet folders: time "
                   "each end to end (alternating with the dense model) next to its prediction")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None
                 and k not in ("model", "batch", "threads", "cache_dir", "force", "check",
                               "subnet")}
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        dense = dense_arch(args.model, **overrides)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = table_path(args.model, dense, args.batch, cache_dir=args.cache_dir)
    cached = path.is_file() and not args.force
    table = LatencyTable.load(path) if cached else measure_table(args.model, dense, args.batch)
    if not cached:
        table.save(path)
    k, w, rows = table.key, table.widths, table.ms["attn"] + table.ms["mlp"]
    flat = [*table.ms["stem_head"], *(v for r in rows for v in r)]
    drops = sum(b < 0.9 * a for r in rows for a, b in zip(r, r[1:], strict=False))
    print(f"{'cached' if cached else 'measured'}: {path}\n"
          f"device {k['device_name']} ({k['device_type']}), torch {k['torch']}, "
          f"{k['threads']} threads, batch {table.batch}; measuring took {table.seconds:.1f} s\n"
          f"grid: embed {table.embed}\n      attn widths {w['attn']}\n      mlp {w['mlp']}\n"
          f"ms per batch: {min(flat):.3f} .. {max(flat):.3f}; attention splits of one width "
          f"differ by up to {100 * table.split_spread:.0f}%\n"
          f"noise: {drops} of {sum(len(r) - 1 for r in rows)} width steps >10% faster; load "
          f"{f'{table.loadavg:.1f}' if table.loadavg >= 0 else '?'} on {os.cpu_count()} cores "
          "(if many: --force, fewer --threads)\n"
          f"dense predicted: {table.of_arch(dense):.3f} ms")
    if args.check:
        print(f"dense measured:  {table.measure_arch(dense):.3f} ms")
    for folder in args.subnet or []:
        from search_space.subnet import read_arch

        arch = read_arch(folder)
        d1, sub, d2 = (table.measure_arch(a) for a in (dense, arch, dense))  # drift on both
        print(f"subnet {folder}: measured {sub:.3f} ms = {sub / ((d1 + d2) / 2):.3f} of the "
              f"dense model's {(d1 + d2) / 2:.3f}; predicted {table.of_arch(arch):.3f} ms = "
              f"{table.of_arch(arch) / table.of_arch(dense):.3f} of dense")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
