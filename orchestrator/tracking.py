"""MLflow tracking: one parent run per sweep, one nested child run per trial, subnets as models.

Only the orchestrator talks to MLflow (workers report through Ray Train). Layout:
- parent run `sweep-<name>` (tag ofb_role=sweep): the whole config as params, code version,
  the data set as a run input, the dense model (MACs, params, top-1, pretrain device-hours as
  `pretrain_gpu_hours` or `pretrain_cpu_core_hours` with the tag `dense_device_kind`,
  arch.json), at the end the report (table, cost comparison, Pareto PNG);
- child run `trial-<id>` (tag mlflow.parentRunId): the trial's sampled hyperparameters,
  per-epoch curves of the search and the fine-tune (`search/...`, `finetune/...`, step=epoch),
  final metrics (top-1, MACs, params, device-hours per phase incl. its share of the pretrain,
  and the total per unit: `search_<unit>`, `finetune_<unit>`, `pretrain_share_<unit>`,
  `total_<unit>` with unit `gpu_hours` or `cpu_core_hours`; GPU- and CPU-core-hours are never
  added together), tags method/budget/status, the subnet as a pyfunc model and its arch.json;
- the registry: per budget, the best subnet gets the aliases `best-<budget>` and
  `<method>-<budget>` on the registered model `<name>-subnet` (aliases, not stages; a
  scheduled slot's: schedules/registry.py).

A callback of our own rather than Ray's MLflowLoggerCallback: a rerun must find the same parent
and the same child per trial id (Tuner.restore), curves come from the phases' result files, and
the subnet is logged as a model. Run lookups go through tags, so reruns never duplicate runs.

An unreachable server (a restart, an outage) never stops a sweep: MLflow's client retries each
call for about 4 minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES), so a server back by then loses
nothing; past that, the call is a warning, every finished trial stays in results.parquet, and
the sweep's end (or a rerun of the same command) logs each trial whose run is not complete.
"""

from __future__ import annotations

import json
import os
import urllib.request
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from orchestrator import locks
from orchestrator.config import Config, ConfigError
from orchestrator.records import DEFAULT_KIND, TrialRecord, as_record, hours_name, rank_key
from orchestrator.schedules.driver import schedule_tags
from orchestrator.schedules.jobs import git_state
from orchestrator.schedules.registry import slot_aliases

SUBNET_MODEL_CODE = Path(__file__).with_name("subnet_pyfunc.py")
SEARCH_SPACE_CODE = Path(__file__).resolve().parents[1] / "search_space"
_NOT_CURVES = {"epoch", "epochs", "phase", "resumed_from_epoch", "search_finished"}


def check_store(cfg: Config) -> None:
    """Fail before any work when the configured tracking store cannot be reached."""
    if not cfg.mlflow.enabled:
        return
    uri = cfg.tracking_uri
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                if r.status != 200:
                    raise OSError(f"HTTP {r.status}")
        except (OSError, ValueError) as e:
            why = getattr(e, "reason", None) or e
            raise ConfigError(
                f"mlflow.tracking_uri={uri!r}: no MLflow server answers there ({why}). Start "
                "one (`mlflow server --host 127.0.0.1 --port 5000`), open the SSH tunnel to the "
                "head node (README: MLflow on a cluster), or unset mlflow.tracking_uri to record "
                f"into {cfg.run_dir.parent / 'mlflow.db'}") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"MLflow store {uri!r}: cannot create {folder} ({e})") from None
    elif uri.startswith("file:") or "://" not in uri:
        raise ConfigError(f"mlflow.tracking_uri={uri!r}: MLflow 3 refuses file stores; use "
                          "sqlite:///PATH/mlflow.db or an http:// server")


def _store_lock(uri: str) -> AbstractContextManager:
    """One process at a time opens a SQLite store (<db>.lock beside it): two sweeps started at
    once on one output folder both ran MLflow's schema migration on the new file, and one
    crashed (alembic: "expected to match one row")."""
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    db = Path(uri.removeprefix("sqlite:///"))
    return locks.hold(db.with_name(db.name + ".lock"), wait=True)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v and k != "space":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (dict, list)) else v
    return out


def _code_version() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    tags = {"mlflow.source.name": "orchestrator.run", "mlflow.source.type": "JOB"}
    try:
        tags["ofb_version"] = version("ofb-orchestrator")
    except PackageNotFoundError:
        pass
    commit, dirty = git_state(SEARCH_SPACE_CODE.parent)  # env first: a job has no .git
    if commit != "unknown":
        tags.update({"mlflow.source.git.commit": commit, "ofb_git_dirty": str(dirty)})
    return tags


class Tracker:
    """The MLflow side of one sweep (or single trial). Holds no state MLflow does not have."""

    def __init__(self, cfg: Config):
        import mlflow
        from mlflow import MlflowClient

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.cfg, self.uri = cfg, cfg.tracking_uri
        mlflow.set_tracking_uri(self.uri)  # log_model goes through the fluent API
        name = cfg.mlflow.experiment or cfg.name
        with _store_lock(self.uri):  # the client creates (migrates) a new SQLite store
            self.client = MlflowClient(self.uri)
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                local = None if self.uri.startswith(("http://", "https://")) else str(
                    Path(cfg.output_dir).expanduser().resolve() / "mlartifacts" / name)
                self.experiment_id = self.client.create_experiment(name,
                                                                   artifact_location=local)
            else:
                self.experiment_id = exp.experiment_id
        self.parent_id: str | None = None
        self.children: dict[str, str] = {}  # trial id -> run id
        self.dense_kind: str | None = None  # the unit of the dense model's device-hours
        self.failed = False  # the sweep's end could not reach MLflow: the rest is skipped

    # -- runs ---------------------------------------------------------------------------
    def _find(self, filter_string: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                       max_results=1000)

    def start_sweep(self, dense: Any) -> str:
        """The sweep's parent run: found again on a rerun (tag ofb_sweep_dir), else created."""
        cfg, where = self.cfg, str(self.cfg.run_dir)
        found = self._find(f"tags.ofb_role = 'sweep' and tags.ofb_sweep_dir = '{where}'")
        if found:
            self.attach(found[0].info.run_id)
            self.dense_kind = self.dense_kind or dense.cost.device_kind
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=f"sweep-{cfg.name}", tags={
            **_code_version(), **schedule_tags(), "ofb_role": "sweep", "ofb_sweep_dir": where,
            "method": cfg.search.method, "dataset": cfg.data.dataset, "model": cfg.model.name})
        self.parent_id = run.info.run_id
        params = flatten(cfg.model_dump())
        if cfg.sweep is not None:
            params["sweep.space"] = json.dumps({k: d.model_dump(exclude_none=True)
                                               for k, d in cfg.sweep.space.items()})
        self._log_params(self.parent_id, params)
        self._log_dataset(self.parent_id)
        self.log_dense(self.parent_id, dense)
        return self.parent_id

    def attach(self, parent_id: str) -> None:
        """Continue an existing sweep run and know its children by trial id."""
        self.parent_id = parent_id
        self.dense_kind = self.client.get_run(parent_id).data.tags.get("dense_device_kind")
        for r in self._find(f"tags.`mlflow.parentRunId` = '{parent_id}'"):
            self.children[r.data.tags.get("trial_id", "")] = r.info.run_id

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[i:i + 100])

    def _log_dataset(self, run_id: str) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        from orchestrator.config import _hash

        d = self.cfg.data
        ds = Dataset(name=d.dataset, digest=_hash(d.model_dump())[:8], source_type="local",
                     source=json.dumps({"uri": str(d.root or "")}))
        self.client.log_inputs(run_id, [DatasetInput(ds, [InputTag("mlflow.data.context",
                                                                   "train")])])

    def log_dense(self, run_id: str, dense: Any) -> None:
        m, kind = dense.metrics, dense.cost.device_kind
        self.dense_kind = kind
        self._metrics(run_id, {
            "dense_macs": dense.macs,
            "dense_top1": m.get("test_top1"), "dense_val_top1": m.get("val_top1"),
            f"pretrain_{hours_name(kind)}": dense.cost.device_hours})
        self.client.set_tag(run_id, "dense_device_kind", kind)
        self.client.log_artifact(run_id, str(dense.path / "arch.json"), "dense")

    def _metrics(self, run_id: str, values: dict[str, Any], step: int = 0,
                 stamp: int | None = None) -> None:
        log_metrics(self.client, run_id, values, step, stamp)

    def child(self, trial_id: str, params: dict[str, Any]) -> str:
        """The run of one trial (nested under the sweep's parent), created once: looked up by
        its tag first (a create whose answer an outage lost may have reached the server)."""
        if trial_id not in self.children and self.parent_id:
            for r in self._find(f"tags.trial_id = '{trial_id}' and "
                                f"tags.`mlflow.parentRunId` = '{self.parent_id}'"):
                self.children[trial_id] = r.info.run_id
        if trial_id in self.children:
            self.client.update_run(self.children[trial_id], status="RUNNING")
            return self.children[trial_id]
        method = str(params.get("search.method", self.cfg.search.method))
        params = {"search.method": method, **params}
        tags = {"trial_id": trial_id, "ofb_role": "trial", "status": "running", "method": method}
        if self.parent_id:
            tags["mlflow.parentRunId"] = self.parent_id
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial_id}", tags=tags)
        self.children[trial_id] = run.info.run_id
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def log_progress(self, run_id: str, result: dict[str, Any]) -> None:
        """An intermediate report (ASHA mode: one per search epoch)."""
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        self._metrics(run_id, {f"search/{k}": v for k, v in result.items()
                               if k in ("val_top1", "train_loss", "expected_macs")}, step)

    def log_trial(self, run_id: str, rec: TrialRecord, pretrain_share: float,
                  pretrain_kind: str | None = None) -> None:
        """A finished trial: curves, final metrics, tags, the subnet model; run FINISHED.

        `pretrain_share`: the trial's share of the dense pretrain in `pretrain_kind` hours
        (default: the dense model's kind logged on the sweep run)."""
        trial_dir, stamp = Path(rec.trial_dir or ""), 0
        for phase in ("search", "finetune"):
            f = trial_dir / phase / "result.json"
            if not rec.trial_dir or not f.exists():
                continue
            stamp = int(f.stat().st_mtime * 1000)  # same file, same stamp: reruns add nothing
            for h in json.loads(f.read_text()).get("history", []):
                self._metrics(run_id, {f"{phase}/{k}": v for k, v in h.items()
                                       if k not in _NOT_CURVES}, int(h.get("epoch", 0)), stamp)
        finals = rec.mlflow_metrics()
        share = {pretrain_kind or self.dense_kind or DEFAULT_KIND: pretrain_share}
        finals.update({f"pretrain_share_{hours_name(k)}": v for k, v in share.items()})
        finals.update({f"total_{hours_name(k)}": v
                       for k, v in rec.total_hours(share).items()})  # per unit, never mixed
        finals["macs_fraction"] = rec.macs / rec.dense_macs
        self._metrics(run_id, finals, 0, stamp or None)
        tags = rec.mlflow_tags()
        subnet = Path(rec.subnet_path)
        self.client.log_artifact(run_id, str(subnet / "arch.json"), "subnet")
        if self.cfg.mlflow.log_models and "ofb_model_uri" not in self.client.get_run(
                run_id).data.tags:  # a model per run, even when a rerun logs the trial again
            self.client.set_tag(run_id, "ofb_model_uri", self._log_model(run_id, subnet))
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)
        self.client.set_terminated(run_id, "FINISHED")

    def complete(self, run_id: str) -> bool:
        """Whether `log_trial` finished on this run (FINISHED, with its model when logged)."""
        run = self.client.get_run(run_id)
        return run.info.status == "FINISHED" and (
            not self.cfg.mlflow.log_models or "ofb_model_uri" in run.data.tags)

    def _log_model(self, run_id: str, subnet: Path) -> str:
        import mlflow
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        arch = json.loads((subnet / "arch.json").read_text())["arch"]
        c, size, k = arch.get("in_chans", 3), arch.get("img_size", 224), arch["num_classes"]
        sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, size, size))]),
                             outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, k))]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "add type hints", "no input example"
            with mlflow.start_run(run_id=run_id, nested=True):
                info = mlflow.pyfunc.log_model(
                    name="subnet_model", python_model=str(SUBNET_MODEL_CODE),
                    artifacts={"subnet": str(subnet)}, code_paths=[str(SEARCH_SPACE_CODE)],
                    signature=sig, pip_requirements=_requirements())
        return info.model_uri

    def end(self, run_id: str, status: str, tag: str) -> None:
        self.client.set_tag(run_id, "status", tag)
        self.client.set_terminated(run_id, status)

    # -- registry -----------------------------------------------------------------------
    def register_best(self, rows: list[TrialRecord | dict[str, Any]]) -> dict[str, str]:
        """Aliases best-<budget> and <method>-<budget> on the best feasible subnets (an
        infeasible trial, above sweep.max_macs, never gets one); returns them."""
        name = self.cfg.mlflow.registered_model or f"{self.cfg.name}-subnet"
        best: dict[str, TrialRecord] = {}
        for r in map(as_record, rows):
            if not r.mlflow_run_id or not r.feasible or r.top1 is None:
                continue
            for alias in (f"best-{r.budget}", f"{r.method}-{r.budget}"):
                if alias not in best or rank_key(r) > rank_key(best[alias]):
                    best[alias] = r
        done: dict[str, str] = {}
        for alias, r in sorted(best.items()):
            run = self.client.get_run(r.mlflow_run_id)
            uri = run.data.tags.get("ofb_model_uri")
            if not uri:
                continue
            version = self._version_of(name, run.info.run_id, uri)
            for a in slot_aliases(self.client, name, alias, version, run.info.run_id, r.top1):
                self.client.set_registered_model_alias(name, a, version)
                done[a] = f"models:/{name}@{a} (version {version})"
        return done

    def _version_of(self, name: str, run_id: str, uri: str) -> str:
        import mlflow

        try:
            for v in self.client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
                return str(v.version)
        except Exception:  # noqa: BLE001 - the registered model does not exist yet
            pass
        return str(mlflow.register_model(uri, name, await_registration_for=60).version)

    def close_trials(self, records: list[TrialRecord]) -> None:
        """At the sweep's end: each record's run id, then the registry aliases. Unreachable,
        MLflow is one warning (records keep the run ids known so far) and is left alone for
        the rest of the sweep; a rerun of the same command logs what is missing."""
        try:
            if not self.failed:
                self.attach(self.parent_id)
                for rec in records:
                    rec.mlflow_run_id = self.children.get(rec.trial_id)
                for alias, where in self.register_best(records).items():
                    print(f"[mlflow] registry alias {alias}: {where}", flush=True)
        except Exception as e:  # noqa: BLE001 - any client error: the results are safe
            self.failed = True
            warn(f"finish the trials' runs in {self.uri}", e, self.cfg.run_dir)
        for rec in records:
            rec.mlflow_run_id = rec.mlflow_run_id or self.children.get(rec.trial_id)

    def finish_sweep(self, metrics: dict[str, float], files: list[Path]) -> None:
        assert self.parent_id is not None
        if self.failed:
            return
        try:
            log_to_run(self.client, self.parent_id, metrics, files, "report")
            self.client.set_terminated(self.parent_id, "FINISHED")
        except Exception as e:  # noqa: BLE001
            warn(f"log the report to the sweep run {self.parent_id}", e, self.cfg.run_dir)


def log_metrics(client: Any, run_id: str, values: dict[str, Any], step: int = 0,
                stamp: int | None = None) -> None:
    """Numeric `values` at `step`. A `stamp` (ms) fixed by the caller makes a repeated log a
    no-op: MLflow drops metrics equal in key, value, step and timestamp."""
    import time

    from mlflow.entities import Metric

    now = stamp or int(time.time() * 1000)
    ms = [Metric(k, float(v), now, step) for k, v in values.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for i in range(0, len(ms), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=ms[i:i + 1000])


def log_to_run(client: Any, run_id: str, metrics: dict[str, float], files: list[Path],
               folder: str) -> None:
    """Metrics (step 0) and files (under `folder/`) onto an existing run."""
    log_metrics(client, run_id, metrics)
    for f in files:
        client.log_artifact(run_id, str(f), folder)


def track_single(cfg: Config, dense: Any, result: TrialRecord) -> str:
    """A run without a sweep (sweep=null): one top-level run holding the trial's record."""
    t = Tracker(cfg)
    run_id = t.child(cfg.name, flatten({"search": cfg.search.active_dump(),
                                        "finetune": cfg.finetune.model_dump()}))
    t._log_dataset(run_id)
    t.log_dense(run_id, dense)
    t.log_trial(run_id, result, dense.cost.device_hours, dense.cost.device_kind)
    return run_id


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "timm", "safetensors", "numpy")]


def warn(what: str, e: Exception, run_dir: Path) -> None:
    """One line per tracking failure: what was not logged, and how it will be."""
    print(f"[mlflow] WARNING: could not {what} ({type(e).__name__}: {str(e)[:160]}...). Every "
          f"finished trial is in {run_dir / 'results.parquet'}; the sweep's end, or a rerun of "
          "the same command once the server answers, logs what is missing", flush=True)
