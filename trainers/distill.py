"""Knowledge distillation from a frozen teacher, as UVC computes it (DeiT's soft loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), summed, over batch x classes.

    student, teacher: logits (B, classes); the teacher's carry no gradient."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student.float() / t, dim=-1),
                  F.log_softmax(teacher.detach().float() / t, dim=-1),
                  reduction="sum", log_target=True)
    return kl * t * t / student.numel()
