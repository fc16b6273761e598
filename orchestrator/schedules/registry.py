"""Registry aliases of a scheduled sweep (../shared/SCHEDULING.md section 2, "MLflow per slot").

Every slot's best subnet per budget takes `latest-<budget>`; `best-<budget>` moves to it only when
it beats the subnet holding that alias (top-1 after fine-tune), so one bad night never regresses
what a deployment pulls by `models:/<schedule>-subnet@best-<budget>`. The per-method aliases
`<method>-<budget>` follow the latest slot, as in an unscheduled sweep.
"""

from __future__ import annotations

from typing import Any


def holder_top1(client: Any, name: str, alias: str) -> tuple[str | None, float | None]:
    """(run id, top-1) of the model version holding `alias`; (None, None) when none does."""
    try:
        version = client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - MlflowException: no such alias (or model) yet
        return None, None
    return version.run_id, client.get_run(version.run_id).data.metrics.get("top1")


def slot_aliases(client: Any, name: str, alias: str, run_id: str, top1: float) -> list[str]:
    """The aliases a scheduled slot's subnet takes instead of the sweep's `alias`."""
    if not alias.startswith("best-"):
        return [alias]
    budget = alias.removeprefix("best-")
    holder, held = holder_top1(client, name, alias)
    beats = holder is None or holder == run_id or held is None or top1 > held
    return [f"latest-{budget}", *([alias] if beats else [])]
