"""Search-step benchmarks, measured in one run on this machine (not tests):

(a) search step time / dense training step time, same model and batch (goal <= 1.15), and
    PMIM's target as a share of the dense step (goal < 5%);
(b) subnet inference throughput gain / MACs reduction at batch 64 (goal >= 0.95).

    python bench/search_overhead.py [--subnet runs/<name>/search/subnet] [--steps 30]
    python bench/search_overhead.py --embed-dim 192 --depth 6 --num-heads 6 --img-size 32 \
        --patch-size 4      # a larger ViT (65 tokens), where fixed per-op costs matter less

Without --subnet, (b) uses a subnet from a synthetic finished search (argmax of random alpha).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from search_space.arch import ViTArch
from search_space.cost import count_macs
from search_space.models import build_vit
from search_space.ofb.extract import extract_subnet
from search_space.ofb.pmim import local_normalize, window_size
from search_space.subnet import load_subnet
from trainers.config import SearchConfig
from trainers.methods import get_method

MODEL = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=128, depth=4,
             num_heads=4)  # the built-in default


def dense_model():
    torch.manual_seed(0)
    return build_vit("vit_tiny_patch16_224", **MODEL)


def uniform_half(arch: ViTArch) -> ViTArch:
    """Reference: every block at half its heads and half its MLP (a 'nice' 2x reduction)."""
    from search_space.arch import BlockArch

    blocks = tuple(BlockArch(max(b.num_heads // 2, 1), b.head_dim, b.mlp_hidden // 2)
                   for b in arch.blocks)
    return ViTArch(**{**arch.to_dict(), "blocks": blocks})


def step_time(model, step_fn, x, y, steps: int) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for i in range(steps + 5):
        if i == 5:
            t0 = time.perf_counter()
        loss = step_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def throughput(model, x, reps: int) -> float:
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            model(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x)
    return reps * x.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--subnet", help="an exported subnet folder (default: a synthetic one)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width-multiple", type=int, default=1, help="search.ofb.width_multiple")
    p.add_argument("--embed-dim", type=int, default=MODEL["embed_dim"])
    p.add_argument("--depth", type=int, default=MODEL["depth"])
    p.add_argument("--num-heads", type=int, default=MODEL["num_heads"])
    p.add_argument("--img-size", type=int, default=MODEL["img_size"])
    p.add_argument("--patch-size", type=int, default=MODEL["patch_size"])
    a = p.parse_args()
    MODEL.update(embed_dim=a.embed_dim, depth=a.depth, num_heads=a.num_heads,
                 img_size=a.img_size, patch_size=a.patch_size)
    s = a.img_size
    x, y = torch.randn(a.batch, 1, s, s), torch.randint(0, 10, (a.batch,))

    dense = dense_model()
    t_dense = step_time(dense, lambda m, x, y: F.cross_entropy(m(x), y), x, y, a.steps)
    cfg = SearchConfig(lr_warmup_epochs=0,
                       ofb={"ramp_epochs": 0, "width_multiple": a.width_multiple})
    method = get_method("ofb")(cfg, 100, ViTArch.from_timm(dense))
    sn = method.wrap(dense_model())

    def search_step(m, x, y):
        logits, aux = method.forward(m, x, 10**6)  # after warm-up: full PMIM ratio
        return sum(method.losses(m, x, y, logits, aux, 10**6).values())

    t_search = step_time(sn, search_step, x, y, a.steps)
    print(f"(a) {s}x{s} pixels: dense step {t_dense * 1e3:.1f} ms, OFB search step "
          f"{t_search * 1e3:.1f} ms (batch {a.batch}): ratio {t_search / t_dense:.3f} "
          "(goal <= 1.15)")
    k = window_size(s)
    local_normalize(x, k)
    t0 = time.perf_counter()
    for _ in range(10):
        local_normalize(x, k)
    t_target = (time.perf_counter() - t0) / 10
    print(f"    PMIM target ({k}x{k} local normalisation): {t_target * 1e3:.2f} ms = "
          f"{t_target / t_dense:.1%} of the dense step (goal < 5%)")

    if a.subnet:
        sub = load_subnet(a.subnet)
        arch = ViTArch.from_timm(sub)
    else:
        g = torch.Generator().manual_seed(0)
        for m in sn.searchable():
            with torch.no_grad():
                m.alpha.add_(torch.randn(m.alpha.shape, generator=g) * 3)
            m.finish()
        sub, arch = extract_subnet(sn)
    dense_arch = ViTArch.from_timm(dense)
    xb = torch.randn(64, 1, s, s)
    reps = max(a.steps, 20)
    thr_d, thr_s = throughput(dense, xb, reps), throughput(sub, xb, reps)
    mac_red = count_macs(dense_arch) / count_macs(arch)
    gain = thr_s / thr_d
    print(f"(b) subnet {count_macs(arch) / 1e6:.2f} M MACs vs dense "
          f"{count_macs(dense_arch) / 1e6:.2f} M: MACs reduction {mac_red:.2f}x, throughput "
          f"{thr_d:.0f} -> {thr_s:.0f} img/s = {gain:.2f}x; gain / reduction "
          f"{gain / mac_red:.3f} (goal >= 0.95)")
    print("    subnet blocks (heads, head dim, MLP):",
          [(b.num_heads, b.head_dim, b.mlp_hidden) for b in arch.blocks], "embed", arch.embed_dim)
    from search_space.subnet import build_from_arch

    ref = uniform_half(dense_arch)
    thr_r = throughput(build_from_arch(ref), xb, reps)
    red_r = count_macs(dense_arch) / count_macs(ref)
    print(f"    reference, uniformly halved heads and MLP: MACs reduction {red_r:.2f}x, "
          f"throughput {thr_r / thr_d:.2f}x; gain / reduction {thr_r / thr_d / red_r:.3f}")


if __name__ == "__main__":
    main()
