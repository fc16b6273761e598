"""`python -m orchestrator.report <sweep folder | MLflow experiment>`: compare searched subnets.

Prints, per method and MACs budget (and variant: trials that used our additions group apart),
top-1 (mean +/- sd and best over trials, i.e. seeds, and the mean right after extraction),
MACs, params, search cost and total cost in device-hours (the `dense_control` row: the dense
model fine-tuned the same way, not pruned);
then the cost comparison: every method's search cost against the dense model's training cost
and, at equal budget, OFB's search cost over each two-stage method's. Writes
`report/{table.txt,comparison.json,pareto.png}` (top-1 vs MACs, one series per method, marker
area ~ search cost) and logs them to the sweep's MLflow parent run. A sweep folder is read from
its results.parquet + dense.json; an experiment from its latest sweep run in MLflow.

Device-hours come in two units, GPU-hours and CPU-core-hours, and are only ever added to their
own kind: a dense model trained on the CPU and searched on GPUs gives a total in GPU-hours plus
one in CPU-core-hours (columns and metrics `..._gpu_hours`, `..._cpu_core_hours`), and a ratio
only between costs of one unit. They are a lower bound: only the worker loops are timed, not
Ray's start-up, scheduling, data preparation outside the loop or checkpoint upload.

Total cost of a trial = its share of the dense pretrain (pretrain hours / trials in the sweep)
+ search + fine-tune, per unit. The ratio "OFB vs X" is mean OFB search hours / mean X search
hours at the same budget: < 1 means OFB searched for less.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from orchestrator.records import (
    Hours,
    TrialRecord,
    add_hours,
    as_record,
    best_of,
    format_hours,
    group_label,
    hours_name,
    kinds_in,
    metric_name,
    unit,
    variant,
)
from orchestrator.report_sources import Dense, from_folder, from_mlflow, parent_of_folder
from orchestrator.schedules import slot_report

Rows = Iterable[TrialRecord | Mapping[str, Any]]  # records, or flat rows (results.parquet's)

REFERENCE = "ofb"  # the one-stage method every other method is compared with
CONTROL = "dense_control"  # the dense model fine-tuned like the subnets, not pruned


@dataclass
class Report:
    groups: list[dict[str, Any]]
    comparison: list[dict[str, Any]]
    metrics: dict[str, float] = field(default_factory=dict)
    text: str = ""


def pareto_front(rows: list, objectives: list[Any]) -> list:
    """Rows not dominated by any other row under the sweep's objectives. A feasible row
    dominates every infeasible one (sweep.max_macs), whatever their top-1."""
    recs = [as_record(r) for r in rows]

    def dominates(a: TrialRecord, b: TrialRecord) -> bool:
        if a.feasible != b.feasible:
            return a.feasible
        pairs = [(getattr(a, o.metric), getattr(b, o.metric), o.mode) for o in objectives]
        return all(x >= y if mode == "max" else x <= y for x, y, mode in pairs) and any(
            x != y for x, y, _ in pairs)

    front = [(row, r) for row, r in zip(rows, recs, strict=True)
             if not any(dominates(o, r) for o in recs if o is not r)]
    return [row for row, r in sorted(front, key=lambda f: f[1].macs or 0)]


TOP1_VS_MACS = [SimpleNamespace(metric="top1", mode="max"),
                SimpleNamespace(metric="macs", mode="min")]


def _mean_hours(hours: list[Hours]) -> Hours:
    """The mean per trial, per unit (a trial without a unit counts 0 of it)."""
    return {k: v / len(hours) for k, v in add_hours(*hours).items()}


def _flat(prefix: str, h: Hours) -> dict[str, float]:
    """{"gpu": 0.2} -> {"<prefix>_gpu_hours": 0.2}: names that carry the unit."""
    return {f"{prefix}_{hours_name(k)}": v for k, v in h.items()}


def group_hours(g: Mapping[str, Any], prefix: str) -> Hours:
    """A group's `<prefix>_<kind>_hours` values back as {kind: hours}."""
    tail = "_hours"
    return {k[len(prefix) + 1:-len(tail)]: v for k, v in g.items()
            if k.startswith(f"{prefix}_") and k.endswith(tail)}


def _one_unit(a: Hours, b: Hours) -> bool:
    return len(a) == 1 and a.keys() == b.keys()


def _ratio(a: Hours, b: Hours) -> float | None:
    """a / b when both are in one and the same unit and b > 0; else None (no ratio across
    units)."""
    if not _one_unit(a, b):
        return None
    (k,) = a
    return a[k] / b[k] if b[k] else None


def build(rows: Rows, dense: Dense) -> Report:
    """Group trials by (method, budget) and compute the cost comparison. Top-1 is as measured;
    the best of a group is its best feasible trial (sweep.max_macs), if it has one. Costs are
    kept per unit (GPU-hours, CPU-core-hours): nothing sums or divides across units."""
    recs = [r for r in map(as_record, rows) if r.top1 is not None and r.dense_macs]
    share = {dense.device_kind: dense.device_hours / max(len(recs), 1)} \
        if dense.device_hours else {}
    groups: dict[tuple[str, str, str], list[TrialRecord]] = {}
    for r in recs:
        groups.setdefault((r.method, r.budget, variant(r.additions)), []).append(r)
    variants: dict[str, set[str]] = {}
    for method, _, v in groups:
        variants.setdefault(method, set()).add(v)
    out = []
    for (method, budget, v), rs in sorted(groups.items(),
                                          key=lambda kv: (kv[0][0], kv[0][2], -_pct(kv[0]))):
        top1 = [r.top1 for r in rs]
        before = [r.top1_before_finetune for r in rs if r.top1_before_finetune is not None]
        label = group_label(method, v, len(variants[method]))
        out.append({"method": method, "label": label, "budget": budget, "trials": len(rs),
                    "infeasible": sum(not r.feasible for r in rs),
                    "top1_best": best_of(rs).top1, "top1_mean": statistics.fmean(top1),
                    "top1_sd": statistics.stdev(top1) if len(rs) > 1 else None,
                    "top1_before_ft": statistics.fmean(before) if before else None,
                    "macs": statistics.fmean(r.macs for r in rs),
                    "macs_of_dense": statistics.fmean(r.macs / r.dense_macs for r in rs),
                    "target_of_dense": statistics.fmean((r.target_macs or 0) / r.dense_macs
                                                        for r in rs),
                    # a subnet above its MACs target is flagged, never silently compared
                    "over_target": sum(bool(r.target_macs) and r.macs > r.target_macs
                                       for r in rs),
                    "argmax_modules": sum(r.argmax_modules or 0 for r in rs),
                    "additions": "; ".join(sorted({r.additions for r in rs if r.additions})),
                    "params": statistics.fmean(r.params for r in rs),
                    # a latency budget (search.budget_metric latency): ms per batch, mean
                    "latency_target_ms": _mean(r.target_latency_ms for r in rs),
                    "latency_ms": _mean(r.latency_ms for r in rs),
                    **_flat("search", _mean_hours([r.phase_hours()["search"] for r in rs])),
                    **_flat("total", _mean_hours([r.total_hours(share) for r in rs]))})
    comparison, metrics = [], {}
    for label in sorted({g["label"] for g in out}):
        search = _mean_hours([group_hours(g, "search") for g in out if g["label"] == label])
        vs_dense = _ratio(search, dense.hours)
        comparison.append({"compare": f"{label} search vs dense training", "budget": "all",
                           "a_hours": search, "b_hours": dense.hours, "ratio": vs_dense})
        name = metric_name(label)
        if vs_dense is not None:
            metrics[f"cost_ratio/{name}_search_vs_dense_training"] = vs_dense
        metrics.update({f"{k}/{name}": v for k, v in _flat("search", search).items()})
    for ref in (g for g in out if g["method"] == REFERENCE):
        for g in (g for g in out if g["method"] != REFERENCE and g["budget"] == ref["budget"]):
            a, b = group_hours(ref, "search"), group_hours(g, "search")
            ratio, budget = _ratio(a, b), g["budget"]
            comparison.append({"compare": f"{ref['label']} vs {g['label']} search",
                               "budget": budget, "a_hours": a, "b_hours": b, "ratio": ratio})
            if ratio is not None:
                pair = f"{metric_name(ref['label'])}_vs_{metric_name(g['label'])}/{budget}"
                metrics[f"cost_ratio/{pair}"] = ratio
                metrics[f"top1_gain/{pair}"] = ref["top1_mean"] - g["top1_mean"]
    control = [g for g in out if g["method"] == CONTROL]
    for g in out:
        metrics[f"top1/{metric_name(g['label'])}/{g['budget']}"] = g["top1_mean"]
        if control and g["method"] != CONTROL:
            metrics[f"top1_vs_control/{metric_name(g['label'])}/{g['budget']}"] = (
                g["top1_mean"] - control[0]["top1_mean"])
    return Report(out, comparison, metrics, render(out, comparison, dense))


def _mean(xs: Any) -> float | None:
    got = [x for x in xs if x is not None]
    return statistics.fmean(got) if got else None


def _pct(key: tuple[str, ...]) -> int:
    return int(key[1].removesuffix("pct") or 0)


def render(groups: list[dict[str, Any]], comparison: list[dict[str, Any]], dense: Dense) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}%"

    def sd(x: float | None) -> str:
        return "" if x is None else f" +/- {100 * x:.2f}"

    search_kinds = kinds_in(*(group_hours(g, "search") for g in groups))
    total_kinds = kinds_in(*(group_hours(g, "total") for g in groups))
    head = ["method", "budget", "trials", "top-1 mean", "top-1 best", "before FT", "MACs",
            "of dense", "target", "over target", "argmax", "params",
            *(f"search {unit(k)}" for k in search_kinds),
            *(f"total {unit(k)}" for k in total_kinds)]
    body = [[g["label"], g["budget"], str(g["trials"]), pct(g["top1_mean"]) + sd(g["top1_sd"]),
             pct(g["top1_best"]), pct(g["top1_before_ft"]), f"{g['macs'] / 1e6:.2f}M",
             f"{100 * g['macs_of_dense']:.1f}%", f"{100 * g['target_of_dense']:.1f}%",
             f"{g['over_target']}" + (" !" if g["over_target"] else ""),
             str(g["argmax_modules"]), f"{g['params'] / 1e6:.3f}M",
             *(f"{g.get(f'search_{hours_name(k)}', 0.0):.4f}" for k in search_kinds),
             *(f"{g.get(f'total_{hours_name(k)}', 0.0):.4f}" for k in total_kinds)]
            for g in groups]
    if any(g.get("latency_target_ms") is not None for g in groups):  # latency budgets
        head[9:9] = ["latency target", "latency"]
        for b, g in zip(body, groups, strict=True):
            b[9:9] = [_ms(g.get("latency_target_ms")), _ms(g.get("latency_ms"))]
    if any(g["infeasible"] for g in groups):  # only sweeps with sweep.max_macs have any
        head.insert(3, "infeasible")
        for b, g in zip(body, groups, strict=True):
            b.insert(3, str(g["infeasible"]))
    units = " and ".join(unit(k) for k in kinds_in(dict.fromkeys(search_kinds + total_kinds),
                                                    dense.hours if dense.device_hours else {}))
    lines = [f"== subnets per method and budget (costs in {units}) ==", _table(head, body)]
    lines.append("   top-1 on the test set after the shared fine-tune: mean +/- sd over trials "
                 "(seeds); 'before FT' = right after extraction, mean; MACs and params: mean")
    lines.append("   target: the MACs budget (of dense); over target: trials whose subnet is "
                 "above it (flagged '!'); argmax: modules decided at the epoch cap, summed")
    if "latency" in head:
        lines.append("   latency target / latency: a latency budget's target and the subnet's "
                     "measured ms per batch (the latency table's batch and device)")
    lines.append("   equal training: methods whose search trains no weights fine-tune for "
                 "search + fine-tune epochs; search costs count training only, not evaluation")
    marked = [g for g in groups if g["additions"]]
    for g in marked:
        lines.append(f"   {g['label']} {g['budget']} used our additions to the published "
                     f"method: {g['additions']}")
    if "infeasible" in head:
        lines.append("   infeasible = trials above sweep.max_macs: their top-1 is as measured, "
                     "and 'top-1 best' is the best feasible trial's when the group has one")
    lines.append(f"   dense: top-1 {pct(dense.top1)}, "
                 f"{(dense.macs or 0) / 1e6:.2f}M MACs, trained in {format_hours(dense.hours)} "
                 "(shared by every trial" + (f"; its share is in 'total {unit(dense.device_kind)}')"
                                             if dense.device_hours else ")"))
    lines.append("   device-hours: a lower bound (worker loops only), never summed across units")
    cbody = [[c["compare"], c["budget"], format_hours(c["a_hours"]), format_hours(c["b_hours"]),
              "-" if c["ratio"] is None else f"{c['ratio']:.3f}"] for c in comparison]
    lines += ["", "== search cost comparison ==",
              _table(["comparison", "budget", "A", "B", "A / B"], cbody)]
    if any(not _one_unit(c["a_hours"], c["b_hours"]) for c in comparison):
        lines.append("   A / B '-': A and B are in different units (GPU-hours vs "
                     "CPU-core-hours), no ratio")
    if not any(c["budget"] != "all" for c in comparison):
        lines.append("   no two-stage method in this sweep: the dense training cost is the "
                     "reference")
    return "\n".join(lines)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} ms"


def _table(head: list[str], body: list[list[str]]) -> str:
    rows = [head, *body]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def write(report: Report, rows: Rows, dense: Dense, out: Path,
          title: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(report.text + "\n")
    (out / "comparison.json").write_text(json.dumps(
        {"groups": report.groups, "comparison": report.comparison, "metrics": report.metrics},
        indent=2))
    from orchestrator.pareto_plot import plot_pareto  # matplotlib only when writing

    png = plot_pareto(rows, dense, out / "pareto.png", title)
    return [out / "table.txt", out / "comparison.json", png]


# -- sources --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.report", description=__doc__.split(
        "\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="a sweep folder (<output_dir>/<name>) or an MLflow "
                   "experiment")
    slot_report.add_arguments(p)
    p.add_argument("--tracking-uri", help="MLflow store for an experiment name (default: "
                   "MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    p.add_argument("--out", help="folder for table.txt, comparison.json, pareto.png "
                   "(default: <sweep folder>/report, or ./report-<experiment>)")
    p.add_argument("--no-log", action="store_true", help="do not log to the MLflow parent run")
    args = p.parse_args(argv)
    if args.schedule or not args.source:
        return slot_report.main(args.schedule, args.output_dir, args.last, args.tracking_uri,
                                not args.no_log) if args.schedule \
            else p.error("give a sweep folder or experiment, or --schedule NAME")
    import os

    parent_id, uri = None, args.tracking_uri
    try:
        folder = Path(args.source)
        if folder.is_dir():
            rows, dense = from_folder(folder)
            out, title = Path(args.out or folder / "report"), folder.name
            parent_id, uri = parent_of_folder(folder, uri)
        else:
            uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or \
                f"sqlite:///{Path('runs/mlflow.db').resolve()}"
            rows, dense, parent_id = from_mlflow(args.source, uri)
            out, title = Path(args.out or f"report-{args.source}"), args.source
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {args.source} has no finished trial yet", file=sys.stderr)
        return 2
    report = build(rows, dense)
    files = write(report, rows, dense, out, title)
    print(report.text)
    print(f"\n  written      {', '.join(str(f) for f in files)}")
    if parent_id and uri and not args.no_log:
        from mlflow import MlflowClient

        from orchestrator.tracking import log_to_run

        log_to_run(MlflowClient(uri), parent_id, report.metrics, files, "report")
        print(f"  logged to    MLflow run {parent_id} ({uri})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
