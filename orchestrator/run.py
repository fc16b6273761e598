"""`python -m orchestrator.run [--config FILE] [--address ADDR] [key=value ...]`

Loads and validates the config (every error before Ray starts), starts Ray embedded or joins a
cluster, runs the dense pretrain (cached by hash) and prints the result. Outputs go under
`<output_dir>/<name>/`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from orchestrator.config import Config, ConfigError, load_config


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m orchestrator.run",
        description="Run the orchestrator: dense pretrain (cached) on the configured data.",
        epilog="Overrides use dotted keys, e.g. pretrain.epochs=1 scaling.num_workers=2",
    )
    p.add_argument("--config", help="YAML config file (default: the built-in default)")
    p.add_argument("--address", help="Ray cluster address ('auto', 'ray://host:10001'); "
                                     "default: RAY_ADDRESS, else Ray starts embedded")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config, print it resolved, and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def preflight(cfg: Config) -> None:
    """Checks that need no Ray: the model builds (on the meta device), the data is there."""
    from search_space.arch import ViTArch
    from search_space.cost import cost_of
    from trainers.data import build_splits
    from trainers.model_factory import build_dense

    model = build_dense(cfg, device="meta", pretrained=False)
    if cfg.model.pretrained_file and not Path(cfg.model.pretrained_file).expanduser().is_file():
        raise ConfigError(f"model.pretrained_file={cfg.model.pretrained_file!r} does not exist")
    c = cost_of(ViTArch.from_timm(model))
    print(f"[run] model {cfg.model.name}: {c.gmacs * 1e3:.1f} M MACs/image, "
          f"{c.mparams:.2f} M params", flush=True)
    splits = build_splits(cfg.data, cfg.seed)
    val = len(splits.val) if splits.val is not None else 0
    print(f"[run] data {cfg.data.dataset}: {len(splits.train)} train / {val} val / "
          f"{len(splits.test)} test images", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.address:
            cfg.ray.address = args.address
        preflight(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = cfg.run_dir
    if args.dry_run:
        print(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))

    from orchestrator.pretrain import run_pretrain
    from orchestrator.ray_setup import start_ray

    resources = start_ray(cfg.ray.address, cfg.ray.health_check_interval_s)
    print(f"[run] Ray resources: {resources.get('CPU', 0):g} CPU, "
          f"{resources.get('GPU', 0):g} GPU; outputs in {run_dir}", flush=True)
    res = run_pretrain(cfg)
    summary = {"pretrain": res.summary()}
    (run_dir / "result.json").write_text(json.dumps(summary, indent=2))
    m, c = res.metrics, res.cost
    print("\n== dense pretrain ==")
    print(f"  model        {cfg.model.name} ({'cached' if res.cached else 'trained now'})")
    for k in ("val_top1", "test_top1"):
        if k in m:
            print(f"  {k:<12} {100 * m[k]:.2f}%")
    print(f"  epochs       {m['epoch']}")
    print(f"  cost         {c.device_hours:.4f} {c.device_kind}-hours "
          f"({c.devices:g} x {c.worker_seconds:.0f} s)")
    print(f"  weights      {res.path / 'model.safetensors'}")
    print(f"  summary      {run_dir / 'result.json'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
