"""Where a report's rows come from: a sweep folder (results.parquet + dense.json) or an MLflow
experiment (the latest sweep run and its finished children), and the sweep run of a folder."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from orchestrator.records import Hours, TrialRecord, hours_name


@dataclass
class Dense:
    top1: float | None
    macs: float | None
    device_hours: float  # in `device_kind` hours: the dense model's may differ from the trials'
    device_kind: str = "cpu_core"

    @property
    def hours(self) -> Hours:
        return {self.device_kind: self.device_hours}



def from_folder(folder: Path) -> tuple[list[TrialRecord], Dense]:
    from orchestrator.results import read_results  # imports Ray Tune: only when needed

    table = folder / "results.parquet"
    if not table.is_file():
        raise FileNotFoundError(f"{folder} holds no results.parquet: not a sweep folder (give "
                                "<output_dir>/<name>, or an MLflow experiment name)")
    recs = read_results(table)
    d = json.loads((folder / "dense.json").read_text()) if (folder / "dense.json").exists() \
        else {}
    return recs, Dense(d.get("top1"), d.get("macs"), d.get("device_hours", 0.0),
                       d.get("device_kind", "cpu_core"))


def from_mlflow(experiment: str, uri: str) -> tuple[list[TrialRecord], Dense, str]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments(max_results=50)]
        raise FileNotFoundError(f"no sweep folder and no MLflow experiment {experiment!r} at "
                                f"{uri}; experiments there: {names}")
    parents = client.search_runs([exp.experiment_id], "tags.ofb_role = 'sweep'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise FileNotFoundError(f"experiment {experiment!r} at {uri} holds no sweep run")
    parent = parents[0]
    dense = dense_of_run(parent.data.metrics, parent.data.tags, parent.data.params)
    rows = []
    for run in client.search_runs(
            [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
            max_results=5000):
        if run.data.tags.get("status") == "finished":
            rows.append(TrialRecord.from_mlflow(run.info.run_id, run.data.metrics,
                                                run.data.tags))
    return rows, dense, parent.info.run_id


def dense_of_run(metrics: Mapping[str, float], tags: Mapping[str, str],
                 params: Mapping[str, str]) -> Dense:
    """The dense model of a sweep's parent run: its cost is `pretrain_<unit>` under the tag
    `dense_device_kind` (the dense model may come from the cache, trained on another kind of
    device than the sweep). Runs logged before: `pretrain_device_hours`, kind from the sweep's
    scaling.use_gpu."""
    kind = tags.get("dense_device_kind") or next(
        (k for k in ("gpu", "cpu_core") if f"pretrain_{hours_name(k)}" in metrics),
        "gpu" if params.get("scaling.use_gpu") == "True" else "cpu_core")
    hours = metrics.get(f"pretrain_{hours_name(kind)}", metrics.get("pretrain_device_hours", 0))
    return Dense(metrics.get("dense_top1"), metrics.get("dense_macs"), hours, kind)


def parent_of_folder(folder: Path, uri: str | None) -> tuple[str | None, str | None]:
    """The MLflow sweep run of a sweep folder, through the config saved beside it."""
    import yaml

    from orchestrator.config import validate

    f = folder / "config.yaml"
    if not f.exists():
        return None, uri
    cfg = validate(yaml.safe_load(f.read_text()))
    if not cfg.mlflow.enabled:
        return None, uri
    from mlflow import MlflowClient

    uri = uri or cfg.tracking_uri
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment or cfg.name)
    if exp is None:
        return None, uri
    runs = client.search_runs([exp.experiment_id], "tags.ofb_role = 'sweep' and "
                              f"tags.ofb_sweep_dir = '{folder.resolve()}'", max_results=1)
    return (runs[0].info.run_id if runs else None), uri
