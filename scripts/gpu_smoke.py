"""The first thing to run on a new GPU machine or cluster node (1 or 2 GPUs): does every GPU
path of ours work here? `scripts/gpu_smoke.sh` calls it; `--cpu` runs the same checks on the
CPU (CI does, so the script itself cannot rot).

Checks, in order, each printed as one `[smoke]` line, a summary table at the end:
1. the device: torch / CUDA build, driver, GPU name, compute capability, native bf16;
2. host syncs per search step on the default model: on a GPU counted by CUDA itself
   (`torch.cuda.set_sync_debug_mode`), on the CPU by the stand-in device (tests/device_strict.py);
3. dense training throughput (img/s) on one device, fp32 and bf16;
4. a tiny OFB search on Ray Train workers with fp32 and with bf16 (dense pretrain, search,
   fine-tune);
5. every registered method once (search and extraction);
6. a Ray Train worker killed (SIGKILL) mid-search: the search resumes from its checkpoint.

Exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=128,
                     depth=4, num_heads=4)
RESULTS: list[tuple[str, str, str]] = []


def check(name: str, fn: Callable[[], str]) -> None:
    t0 = time.perf_counter()
    try:
        detail = fn()
        RESULTS.append((name, "ok", detail))
        print(f"[smoke] {name}: ok ({time.perf_counter() - t0:.0f} s) {detail}", flush=True)
    except Exception as e:  # noqa: BLE001 - every check is reported, the run goes on
        traceback.print_exc()
        RESULTS.append((name, "FAILED", f"{type(e).__name__}: {e}"[:200]))
        print(f"[smoke] {name}: FAILED {type(e).__name__}: {e}", flush=True)


def device_info(gpu: bool) -> str:
    from trainers.loop import native_bf16

    if not gpu:
        return f"torch {torch.__version__}, CPU mode ({torch.get_num_threads()} threads)"
    if not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: "
                           "check the NVIDIA driver (nvidia-smi) against the CUDA build")
    cap = torch.cuda.get_device_capability(0)
    drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.split("\n")[0].strip()
    return (f"torch {torch.__version__} CUDA {torch.version.cuda}, driver {drv or '?'}, "
            f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, capability "
            f"{cap[0]}.{cap[1]}, native bf16 {'yes' if native_bf16(cap) else 'no (fp32 on auto)'}")


def _ofb_setup(device: torch.device, steps: int):
    from search_space.arch import ViTArch
    from search_space.models import build_vit
    from trainers.config import SearchConfig
    from trainers.methods import get_method

    torch.manual_seed(0)
    dense = build_vit("vit_tiny_patch16_224", **DEFAULT_MODEL)
    cfg = SearchConfig(lr_warmup_epochs=0, ofb={"ramp_epochs": 0.2})
    method = get_method("ofb")(cfg, steps, ViTArch.from_timm(dense))
    method.setup(device)
    model = method.wrap(dense).to(device)
    return method, model, torch.optim.AdamW(method.param_groups(model), lr=1e-3)


def syncs(gpu: bool) -> str:
    from trainers.loop import train_one_epoch

    steps, batch = 30, 64
    x = [(torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))) for _ in range(steps)]
    if gpu:
        dev = torch.device("cuda")
        x = [(a.pin_memory(), b.pin_memory()) for a, b in x]
        method, model, opt = _ofb_setup(dev, steps)
        train_one_epoch(model, x[:3], opt, None, dev, method=method)  # warm-up: lazy inits
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train_one_epoch(model, x, opt, None, dev, method=method, step_offset=3)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        n = sum("synchroniz" in str(w.message) for w in caught)
    else:  # the stand-in device, counted as `make bench`'s bench/syncs.py counts
        from bench.syncs import per_step

        n = sum(per_step("ofb", DEFAULT_MODEL, x, steps))
    per = n / steps
    if per > 5:
        raise AssertionError(f"{per:.2f} syncs per OFB search step (goal <= 5)")
    return f"{per:.2f} host syncs per OFB search step over {steps} steps (goal <= 5)"


def throughput(gpu: bool) -> str:
    import torch.nn.functional as F

    from search_space.models import build_vit

    dev = torch.device("cuda" if gpu else "cpu")
    out = []
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        m = build_vit("vit_tiny_patch16_224", **DEFAULT_MODEL).to(dev)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        x = torch.randn(256 if gpu else 64, 1, 28, 28, device=dev)
        y = torch.randint(0, 10, (x.shape[0],), device=dev)
        reps = 20 if gpu else 5
        for i in range(reps + 3):
            if i == 3:
                if gpu:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast(dev.type, torch.bfloat16, enabled=precision == "bf16"):
                loss = F.cross_entropy(m(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if gpu:
            torch.cuda.synchronize()
        out.append(f"{precision} {reps * x.shape[0] / (time.perf_counter() - t0):.0f} img/s")
    return "dense training, default model: " + ", ".join(out)


def _overrides(tmp: Path, gpu: bool, workers: int, **extra: object) -> list[str]:
    base = {"output_dir": str(tmp / "runs"), "name": "gpu_smoke", "mlflow.enabled": False,
            "sweep": None, "data.max_train_samples": 1024, "data.max_eval_samples": 256,
            "data.batch_size": 64, "model.embed_dim": 64, "model.depth": 2,
            "model.num_heads": 2, "pretrain.epochs": 1, "pretrain.warmup_epochs": 0.2,
            "search.epochs": 2, "search.lr_warmup_epochs": 0.2, "search.ofb.ramp_epochs": 0.3,
            "search.ofb.eliminations_per_epoch": 4, "search.ofb.alpha_lr": 0.05,
            "finetune.epochs": 1, "scaling.num_workers": workers,
            "scaling.use_gpu": gpu, "scaling.cpus_per_worker": 1, "scaling.max_failures": 2}
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def search_run(tmp: Path, gpu: bool, workers: int, precision: str) -> str:
    from orchestrator.config import load_config
    from orchestrator.phases import run_finetune, run_pretrain, run_search

    cfg = load_config(None, _overrides(tmp, gpu, workers, **{
        "scaling.precision": precision, "name": f"smoke_{precision}"}))
    dense = run_pretrain(cfg)
    res = run_search(cfg, dense)
    tuned = run_finetune(cfg, res.subnet)
    f = res.final
    return (f"{precision}: subnet {f['macs'] / f['dense_macs']:.0%} of dense MACs, top-1 "
            f"{tuned.metrics['test_top1']:.3f} after fine-tune, search "
            f"{res.cost.device_hours * 3600:.0f} device-s")


def every_method(tmp: Path, gpu: bool, workers: int) -> str:
    from orchestrator.config import load_config
    from orchestrator.phases import run_pretrain, run_search
    from trainers.methods import list_methods

    done = []
    for name in list_methods():
        cfg = load_config(None, _overrides(tmp, gpu, workers, **{
            "search.method": name, "search.epochs": 1, "name": f"smoke_{name}"}))
        res = run_search(cfg, run_pretrain(cfg))
        done.append(f"{name} {res.final['macs'] / res.final['dense_macs']:.0%}")
    return "subnets at " + ", ".join(done) + " of dense MACs"


def killed_worker(tmp: Path, gpu: bool, workers: int) -> str:
    from orchestrator.config import load_config
    from orchestrator.phases import run_pretrain, run_search
    from tests.orchestrator.faults import run_and_kill_after_checkpoint

    cfg = load_config(None, _overrides(tmp, gpu, workers, **{
        "search.epochs": 4, "name": "smoke_kill"}))
    dense = run_pretrain(cfg)
    run_dir = cfg.run_dir / "ray" / f"search-{cfg.search_key()}"
    print("[smoke] one Train worker is SIGKILLed after the first checkpoint: Ray then prints "
          "the dead worker's and its peer's tracebacks (expected); the search must resume",
          flush=True)
    res = run_and_kill_after_checkpoint(lambda: run_search(cfg, dense), run_dir)
    if res.final["resumed_from_epoch"] < 1:
        raise AssertionError("the search restarted from scratch, not from its checkpoint")
    return f"killed one worker after a checkpoint; resumed after epoch " \
           f"{res.final['resumed_from_epoch']}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="CPU mode (what CI runs)")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray Train workers per run (default: the GPUs here, at most 2; 2 on CPU)")
    a = p.parse_args()
    gpu = not a.cpu
    check("device", lambda: device_info(gpu))
    if gpu and RESULTS[-1][1] != "ok":
        return 1
    workers = a.workers or (min(2, torch.cuda.device_count()) if gpu else 2)
    check("syncs", lambda: syncs(gpu))
    check("throughput", lambda: throughput(gpu))

    from orchestrator.ray_setup import start_ray

    res = start_ray(None)
    print(f"[smoke] Ray: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU; "
          f"{workers} worker(s) per run", flush=True)
    with tempfile.TemporaryDirectory(prefix="ofb-smoke-") as d:
        tmp = Path(d)
        for precision in ("fp32", "bf16"):
            check(f"search {precision}", lambda p=precision: search_run(tmp, gpu, workers, p))
        check("every method", lambda: every_method(tmp, gpu, workers))
        check("killed worker", lambda: killed_worker(tmp, gpu, workers))
    print("\n== GPU smoke (" + ("GPU" if gpu else "CPU mode") + ") ==")
    for name, status, detail in RESULTS:
        print(f"  {name:<14} {status:<7} {detail}")
    return 0 if all(s == "ok" for _, s, _ in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
