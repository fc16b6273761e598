"""The control row of every comparison: the dense model, not pruned, fine-tuned with the same
recipe as the subnets (issue 6: a short fine-tune of an under-trained dense model can erase
every difference between methods; this row shows how much fine-tuning alone gives)."""

from __future__ import annotations

from typing import Any

from torch import nn

from search_space.arch import ViTArch
from search_space.models import unwrap
from trainers.methods.base import SearchMethod, register_method


@register_method("dense_control")
class DenseControl(SearchMethod):
    trains_weights = False
    def __init__(self, cfg: Any, steps_per_epoch: int, dense_arch: ViTArch, seed: int = 0):
        super().__init__(cfg, steps_per_epoch, dense_arch, seed)
        self.target_macs = self.dense_macs  # its budget is the dense model: 100%

    def smallest_arch(self) -> None:
        return None  # the budget does not shape the control: it is the dense model

    def wrap(self, dense: nn.Module) -> nn.Module:
        return dense

    def finished(self, model: nn.Module) -> bool:
        return True

    def extract(self, model: nn.Module) -> tuple[nn.Module, ViTArch]:
        m = unwrap(model)
        return m, ViTArch.from_timm(m)
