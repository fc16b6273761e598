"""The report's figure: top-1 vs MACs per method, marker area ~ search cost, the Pareto front."""

from __future__ import annotations

from pathlib import Path

from orchestrator.records import TrialRecord, as_record, group_label, kinds_in, unit, variant
from orchestrator.report import TOP1_VS_MACS, Dense, Rows, pareto_front


def plot_pareto(rows: Rows, dense: Dense, path: Path, title: str) -> Path:
    """Top-1 vs MACs, one series per method (and variant), marker area ~ search cost, the
    Pareto front; trials above sweep.max_macs are crossed out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in map(as_record, rows) if r.top1 is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    kinds = kinds_in(*(r.phase_hours()["search"] for r in recs))
    top_h = {k: max([r.search_device_hours or 0.0 for r in recs if _kind(r) == k] + [1e-9])
             for k in kinds}  # sizes are scaled per unit: GPU- and CPU-core-hours differ
    series = sorted({(r.method, variant(r.additions)) for r in recs})
    for method, v in series:  # one series per method, and per variant if a method has several
        rs = [r for r in recs if (r.method, variant(r.additions)) == (method, v)]
        label = group_label(method, v, [m for m, _ in series].count(method))
        ax.scatter([r.macs / 1e6 for r in rs], [100 * r.top1 for r in rs],
                   s=[30 + 370 * (r.search_device_hours or 0.0) / top_h[_kind(r)] for r in rs],
                   alpha=0.7, label=label, edgecolors="black", linewidths=0.5)
    if bad := [r for r in recs if not r.feasible]:
        ax.scatter([r.macs / 1e6 for r in bad], [100 * r.top1 for r in bad], marker="x", s=80,
                   c="red", label="infeasible (> max_macs)", zorder=3)
    front = pareto_front(recs, TOP1_VS_MACS)
    if front:
        ax.plot([r.macs / 1e6 for r in front], [100 * r.top1 for r in front], "k--",
                lw=1, label="Pareto front", drawstyle="steps-post")
    if dense.top1 is not None and dense.macs:
        ax.scatter([dense.macs / 1e6], [100 * dense.top1], marker="*", s=200, c="gold",
                   edgecolors="black", label="dense", zorder=3)
    ax.set_xlabel("MACs per image (M)")
    ax.set_ylabel("top-1 (%)")
    size = unit(kinds[0]) if len(kinds) == 1 else "hours, scaled per unit"
    ax.set_title(f"{title}: top-1 vs MACs (marker area ~ search {size})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _kind(r: TrialRecord) -> str:
    return next(iter(r.phase_hours()["search"]))
