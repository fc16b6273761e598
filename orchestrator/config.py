"""Typed, validated configuration: YAML + dot-list overrides, checked once before Ray starts.

One pydantic model per concern, unknown keys forbidden, so a typo fails at launch with the key's
full dotted path and not hours into a sweep. Workers receive the config as a plain dict
(`Config.model_dump()`) and rebuild it with `Config.model_validate` on their first line.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import Field, ValidationError, model_validator

from orchestrator.schedules.spec import ScheduleSpec
from orchestrator.sweep_space import SweepConfig
from trainers.config import TrainConfig, _Section

DEFAULT_CONFIG = "default.yaml"  # packaged in orchestrator/


class ConfigError(ValueError):
    """Bad user configuration; the message names every bad key and what is allowed."""


class RayConfig(_Section):
    address: str | None = Field(None, description="None/'local': embedded; 'auto' or ray://...")
    health_check_interval_s: float = Field(0.2, gt=0)


class MlflowConfig(_Section):
    enabled: bool = Field(True, description="false: record nothing in MLflow")
    tracking_uri: str | None = Field(
        None, description="None: the embedded store sqlite:///<output_dir>/mlflow.db; "
        "http://127.0.0.1:5000 for a server (e.g. on the head node, through an SSH tunnel)")
    experiment: str | None = Field(None, description="default: the run's name")
    log_models: bool = Field(True, description="log each trial's subnet as an MLflow model")
    registered_model: str | None = Field(
        None, description="registry name of the best subnets; default <name>-subnet")


class Config(TrainConfig):
    name: str = Field("fmnist_vit", pattern=r"^[A-Za-z0-9_.\-]+$")
    pipeline: Literal["pretrain", "search"] = Field(
        "search", description="pretrain: dense model only; search: pretrain -> search -> "
        "subnet -> fine-tune -> evaluation")
    output_dir: str = "./runs"
    cache_dir: str | None = Field(None, description="default: <output_dir>/cache")
    ray: RayConfig = Field(default_factory=RayConfig)
    sweep: SweepConfig | None = Field(None, description="absent: one trial; present: a sweep")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    schedule: ScheduleSpec | None = Field(None, description="a cluster schedule for this sweep "
                                          "(orchestrator.schedule); absent: none")
    dense_refresh: str | None = Field(
        None, description="set by a scheduled run (schedule.refresh_dense), not by hand: the "
        "data's digest or the slot, made part of the dense model's cache key; None: not in it")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.name

    @property
    def tracking_uri(self) -> str:
        """The configured MLflow store, else an SQLite file under the output folder."""
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return f"sqlite:///{Path(self.output_dir).expanduser().resolve() / 'mlflow.db'}"

    @property
    def cache_path(self) -> Path:
        base = self.cache_dir or str(Path(self.output_dir) / "cache")
        return Path(base).expanduser().resolve()

    @model_validator(mode="after")
    def _one_gpu_per_rank(self) -> Config:
        """Several GPU workers cannot share a GPU: NCCL refuses two ranks on one device."""
        s = self.scaling
        g = s.gpus_per_worker
        if s.use_gpu and s.num_workers > 1 and (g < 1 or g != int(g)):
            raise ValueError(
                f"scaling.gpus_per_worker={g:g} with scaling.num_workers={s.num_workers}: two "
                "ranks on one GPU fail in NCCL ('Duplicate GPU detected'); with scaling.use_gpu "
                "and more than one worker gpus_per_worker must be a whole number (1, 2, ...); "
                "a fraction such as 0.5 is allowed only with scaling.num_workers=1")
        return self

    @model_validator(mode="after")
    def _sweep_keys_exist(self) -> Config:
        """Every swept key must name a real setting and accept the values it will be given."""
        if self.sweep is None:
            return self
        base = self.model_dump(exclude={"sweep"})
        for key, d in self.sweep.space.items():
            samples = d.values if d.type == "choice" else [d.low, d.high]
            for value in samples:
                tree = json.loads(json.dumps(base))
                if d.type == "randint":
                    value = int(value)
                try:
                    _set_dotted(tree, key, value)
                    TrainConfig.model_validate({k: tree[k] for k in TrainConfig.model_fields})
                except ValidationError as e:
                    err = e.errors()[0]
                    why = ("unknown key" if err["type"] == "extra_forbidden" else err["msg"])
                    raise ValueError(f"sweep.space[{key!r}] = {value!r} is not a valid setting "
                                     f"({'.'.join(map(str, err['loc']))}: {why})") from None
                except ConfigError as e:
                    raise ValueError(f"sweep.space[{key!r}]: {e}") from None
        return self

    def with_overrides(self, params: dict[str, Any]) -> Config:
        """A copy with dotted `params` applied (a trial's sampled hyperparameters)."""
        tree = self.model_dump()
        for key, value in params.items():
            _set_dotted(tree, key, value)
        return validate(tree)

    def pretrain_key(self) -> str:
        """Hash of everything that determines the dense model: model, data, recipe, seed.

        The worker count is left out on purpose: the global batch defines the recipe, and a
        sweep with other per-trial resources must still hit the cache.
        """
        data = self.data.model_dump(exclude={"loader_workers", "eval_batch_size"})
        parts = dict(model=self.model.model_dump(), data=data,
                     recipe=self.pretrain.model_dump(exclude={"cache"}), seed=self.seed)
        if self.dense_refresh:  # scheduled runs only: unscheduled keys stay as they were
            parts["refresh"] = self.dense_refresh
        return _hash(parts)

    def search_key(self) -> str:
        """Hash of what determines a search: the dense model, the shared search recipe and the
        active method's own section (another method's settings change nothing here)."""
        return _hash(dict(dense=self.pretrain_key(), search=self.search.active_dump()))

    def finetune_key(self) -> str:
        return _hash(dict(search=self.search_key(), finetune=self.finetune.model_dump()))


class NodeType(NamedTuple):
    name: str
    resources: dict[str, float]  # CPU, GPU, ... of one node
    max_count: int  # how many such nodes the cluster may run


@dataclass(frozen=True)
class ClusterShape:
    """What a Ray cluster can grow to: the head, the worker node types with their `max_workers`,
    and the global `max_workers` (a cap on worker nodes of all types together; None: no cap)."""

    head: NodeType | None
    workers: tuple[NodeType, ...]
    max_workers: int | None = None

    @classmethod
    def fixed(cls, resources: dict[str, float]) -> ClusterShape:
        """A cluster that never grows, taken as one node (Ray embedded on this machine)."""
        return cls(NodeType("this machine", dict(resources), 1), (), 0)

    @classmethod
    def from_launcher(cls, raw: dict[str, Any]) -> ClusterShape | None:
        """The shape a `ray up` config declares (cluster.yaml, or the `~/ray_bootstrap_config.yaml`
        it leaves on the head). None when a node type leaves its CPUs to detection at
        `ray start` (`resources: {}`; provider `local`, which refuses `available_node_types`)."""
        types = raw.get("available_node_types")
        if not isinstance(types, dict) or not types:
            return None
        cap = raw.get("max_workers")
        head, workers = None, []
        for name, t in types.items():
            res = {k: float(v) for k, v in ((t or {}).get("resources") or {}).items()}
            if "CPU" not in res:
                return None
            res.setdefault("GPU", 0.0)
            count = t.get("max_workers", 0 if name == raw.get("head_node_type") else cap)
            if count is None:
                return None
            if name == raw.get("head_node_type"):
                head = NodeType(name, res, 1)
            if count:
                workers.append(NodeType(name, res, int(count)))
        return cls(head, tuple(workers), cap)

    @staticmethod
    def per_node(node: NodeType, per_worker: dict[str, float]) -> int:
        """How many workers asking `per_worker` (e.g. {"CPU": 3, "GPU": 1}) one node holds."""
        return min(math.floor(node.resources.get(k, 0) / q + 1e-9)
                   for k, q in per_worker.items() if q > 0)

    def max_placeable(self, per_worker: dict[str, float]) -> int:
        """How many such workers the cluster holds at full size (each worker on one node)."""
        total = self.per_node(self.head, per_worker) if self.head else 0
        left = math.inf if self.max_workers is None else self.max_workers
        for k, count in sorted(((self.per_node(t, per_worker), t.max_count)
                                for t in self.workers), reverse=True):
            n = min(count, left)
            total, left = total + k * n, left - n
        return int(total)

    def without_gpus(self) -> ClusterShape:
        """The same cluster without its GPU node types (where CPU-only work should go)."""
        head = self.head if self.head and not self.head.resources.get("GPU") else None
        return ClusterShape(head, tuple(t for t in self.workers if not t.resources.get("GPU")),
                            self.max_workers)

    def describe(self) -> str:
        nodes = ([self.head] if self.head else []) + [t for t in self.workers if t != self.head]
        parts = [f"{t.name} ({t.resources.get('CPU', 0):g} CPU, {t.resources.get('GPU', 0):g} "
                 f"GPU) x{1 if t is self.head else t.max_count}" for t in nodes]
        cap = (f", at most {self.max_workers} worker nodes in all"
               if self.workers and self.max_workers is not None else "")
        return "; ".join(parts) + cap


def _hash(blob: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`["a.b=1", "c=x"]` -> `[("a.b", 1), ("c", "x")]`; values are parsed as YAML scalars."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"override {item!r} is not of the form key.sub=value (e.g. pretrain.epochs=2)"
            )
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        out.append((key, value))
    return out


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<config>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/ and README.md)"
        got = e.get("input")
        shown = "" if e["type"] in ("extra_forbidden", "model_type") or isinstance(
            got, dict) else f" (got {got!r})"
        lines.append(f"  {where}: {msg}{shown}")
    return "invalid configuration:\n" + "\n".join(lines)


def validate(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (the packaged default when `path` is None) and apply overrides."""
    if path is None:
        text = resources.files("orchestrator").joinpath(DEFAULT_CONFIG).read_text()
        source = f"<built-in {DEFAULT_CONFIG}>"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        text, source = p.read_text(), str(p)
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{source} must hold a mapping of sections, got {type(tree).__name__}")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return validate(tree)
