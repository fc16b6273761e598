"""Registry aliases of a scheduled sweep (../shared/SCHEDULING.md section 2, "MLflow per slot").

Every slot's best subnet per budget takes `latest-<budget>`; `best-<budget>` moves to it only when
it beats the subnet holding that alias (top-1 after fine-tune), so one bad night never regresses
what a deployment pulls by `models:/<schedule>-subnet@best-<budget>`. The per-method aliases
`<method>-<budget>` follow the latest slot, as in an unscheduled sweep.
"""

from __future__ import annotations

from typing import Any

from orchestrator.schedules.driver import schedule_tags


def holder_top1(client: Any, name: str, alias: str) -> tuple[str | None, float | None]:
    """(run id, top-1) of the model version holding `alias`; (None, None) when none does."""
    try:
        version = client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - MlflowException: no such alias (or model) yet
        return None, None
    return version.run_id, client.get_run(version.run_id).data.metrics.get("top1")


def slot_aliases(client: Any, name: str, alias: str, version: str, run_id: str,
                 top1: float) -> list[str]:
    """The aliases the subnet (model `version` of `run_id`) takes for the sweep's `alias`:
    `alias` itself in an unscheduled sweep; in a scheduled slot, which also tags the version
    with its slot, latest-/best-<budget> for best-<budget>."""
    slot = schedule_tags().get("ofb_slot")
    if not slot:
        return [alias]
    client.set_model_version_tag(name, version, "ofb_slot", slot)
    if not alias.startswith("best-"):
        return [alias]
    budget = alias.removeprefix("best-")
    holder, held = holder_top1(client, name, alias)
    beats = holder is None or holder == run_id or held is None or top1 > held
    return [f"latest-{budget}", *([alias] if beats else [])]
