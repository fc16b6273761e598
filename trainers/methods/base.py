"""The one contract every compression method implements, and its registry.

The search loop (trainers/search.py) is shared: it calls these hooks in a fixed order and never
asks which method it runs. Call order on every worker::

    m = Method(search_cfg, steps_per_epoch, dense_arch, seed)  # options: search_cfg.<section>
    m.setup(device)                          # the worker's device (e.g. a teacher moves there)
    model = m.wrap(dense)                    # the trainable search model around the dense ViT
    if resuming:                             # from the last epoch checkpoint
        m.load_state_dict(method_state)      #   the method's own state first,
        m.restore(model, weights)            #   then the model's weights (may reshape it)
    optimizer = AdamW(m.param_groups(model)) # trainers/optim.py: one weight-decay policy
    while not m.finished(model) and epochs remain:
        for each step:
            logits, aux = m.forward(model, images, step)
            terms = m.losses(model, images, targets, logits, aux, step)  # every term, weighted
            sum(terms).backward(); clip to m.grad_clip(); optimizer.step(); scheduler.step()
            if m.after_step(model, step, optimizer): rebuild DDP (shapes changed)
        checkpoint: model.state_dict() + m.state_dict(); report m.metrics(model)
    note = m.finalize(model, optimizer)      # force a decision at the epoch cap
    subnet, arch = m.extract(model)          # physically smaller, exported as arch.json

Required: `wrap`, `finished`, `extract`; every other hook has a default. A complete minimal
method (the dense model itself, a control)::

    @register_method("keep_dense")
    class KeepDense(SearchMethod):
        def wrap(self, dense):
            return dense

        def finished(self, model):
            return True

        def extract(self, model):
            m = unwrap(model)
            return m, ViTArch.from_timm(m)

A method with options declares `section = "name"` and `Options`, a `trainers.sections.Section`
subclass; the config then validates `search.<section>.*` with it, and `self.opts` holds them.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from search_space.arch import BlockArch, ViTArch
from search_space.cost import count_macs
from search_space.models import unwrap
from trainers.optim import decay_groups
from trainers.sections import Section

_METHODS: dict[str, type[SearchMethod]] = {}


class SearchMethod(abc.ABC):
    """Hooks of one compression method. `cfg` is the validated `search` config section."""

    name: ClassVar[str] = ""
    section: ClassVar[str | None] = None  # config section search.<section>, None: no options
    Options: ClassVar[type[Section] | None] = None
    ddp_kwargs: ClassVar[dict[str, Any]] = {}  # extra DistributedDataParallel keywords
    # what `search.budget` may be a fraction of (`search.budget_metric`): MACs always; a method
    # that can aim at a measured latency table lists "latency" and reads `self.latency`
    budget_metrics: ClassVar[tuple[str, ...]] = ("macs",)

    def __init__(self, cfg: Any, steps_per_epoch: int, dense_arch: ViTArch, seed: int = 0):
        self.cfg = cfg
        self.seed = seed  # the trial's seed, the same on every worker (seeds shared draws)
        self.opts = getattr(cfg, self.section) if self.section else None
        self.steps_per_epoch = steps_per_epoch
        self.dense_arch = dense_arch
        self.dense_macs = count_macs(dense_arch)
        self.target_macs: float | None = (cfg.target_gmacs * 1e9 if cfg.target_gmacs
                                          else cfg.budget * self.dense_macs)
        self.device = torch.device("cpu")
        self.latency = None  # the LatencyTable when the budget is a latency (ms per batch)
        if getattr(cfg, "budget_metric", "macs") == "latency":
            from search_space.latency import LatencyTable

            self.latency = LatencyTable.load(cfg.latency_table)
            self.dense_latency = self.latency.of_arch(dense_arch)
            self.target_latency = cfg.budget * self.dense_latency

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse a `search` config this method cannot run (a ValueError naming the keys),
        when the config is validated: before Ray starts."""
        metric = getattr(cfg, "budget_metric", "macs")
        if metric not in cls.budget_metrics:
            raise ValueError(f"search.budget_metric={metric!r} is not supported by "
                             f"search.method={cls.name!r}; it supports {list(cls.budget_metrics)}")

    # --- the budget's range ----------------------------------------------------------------
    def smallest_arch(self) -> ViTArch | None:
        """The smallest subnet this method can reach from `dense_arch`: its budget floor,
        checked before Ray starts (`check_budget`). None: no floor is known or the budget does
        not shape the subnet. Default: every block keeps one head of one dim and one MLP unit,
        the embedding whole."""
        return replace(self.dense_arch, blocks=tuple(BlockArch(1, 1, 1)
                                                     for _ in self.dense_arch.blocks))

    def check_budget(self) -> None:
        """Refuse a target below the smallest reachable subnet or above the dense model (a
        ValueError naming the value and the allowed range), in the budget's unit."""
        small = self.smallest_arch()
        if small is None:
            return
        if self.latency is not None:
            fmt = "{:.3f} ms per batch".format
            floor, dense = self.latency.of_arch(small), self.dense_latency
            target = self.target_latency
        else:
            fmt = lambda m: f"{m / 1e6:.3f} M MACs"  # noqa: E731
            floor, dense, target = count_macs(small), self.dense_macs, self.target_macs
        asked = (f"search.target_gmacs={self.cfg.target_gmacs:g}" if self.cfg.target_gmacs
                 else f"search.budget={self.cfg.budget:g}")
        lo = math.ceil(floor / dense * 1000) / 1000
        allowed = (f"search.target_gmacs in [{floor / 1e9:.6g}, {dense / 1e9:.6g}]"
                   if self.cfg.target_gmacs else f"search.budget in [{lo:g}, 1]")
        if target < floor:
            raise ValueError(
                f"{asked} asks for {fmt(target)}, below the smallest subnet "
                f"search.method={self.name!r} can reach from this model ({fmt(floor)}, "
                f"{floor / dense:.1%} of the dense {fmt(dense)}); allowed: {allowed}")
        if target > dense * (1 + 1e-9):
            raise ValueError(f"{asked} asks for {fmt(target)}, above the dense model's "
                             f"{fmt(dense)}; allowed: {allowed}")

    # --- required ------------------------------------------------------------------------
    @abc.abstractmethod
    def wrap(self, dense: nn.Module) -> nn.Module:
        """The trainable search model built around the (pretrained) dense ViT."""

    @abc.abstractmethod
    def finished(self, model: nn.Module) -> bool:
        """True once the method has decided its subnet (the loop stops early)."""

    @abc.abstractmethod
    def extract(self, model: nn.Module) -> tuple[nn.Module, ViTArch]:
        """The physically smaller subnet and its architecture."""

    # --- optional hooks --------------------------------------------------------------------
    def setup(self, device: torch.device) -> None:
        """Called once on the worker, before `wrap`: the device the model will train on."""
        self.device = device

    def grad_clip(self) -> float | None:
        """Gradient-norm clip the loop applies (`search.grad_clip`; a method whose published
        search clips may default to its own)."""
        return self.cfg.grad_clip

    def min_lr(self) -> float:
        """The LR the search's cosine decays to (`search.min_lr`; = `search.lr`: constant)."""
        return self.cfg.min_lr

    def max_steps(self) -> int | None:
        """Steps the search needs at most (None: `search.epochs` decides)."""
        return None

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """AdamW groups under the shared weight-decay policy (trainers/optim.py)."""
        return decay_groups(unwrap(model).named_parameters(), self.cfg.weight_decay)

    def forward(self, model: nn.Module, images: torch.Tensor, step: int) -> tuple[Any, Any]:
        """(logits, aux) for one batch; aux goes to `losses`."""
        return model(images), None

    def losses(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
               logits: torch.Tensor, aux: Any, step: int) -> dict[str, torch.Tensor]:
        """Every term of the loss, each with its weight applied; the loop sums them. The task
        loss is a term like any other ("ce" here), so a method may reweight or replace it."""
        return {"ce": self.task_loss(logits, targets)}

    def task_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.cfg.label_smoothing)

    def after_step(self, model: nn.Module, step: int,
                   optimizer: torch.optim.Optimizer) -> bool:
        """Per-step work (elimination, ...). True if parameters changed shape or trainability,
        so the loop must rebuild its DDP wrapper."""
        return False

    # how many modules `finalize` decided by argmax at the epoch cap (recorded with the trial)
    decided_by_argmax: int = 0
    # False: the search leaves the weights untrained (scoring only, the control); under the
    # equal-training rule its fine-tune then runs `search.epochs` longer, so that in a
    # comparison every method's weights get the same number of training epochs
    trains_weights: bool = True

    def finalize(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
        """Force a decision when the epoch cap is reached (setting `decided_by_argmax`);
        returns a note for the user."""
        return ""

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        return {"target_macs": self.target_macs}

    def additions(self) -> dict[str, Any]:
        """Our additions to the published method that this trial uses: option -> value.

        An `Options` schema lists its non-published options with their off values in
        `ADDITIONS`; gradient clipping (none in any published search) counts for every method.
        The search records them with the trial, so a comparison can say "OFB + budget
        tolerance" instead of "OFB"."""
        off = getattr(self.Options, "ADDITIONS", {}) if self.opts is not None else {}
        used = {f"{self.section}.{k}": getattr(self.opts, k) for k, v in off.items()
                if getattr(self.opts, k) != v}
        if self.cfg.grad_clip:
            used["grad_clip"] = self.cfg.grad_clip
        if getattr(self.cfg, "budget_metric", "macs") != "macs":
            used["budget_metric"] = self.cfg.budget_metric
        return used

    def restore(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Load checkpointed weights into a freshly wrapped model."""
        unwrap(model).load_state_dict(weights)

    def state_dict(self) -> dict[str, Any]:
        """The method's own state (tensors, numbers, strings), saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; called after `setup` and `wrap`, before `restore`."""
        return None


def register_method(name: str) -> Callable[[type[SearchMethod]], type[SearchMethod]]:
    """Class decorator: register a method under `name` (refuses duplicates)."""
    def deco(cls: type[SearchMethod]) -> type[SearchMethod]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name]}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type[SearchMethod]:
    if name not in _METHODS:
        raise ValueError(f"search.method={name!r}; allowed: {list_methods()}")
    return _METHODS[name]


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_sections() -> dict[str, type[Section]]:
    """Config section name -> options schema, over every registered method (methods may share
    a section, e.g. the two two-stage pruners, but then with one schema)."""
    out: dict[str, type[Section]] = {}
    for name in list_methods():
        cls = _METHODS[name]
        if cls.section is None:
            continue
        if cls.Options is None:
            raise TypeError(f"method {name!r} names section {cls.section!r} but no Options")
        if out.setdefault(cls.section, cls.Options) is not cls.Options:
            raise TypeError(f"section search.{cls.section} has two schemas")
    return out


def section_of(method: str) -> str | None:
    return get_method(method).section
