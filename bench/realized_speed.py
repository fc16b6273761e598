"""Realized speed-up of each method's subnet, judged against a uniform ViT at the same MACs.

A subnet's ratio = (throughput gain over the dense model) / (MACs reduction) falls below 1
for costs the MAC count leaves out (per-op overhead, norms, GELU, odd widths). The uniform
reference pays the same uncounted costs, so "subnet ratio / reference ratio" (goal >= 0.95)
isolates what the searched *shape* costs. Prints ratios at batch 1 and 64; asserts nothing.

    python bench/realized_speed.py                                  # in-process searches
    python bench/realized_speed.py --sweep runs/compare_methods --budget 0.5

Reference: a plain ViT of the dense depth; every block keeps round(f * heads) heads of the dense
head_dim and f of the MLP width (multiples of 8 where the dense widths are), one f for all
blocks, chosen by scanning f for the MACs closest to the subnet's. Conv / removed mixers,
skipped blocks and pruned tokens are not mimicked. A subnet with a narrower residual stream
gets a reference whose embedding is the subnet's, rounded to a multiple of 8: embedding width
shrinks every op alike, so only the block shapes are compared. Throughputs are paired: each
round times dense, subnet, reference in turn (each the median of its calls); gains are medians
of the per-round gains.
Without --sweep each registered method searches in-process at budget 0.5 on synthetic data
(a few hundred steps, from a briefly trained dense model: widths, not accuracy, matter here);
SPViT's arc_lr is raised so its gates can move in that time (its label says so). A method that
misses the budget in so few steps keeps its row: the MACs column shows what it reached.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from pathlib import Path

import torch
from subnet_speed import from_sweep  # bench/ is on sys.path when this file runs as a script
from torch import Tensor, nn

from search_space.arch import BlockArch, ViTArch
from search_space.cost import count_macs
from search_space.models import build_vit
from search_space.subnet import build_from_arch, load_subnet, read_arch
from trainers.config import SearchConfig
from trainers.loop import train_one_epoch, warmup_cosine
from trainers.methods import get_method, list_methods

MODEL = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=128, depth=4,
             num_heads=4)  # the built-in default (orchestrator/default.yaml)
BATCHES = (1, 64)
Subnet = tuple[str, nn.Module, ViTArch]  # label, model, architecture
# SPViT's thresholds move ~arc_lr per step from 1.5: the sweep's 0.01 flips no gate in 180 steps
SPVIT = {"arc_lr": 0.1}


def snap(x: float, full: int) -> int:
    """x rounded to a multiple of 8 (of 1 if `full` is not one), within [multiple, full]."""
    m = 8 if full % 8 == 0 else 1
    return max(m, min(full, m * math.floor(x / m + 0.5)))


def uniform_reference(dense: ViTArch, target_macs: float, embed_dim: int) -> ViTArch:
    """The uniformly scaled plain ViT whose MACs are closest to `target_macs`."""
    best: tuple[float, ViTArch] | None = None
    for i in range(1, 1001):  # MACs(f) jumps at each head count: a scan, not a bisection
        f = i / 1000
        blocks = tuple(BlockArch(max(1, math.floor(f * b.num_heads + 0.5)), b.head_dim,
                                 snap(f * b.mlp_hidden, b.mlp_hidden)) for b in dense.blocks)
        arch = ViTArch(**{**dense.to_dict(), "blocks": blocks, "embed_dim": embed_dim,
                          "tokens": None})
        err = abs(count_macs(arch) - target_macs)
        if best is None or err <= best[0]:  # ties: the widest (f = 1 for a dense subnet)
            best = (err, arch)
    return best[1]


def widths(arch: ViTArch) -> str:
    """Per-block widths: heads x head dim (value widths) or the mixer, then / MLP hidden."""
    out = []
    for b in arch.blocks:
        if b.mixer == "attn":
            mix = f"{b.num_heads}x{b.head_dim}" + (f"v{list(b.v_dims)}" if b.v_dims else "")
        else:
            mix = f"{b.mixer}{b.conv_dim or ''}"
        out.append(f"{mix}/{b.mlp_hidden}")
    tok = "" if arch.tokens is None else f", tokens {[len(t) for t in arch.tokens]}"
    return f"embed {arch.embed_dim}: " + "  ".join(out) + tok


def seconds_per_batch(model: nn.Module, x: Tensor, seconds: float) -> float:
    """Median time of one forward over about `seconds` (at least 5 calls): a median, not a
    mean, so a call preempted by another process on this 2-core machine does not count."""
    times = []
    with torch.inference_mode():
        model(x)  # warm-up: allocator and kernel choice for this shape
        end = time.perf_counter() + seconds
        while len(times) < 5 or time.perf_counter() < end:
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_gains(models: list[nn.Module], x: Tensor, seconds: float, rounds: int,
                 dense_times: list[float]) -> list[float]:
    """Median over rounds of dense time / model time, for models[1:] (models[0]: dense);
    appends the dense times to `dense_times` (their spread shows other load on the machine)."""
    per_round = []
    for _ in range(rounds):
        t = [seconds_per_batch(m, x, seconds) for m in models]
        dense_times.append(t[0])
        per_round.append([t[0] / ti for ti in t[1:]])
    return [statistics.median(r[k] for r in per_round) for k in range(len(models) - 1)]


def synthetic_batches(arch: ViTArch, n: int, batch: int) -> list[tuple[Tensor, Tensor]]:
    """A learnable stand-in task: class templates plus noise (importance has a signal)."""
    g = torch.Generator().manual_seed(0)
    shape = (arch.in_chans, arch.img_size, arch.img_size)
    templates = torch.randn(arch.num_classes, *shape, generator=g)
    out = []
    for _ in range(n):
        y = torch.randint(0, arch.num_classes, (batch,), generator=g)
        out.append((templates[y] + torch.randn(batch, *shape, generator=g), y))
    return out


def search_in_process(name: str, dense: nn.Module, data: list[tuple[Tensor, Tensor]],
                      epochs: float, options: dict | None = None
                      ) -> tuple[nn.Module, ViTArch, str]:
    """One search at budget 0.5 without Ray, hooks in trainers/search.py's order; returns the
    subnet, its arch and a label naming the options that differ from the published ones.
    `options`: extra keys of the method's own section (e.g. width_multiple)."""
    spe = len(data)
    sections = {"ofb": {"ramp_epochs": 0.5}, "uvc": {"gate_warmup_epochs": 0.5}, "spvit": SPVIT}
    if options and (sec := get_method(name).section):
        sections[sec] = {**sections.get(sec, {}), **options}
    cfg = SearchConfig(method=name, budget=0.5, epochs=epochs, lr_warmup_epochs=0.5,
                       **sections)
    method = get_method(name)(cfg, spe, ViTArch.from_timm(dense))
    method.setup(torch.device("cpu"))
    model = method.wrap(copy.deepcopy(dense))
    cap = math.ceil(epochs * spe)
    if (needed := method.max_steps()) is not None:
        cap = min(cap, needed)
    opt = torch.optim.AdamW(method.param_groups(model), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(
        cap, int(cfg.lr_warmup_epochs * spe), cfg.lr, method.min_lr()))
    step = 0
    while step < cap and not method.finished(model):
        n = min(spe, cap - step)
        model = train_one_epoch(model, data, opt, sched, torch.device("cpu"),
                                label_smoothing=cfg.label_smoothing,
                                grad_clip=method.grad_clip(), method=method, max_steps=n,
                                step_offset=step).model
        step += n
    note = method.finalize(model, opt)
    sub, arch = method.extract(model)
    print(f"{name}: {step} steps" + (f"; {note}" if note else ""))
    extra = ",".join(f"{k.split('.')[-1]}={v}" for k, v in method.additions().items())
    return sub.eval(), arch, name + (f"[{extra}]" if extra else "")


def default_subnets(steps: int, epochs: float) -> tuple[nn.Module, list[Subnet]]:
    """The default dense ViT (trained `steps` steps) and one subnet per registered method."""
    torch.manual_seed(0)
    dense = build_vit("vit_tiny_patch16_224", **MODEL)
    data = synthetic_batches(ViTArch.from_timm(dense), steps, 32)
    opt = torch.optim.AdamW(dense.parameters(), lr=2e-3)
    train_one_epoch(dense, data, opt, None, torch.device("cpu"), grad_clip=1.0)
    out = []
    # each method as published, and with hardware-friendly widths where it has the option
    runs = [(name, None) for name in list_methods()] + [
        (name, {"width_multiple": 8}) for name in list_methods()
        if (o := get_method(name).Options) is not None and "width_multiple" in o.model_fields]
    for name, options in runs:
        t0 = time.perf_counter()
        try:
            sub, arch, label = search_in_process(name, dense, data, epochs, options)
        except Exception as e:  # report it, never fake a row
            print(f"{name}: no subnet ({type(e).__name__}: {e})")
            continue
        print(f"{'':4}searched in {time.perf_counter() - t0:.1f} s", flush=True)
        out.append((label, sub, arch))
    return dense.eval(), out


def report(dense: nn.Module, d_arch: ViTArch, subnets: list[Subnet], rounds: int,
           seconds: float) -> None:
    """Measure and print one row (and a widths line) per subnet."""
    d_macs = count_macs(d_arch)
    xs = {b: torch.randn(b, d_arch.in_chans, d_arch.img_size, d_arch.img_size) for b in BATCHES}
    print(f"\ndense {d_macs / 1e6:.2f} M MACs, {widths(d_arch)}; {torch.get_num_threads()} "
          f"threads; {rounds} paired rounds (dense, subnet, reference), {seconds:.2f} s each")
    print("ratio = throughput gain over dense / MACs reduction; ref = uniform ViT at the same "
          "MACs; sub/ref goal >= 0.95")
    w = max(len(s[0]) for s in subnets) if subnets else 10
    dense_times: dict[int, list[float]] = {b: [] for b in BATCHES}
    head = "".join(f" | b{b}: {'sub':>5} {'ref':>5} {'sub/ref':>7}" for b in BATCHES)
    print(f"{'subnet':{w}} {'MACs M':>6} {'red.':>5}{head}")
    for label, sub, arch in subnets:
        macs = count_macs(arch)
        embed = d_arch.embed_dim if arch.embed_dim >= d_arch.embed_dim else snap(
            arch.embed_dim, d_arch.embed_dim)
        ref_arch = uniform_reference(d_arch, macs, embed)
        ref = build_from_arch(ref_arch).eval()
        red_s, red_r = d_macs / macs, d_macs / count_macs(ref_arch)
        cols = ""
        for b in BATCHES:
            g_s, g_r = paired_gains([dense, sub, ref], xs[b], seconds, rounds,
                                    dense_times[b])
            r_s, r_r = g_s / red_s, g_r / red_r
            cols += f" | b{b}: {r_s:5.2f} {r_r:5.2f} {r_s / r_r:7.3f}"
        print(f"{label:{w}} {macs / 1e6:6.2f} {red_s:4.2f}x{cols}")
        print(f"{'':4}subnet    {widths(arch)}")
        r0, d0 = ref_arch.blocks[0], d_arch.blocks[0]
        print(f"{'':4}reference {widths(ref_arch)}  ({count_macs(ref_arch) / 1e6:.2f} M MACs; "
              f"heads {r0.num_heads / d0.num_heads:.2f}, MLP {r0.mlp_hidden / d0.mlp_hidden:.2f})",
              flush=True)
    for b, ts in dense_times.items():
        if len(ts) > 1:  # dense runs in every round: its spread is the noise floor
            busy = statistics.quantiles(ts, n=4)[2] > 1.5 * min(ts)  # beyond what medians absorb
            print(f"dense at batch {b}: median {statistics.median(ts) * 1e3:.2f} ms, range "
                  f"{min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f} ms over all rounds"
                  + (": other load on the machine, ratios unreliable; rerun (or --threads 1)"
                     if busy else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", type=Path, help="a finished sweep folder (its results.parquet)")
    p.add_argument("--budget", type=float, default=0.5, help="with --sweep: trials at budget")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.1, help="per timed measurement")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads (default: torch's; 1 is steadier on a loaded machine)")
    p.add_argument("--steps", type=int, default=60, help="without --sweep: steps per epoch")
    p.add_argument("--epochs", type=float, default=3, help="without --sweep: search epochs")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    if a.sweep:
        dense_dir, found = from_sweep(a.sweep, a.budget)
        dense, d_arch = load_subnet(dense_dir), read_arch(dense_dir)
        subnets = [(label, load_subnet(f), read_arch(f)) for label, f in found]
        print(f"{a.sweep}: {len(subnets)} subnets at budget {a.budget}, dense {dense_dir}")
    else:
        dense, subnets = default_subnets(a.steps, a.epochs)
        d_arch = ViTArch.from_timm(dense)
    report(dense, d_arch, subnets, a.rounds, a.seconds)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
