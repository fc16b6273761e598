"""`schedule.warm_start: previous_front`: a slot's sweep evaluates the previous slot's Pareto
front first (its parameters put ahead of `sweep.points_to_evaluate`), so a nightly sweep on fresh
data re-checks last night's best settings before Optuna samples new ones.

Decision: "previous" is the latest earlier slot with a results.parquet (a SKIPPED or failed
night has none, and the one before it still says something); a front point whose values no
longer fit this slot's space (the config changed) is left out instead of failing the slot.
"""

from __future__ import annotations

from typing import Any

from orchestrator.config import Config
from orchestrator.sweep_space import Distribution


def fits(value: Any, d: Distribution) -> bool:
    if value is None:
        return False
    if d.type == "choice":
        return value in (d.values or [])
    return d.low is not None and d.high is not None and d.low <= value <= d.high


def previous_front(cfg: Config, schedule: str, slot: str) -> tuple[str | None, list[dict]]:
    """(the earlier slot, the space values of its Pareto front under this sweep's objectives)."""
    from orchestrator.report import pareto_front
    from orchestrator.results import read_results
    from orchestrator.schedules.slot_report import slot_folders

    assert cfg.sweep is not None
    earlier = [(s, f) for s, f in slot_folders(cfg.output_dir, schedule) if s < slot]
    if not earlier:
        return None, []
    prev, folder = earlier[-1]
    points: list[dict] = []
    for rec in pareto_front(read_results(folder / "results.parquet"), cfg.sweep.objectives):
        point = {k: rec.hparams.get(k) for k in cfg.sweep.space}
        if all(fits(v, cfg.sweep.space[k]) for k, v in point.items()) and point not in points:
            points.append(point)
    return prev, points


def warm_start(cfg: Config, schedule: str, slot: str) -> str | None:
    """Put the previous front ahead of the configured points; a line saying so, or None."""
    if cfg.sweep is None or cfg.schedule is None or cfg.schedule.warm_start != "previous_front":
        return None
    prev, points = previous_front(cfg, schedule, slot)
    new = [p for p in points if p not in cfg.sweep.points_to_evaluate]
    if not new:
        return None
    cfg.sweep.points_to_evaluate = [*new, *cfg.sweep.points_to_evaluate]
    return f"warm start: {len(new)} point(s) of slot {prev}'s Pareto front evaluated first"
