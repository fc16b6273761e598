"""Budgets every trial can reach, checked before Ray starts: a budget below the smallest subnet
a method can reach (or a target above the dense model) would otherwise be found out only after
the dense pretrain, by a search that cannot meet it.

A sweep checks every method it samples against the lowest and highest budget its space can
draw (a choice's values, a range's ends), so no trial of it is refused later.
"""

from __future__ import annotations

from itertools import product
from typing import Any

from orchestrator.config import Config, ConfigError
from search_space.arch import ViTArch

BUDGET_KEYS = ("search.budget", "search.target_gmacs")


def _values(space: dict[str, Any], key: str, default: Any) -> list[Any]:
    """What a sweep may draw for `key`: a choice's values, a range's two ends, else `default`."""
    d = space.get(key)
    if d is None:
        return [default]
    return list(d.values) if d.type == "choice" else [d.low, d.high]


def budget_cases(cfg: Config) -> list[tuple[dict[str, Any], str]]:
    """(search overrides, where it comes from) for every method x extreme budget a run or
    sweep can use."""
    space = cfg.sweep.space if cfg.sweep is not None else {}
    methods = _values(space, "search.method", cfg.search.method)
    swept = [k for k in BUDGET_KEYS if k in space]
    if not swept:
        return [({"method": m}, "") for m in methods]
    cases = []
    for m, key in product(methods, swept):
        for v in _values(space, key, None):
            field = key.split(".", 1)[1]
            other = {"target_gmacs": None} if field == "budget" else {}
            cases.append(({"method": m, field: v, **other},
                          f"sweep.space {key}={v!r} with search.method={m!r}: "))
    return cases


def check_budgets(cfg: Config, arch: ViTArch) -> None:
    """Refuse (ConfigError) any budget of `cfg` a method cannot reach on `arch`."""
    from trainers.methods import get_method

    for update, where in budget_cases(cfg):
        search = cfg.search.model_copy(update=update)
        method = get_method(search.method)(search, 1, arch)
        try:
            method.check_budget()
        except ValueError as e:
            raise ConfigError(f"{where}{e}") from None
