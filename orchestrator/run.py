"""`python -m orchestrator.run [--config FILE] [--address ADDR] [key=value ...]`

Loads and validates the config (every error before Ray starts), starts Ray embedded or joins a
cluster, runs the phases of `pipeline` (dense pretrain, cached by hash; then search, subnet
export, fine-tune, evaluation) and prints the result. Outputs go under `<output_dir>/<name>/`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from orchestrator.config import Config, ConfigError, load_config


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.run",
        description="Run the orchestrator: dense pretrain (cached) -> search -> subnet -> "
                    "fine-tune -> evaluation, on Ray Train workers.",
        epilog="Overrides use dotted keys, e.g. pretrain.epochs=1 scaling.num_workers=2",
    )
    p.add_argument("--config", help="YAML config file (default: the built-in default)")
    p.add_argument("--address", help="Ray cluster address ('auto', 'ray://host:10001'); "
                                     "default: RAY_ADDRESS, else Ray starts embedded")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config, print it resolved, and exit")
    p.add_argument("--schedule", help="run as one slot of this schedule (the config's "
                   "`schedule` section): named <schedule>-<slot>, claimed in its ledger first")
    p.add_argument("--slot", help="with --schedule: YYYYMMDDTHHMMZ, or auto (the Ray job's "
                   "metadata, a KubeRay child's minute, else the tick due now)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def check_machine_fits(cfg: Config, cpus: float | None = None, gpus: int | None = None) -> None:
    """Ray embedded on this machine never grows: a trial that needs more CPUs or GPUs than it has
    would wait forever for its workers, so refuse it before Ray starts. (A cluster address is
    not checked here: an autoscaling cluster adds nodes for waiting workers.)"""
    from orchestrator.ray_setup import resolve_address

    if resolve_address(cfg.ray.address) is not None:
        return
    s = cfg.scaling
    cpus = float(len(os.sched_getaffinity(0))) if cpus is None else cpus
    need_cpu = s.num_workers * s.cpus_per_worker
    if need_cpu > cpus:
        raise ConfigError(
            f"scaling.num_workers={s.num_workers} x scaling.cpus_per_worker="
            f"{s.cpus_per_worker:g} needs {need_cpu:g} CPUs; this machine has {cpus:g} (Ray "
            "runs embedded: pass --address to use a cluster)")
    if s.use_gpu:
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        need = s.num_workers * s.gpus_per_worker
        if need > gpus:
            raise ConfigError(
                f"scaling.use_gpu=true with scaling.num_workers={s.num_workers} x "
                f"scaling.gpus_per_worker={s.gpus_per_worker:g} needs {need:g} GPUs; this "
                f"machine has {gpus} visible to torch (Ray runs embedded: pass --address to use "
                "a cluster, or set scaling.use_gpu=false)")


def preflight(cfg: Config) -> None:
    """Checks that need no Ray: the trial fits this machine (embedded Ray), the model builds (on
    the meta device), the data is there, and one real training image has the model's input
    shape (else every worker would fail)."""
    from search_space.arch import ViTArch
    from search_space.cost import cost_of
    from trainers.data import build_splits, check_fits
    from trainers.model_factory import build_dense

    check_machine_fits(cfg)
    model = build_dense(cfg, device="meta", pretrained=False)
    if cfg.model.pretrained_file:  # loaded once here: a bad file is named before Ray starts
        if not Path(cfg.model.pretrained_file).expanduser().is_file():
            raise ConfigError(f"model.pretrained_file={cfg.model.pretrained_file!r} does not "
                              "exist")
        build_dense(cfg, device="cpu", pretrained=True)
    arch = ViTArch.from_timm(model)
    c = cost_of(arch)
    print(f"[run] model {cfg.model.name}: {c.gmacs * 1e3:.1f} M MACs/image, "
          f"{c.mparams:.2f} M params", flush=True)
    # built as the workers build it, then compared with the model they build
    splits = build_splits(cfg.data, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans)
    if cfg.data.dataset == "imagefolder":
        from trainers.image_files import verify_image_folder

        t0 = time.perf_counter()
        n = verify_image_folder(cfg.data.root)
        print(f"[run] data {cfg.data.root}: {n} image headers read in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    check_fits(splits, arch.in_chans, arch.img_size, arch.num_classes)
    val = len(splits.val) if splits.val is not None else 0
    print(f"[run] data {cfg.data.dataset}: {len(splits.train)} train / {val} val / "
          f"{len(splits.test)} test images of {arch.in_chans}x{arch.img_size}x{arch.img_size}",
          flush=True)
    if cfg.pipeline == "search" and cfg.search.budget_metric == "latency":
        resolve_latency_table(cfg, arch)
    if cfg.pipeline == "search":
        from orchestrator.budget_check import check_budgets

        check_budgets(cfg, arch)
    if cfg.pipeline == "search":
        from orchestrator.tracking import check_store

        check_store(cfg)
        if cfg.mlflow.enabled:
            print(f"[run] MLflow store {cfg.tracking_uri}", flush=True)


def resolve_latency_table(cfg: Config, arch) -> None:
    """Find the latency table a latency budget needs (the given file, or the cached one of this
    model measured with the workers' thread count on this machine) and put its path in the
    config the workers get; a missing or mismatched table is refused here, before Ray."""
    import torch

    from search_space.latency import LatencyTable, table_path

    given = cfg.search.latency_table
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise ConfigError(f"search.latency_table={given!r} does not exist")
    elif cfg.scaling.use_gpu:
        raise ConfigError("search.budget_metric='latency' with scaling.use_gpu=true needs "
                          "search.latency_table: measure it on a GPU node (python -m "
                          "search_space.latency ...) and give the file")
    else:
        threads, before = max(1, int(cfg.scaling.cpus_per_worker)), torch.get_num_threads()
        torch.set_num_threads(threads)  # the workers' threads: part of the table's key
        try:
            path = table_path(cfg.model.name, arch, 64, torch.device("cpu"))
        finally:
            torch.set_num_threads(before)
        if not path.is_file():
            b = arch.blocks[0]
            flags = (f"--img-size {arch.img_size} --patch-size {arch.patch_size} --in-chans "
                     f"{arch.in_chans} --num-classes {arch.num_classes} --embed-dim "
                     f"{arch.embed_dim} --depth {len(arch.blocks)} --num-heads {b.num_heads} "
                     f"--mlp-ratio {b.mlp_hidden / arch.embed_dim:g} --threads {threads}")
            raise ConfigError(
                f"search.budget_metric='latency': no latency table of model {cfg.model.name!r} "
                f"for {threads} thread(s) on this machine ({path}); measure it first: python -m "
                f"search_space.latency {cfg.model.name} {flags}")
    try:
        table = LatencyTable.load(path)
        print(f"[run] latency budget: {cfg.search.budget:g} x {table.of_arch(arch):.3f} ms per "
              f"batch of {table.batch} (table {path})", flush=True)
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"search.latency_table {str(path)!r} does not fit this model: {e}"
                          ) from None
    cfg.search.latency_table = str(path)


def main(argv: list[str] | None = None) -> int:
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started with SIGINT ignored (a background launcher, a Ray head started so): Ray's
        # graceful stop signal would then never reach us, and the sweep could not checkpoint
        signal.signal(signal.SIGINT, signal.default_int_handler)
    args = _parse(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.address:
            cfg.ray.address = args.address
        slot = None
        if args.schedule:
            from orchestrator.schedules import driver

            slot = driver.resolve_slot(cfg, args.slot, datetime.now(timezone.utc))
            driver.apply(cfg, args.schedule, slot)
        elif args.slot:
            raise ConfigError("--slot needs --schedule NAME")
        preflight(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from orchestrator.schedules.jobs import git_state

        commit, dirty = git_state()
        print(f"[run] code {Path(__file__).resolve().parents[1]} (commit {commit}"
              f"{', uncommitted changes' if dirty else ''})", flush=True)
        print(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        return 0
    if slot is None:
        return _run(cfg)
    go, why = driver.enter(cfg, args.schedule, slot, datetime.now(timezone.utc))
    print(f"[run] schedule {args.schedule}: {why}", flush=True)
    if not go:
        return 0
    try:
        code = _run(cfg)
    except KeyboardInterrupt:  # Ray's stop signal (SIGINT): checkpoints stay, a retry resumes
        driver.finish(cfg, args.schedule, slot, "STOPPED", 130)
        raise
    except BaseException:
        driver.finish(cfg, args.schedule, slot, "FAILED", 1)
        raise
    driver.finish(cfg, args.schedule, slot, "SUCCEEDED" if code == 0 else "FAILED", code)
    return code


def _run(cfg: Config) -> int:
    """Every phase of `pipeline`, on Ray; the process exit code. A sweep holds its folder from
    the start, so a second sweep there is refused before it writes anything."""
    if cfg.sweep is None:
        return _run_phases(cfg)
    from orchestrator.sweep import sweep_lock

    with sweep_lock(cfg.run_dir):
        return _run_phases(cfg)


def _run_phases(cfg: Config) -> int:
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))

    from orchestrator.phases import run_pretrain, trial_result
    from orchestrator.ray_setup import dashboard_url, start_ray
    from orchestrator.trial_run import run_trial

    resources = start_ray(cfg.ray.address, cfg.ray.health_check_interval_s)
    board = f", dashboard {url}" if (url := dashboard_url()) else ""
    print(f"[run] Ray resources: {resources.get('CPU', 0):g} CPU, "
          f"{resources.get('GPU', 0):g} GPU{board}; outputs in {run_dir}", flush=True)
    dense = run_pretrain(cfg)
    summary: dict = {"pretrain": dense.summary()}
    if cfg.sweep is not None:
        return _sweep(cfg, dense, resources, summary)
    if cfg.pipeline == "search":
        t0 = time.perf_counter()
        search, tuned = run_trial(cfg, dense)
        if cfg.mlflow.enabled:
            from orchestrator.tracking import track_single

            summary["mlflow_run_id"] = track_single(
                cfg, dense, trial_result(cfg, search, tuned, time.perf_counter() - t0))
        summary["search"] = {"subnet": str(search.subnet), "final": search.final,
                             "cost": search.cost.summary()}
        summary["finetune"] = {"path": str(tuned.path), "metrics": tuned.metrics,
                               "cost": tuned.cost.summary()}
    (run_dir / "result.json").write_text(json.dumps(summary, indent=2))
    print_summary(cfg, summary)
    print(f"  summary      {run_dir / 'result.json'}")
    return 0


def _sweep(cfg: Config, dense, resources: dict, summary: dict) -> int:
    from orchestrator.records import as_record, format_hours
    from orchestrator.report import pareto_front
    from orchestrator.sweep import format_table, run_sweep

    rows = run_sweep(cfg, dense, resources)
    front = pareto_front(rows, cfg.sweep.objectives)
    summary["sweep"] = {"trials": rows, "pareto_front": front}
    (cfg.run_dir / "result.json").write_text(json.dumps(summary, indent=2))
    keys = ["trial_id", *cfg.sweep.space, "top1", "top1_before_finetune", "macs", "params",
            "search cost"]

    def shown(rs: list[dict]) -> list[dict]:  # the search's device-hours with their unit
        return [{**r, "search cost": format_hours(as_record(r).phase_hours()["search"])}
                for r in rs]

    print(f"\n== sweep {cfg.name}: {len(rows)} finished trial(s) ==")
    print(format_table(shown(sorted(rows, key=lambda r: r.get("macs", 0))), keys))
    print(f"\n== Pareto front ({', '.join(f'{o.mode} {o.metric}' for o in cfg.sweep.objectives)})"
          " ==")
    print(format_table(shown(front), keys))
    print(f"\n  dense        {_pct(dense.metrics.get('test_top1'))} top-1 (test), "
          f"{format_hours(dense.cost.hours())}, shared by every trial")
    print(f"  summary      {cfg.run_dir / 'result.json'}")
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def print_summary(cfg: Config, s: dict) -> None:
    from orchestrator.records import add_hours, format_hours, unit

    d = s["pretrain"]
    m, c = d["metrics"], d["cost"]
    print("\n== dense model ==")
    print(f"  model        {cfg.model.name} ({'cached' if d['cached'] else 'trained now'}), "
          f"{m['epoch']} epoch(s)")
    print(f"  top-1        val {_pct(m.get('val_top1'))}  test {_pct(m.get('test_top1'))}")
    print(f"  cost         {c['device_hours']:.4f} {unit(c['device_kind'])} "
          f"({c['devices']:g} x {c['worker_seconds']:.0f} s)")
    print(f"  weights      {Path(d['path']) / 'model.safetensors'}")
    if "search" not in s:
        return
    f, ft = s["search"]["final"], s["finetune"]["metrics"]
    print(f"\n== {cfg.search.method} subnet ==")
    print(f"  MACs         {f['macs'] / 1e6:.2f} M ({f['macs'] / f['dense_macs']:.1%} of dense "
          f"{f['dense_macs'] / 1e6:.2f} M)")
    print(f"  params       {f['params'] / 1e6:.3f} M")
    print(f"  top-1        before fine-tune {_pct(f.get('test_top1_before_finetune'))}, "
          f"after {_pct(ft.get('test_top1'))} (test)")
    costs = {phase: c if phase == "pretrain" else s[phase]["cost"]
             for phase in ("pretrain", "search", "finetune")}
    for phase, pc in costs.items():
        shared = " (cached: shared by every search)" if phase == "pretrain" else ""
        print(f"  {phase:<12} {pc['device_hours']:.4f} {unit(pc['device_kind'])}{shared}")
    total = add_hours(*({pc["device_kind"]: pc["device_hours"]} for pc in costs.values()))
    print(f"  total        {format_hours(total)} (per unit, never added across units; worker "
          "loops only: a lower bound)")
    if f.get("note"):
        print(f"  note         {f['note']}")
    print(f"  exported     {s['search']['subnet']} (arch.json + model.safetensors)")
    if s.get("mlflow_run_id"):
        print(f"  MLflow run   {s['mlflow_run_id']} ({cfg.tracking_uri})")
    print(f"  fine-tuned   {Path(s['finetune']['path'])}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
