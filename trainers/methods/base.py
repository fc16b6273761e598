"""The one small interface every compression method implements, and its registry.

The search loop (trainers/search.py) is shared: it calls these hooks and never asks which
method it runs. Required: `wrap`, `finished`, `extract`. Everything else has a default.

A complete minimal method (magnitude-free "keep the dense model", useful as a control)::

    @register_method("dense_control")
    class DenseControl(SearchMethod):
        def wrap(self, dense):
            return dense

        def finished(self, model):
            return True

        def extract(self, model):
            return model, ViTArch.from_timm(model)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from search_space.arch import ViTArch

_METHODS: dict[str, type[SearchMethod]] = {}


class SearchMethod:
    """Hooks of one compression method. `cfg` is the `search` config section."""

    name: ClassVar[str] = ""

    def __init__(self, cfg: Any, steps_per_epoch: int, dense_arch: ViTArch):
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.dense_arch = dense_arch

    # --- required ------------------------------------------------------------------------
    def wrap(self, dense: nn.Module) -> nn.Module:
        """The trainable search model built around the (pretrained) dense ViT."""
        raise NotImplementedError

    def finished(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def extract(self, model: nn.Module) -> tuple[nn.Module, ViTArch]:
        """The physically smaller subnet and its architecture."""
        raise NotImplementedError

    # --- optional hooks --------------------------------------------------------------------
    target_macs: float | None = None  # what the method aims at (reported with the subnet)

    def max_steps(self) -> int | None:
        """Steps the search needs at most (None: `search.epochs` decides). Two-stage scoring
        needs a few batches, a control none."""
        return None

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def forward(self, model: nn.Module, images: torch.Tensor, step: int) -> tuple[Any, Any]:
        """(logits, aux) for one batch; aux goes to `extra_loss`."""
        return model(images), None

    def extra_loss(self, model: nn.Module, images: torch.Tensor, logits: torch.Tensor,
                   aux: Any, ce: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def after_step(self, model: nn.Module, step: int,
                   optimizer: torch.optim.Optimizer) -> bool:
        """Per-step work (elimination, ...). True if parameters changed shape or trainability,
        so the loop must rebuild its DDP wrapper."""
        return False

    def finalize(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
        """Force a decision when the epoch cap is reached; returns a note for the user."""
        return ""

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        return {}

    def restore(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a checkpointed state dict into a freshly wrapped model."""
        model.load_state_dict(state)


def register_method(name: str) -> Callable[[type[SearchMethod]], type[SearchMethod]]:
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
