"""UVC, Unified Visual Transformer Compression (ICLR 2022): head, value-dim and neuron pruning
plus block skipping, under a MACs budget enforced by a primal-dual update (METHODS.md section 3).

Per step (after the shared loop's backward, clip, AdamW and LR step):
1. prox, every step: the groups the counts remove shrink, w /= (1 + 2 lr_w y) (heads, neurons)
   and /= (1 + 2 lr_w p) (value dims), lr_w the weights' current LR;
   the gate warm-up (`gate_warmup_epochs`, blocks at half strength, logits frozen) stops here;
2. primal: counts s, r step on y dLeastS/ds + z d clamp(R1 - B, -c, c)/ds (`primal_step`);
3. gates: logits.grad + `gate_resource_weight` z d clamp(R1 - B)/dlogits is averaged over a
   window of `gate_window` steps (cleared at each epoch start) and applied by SGD (lr 0.1,
   momentum 0.9, wd 1e-4); the logits also get the task gradient in AdamW;
4. duals: y += 1e-4 LeastS, p += 1e-4 LeastR, z += (R2 - B), each clamped at 0.
Loss: (1 - alpha) CE + alpha KD from the frozen dense model (alpha 0.1, T 1).

Decisions (METHODS.md 3 and 6b): value dims only (q, k keep full width); R from the shared
counter's formula (corrected qkv term); c = max(0.5, 1 - B), recorded with the trial when it is
not the published 0.5; the Gumbel draws (forward, R1, R2) come from a generator seeded by
(seed, step), so every worker takes the same decision (published: each rank its own noise);
the gate window is a plain mean of the gradients it holds (inferred from "weight t mod 50");
z is clamped at 0 like y and p (the objective's max over z >= 0); the weights' recipe (lr,
schedule, weight decay) is the sweep's shared one, and the gate logits follow the shared
weight-decay policy (not decayed; published: wd 0.05 on every parameter). Gradient clipping
1.0 is published (`search.uvc.grad_clip`); `search.grad_clip`, if set, overrides it.
Options of ours: `count_step: fraction` (the primal rule on s / ub, METHODS.md 3) and
`width_multiple` (the export's widths rounded to a multiple, search_space/widths.py).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from search_space.arch import BlockArch, ViTArch
from search_space.cost import cost_of, count_macs, count_params
from search_space.models import unwrap
from search_space.uvc.extract import extract_subnet, plan_of, round_plan
from search_space.uvc.primal_dual import (
    dual_ascent,
    gate_probs,
    least_s,
    primal_step,
    prox_factors,
    resource_clamp,
    ste_ceil,
)
from search_space.uvc.resource import resource_ratio
from search_space.uvc.searchable import UVCViT, gumbel_noise
from trainers.distill import soft_kd
from trainers.methods.base import SearchMethod, register_method
from trainers.optim import decay_groups
from trainers.sections import Section


class UVCOptions(Section):
    """`search.uvc.*`: published constants (UVC/uvc_utils.py, joint_train.py, run_uvc_train.sh)."""

    ADDITIONS: ClassVar[dict[str, Any]] = {"count_step": "count", "width_multiple": 1}

    gate_warmup_epochs: float = Field(1, ge=0, description="blocks at half strength, gate "
                                      "logits frozen, no primal-dual step (published: 5 of 31 "
                                      "epochs)")
    count_step: Literal["count", "fraction"] = Field(
        "count", description="primal step on the counts (published) or, ours, on count / upper "
        "bound (any count can cross its range in 1 / primal_lr steps)")
    primal_lr: float = Field(0.02, gt=0, description="SGD lr of the counts s, r")
    dual_lr: float = Field(1e-4, gt=0, description="ascent step of y and p")
    z_lr: float = Field(1.0, gt=0, description="ascent step of z (the resource dual)")
    gate_tau: float = Field(0.5, gt=0, description="Gumbel-softmax temperature")
    gate_lr: float = Field(0.1, gt=0)
    gate_momentum: float = Field(0.9, ge=0, lt=1)
    gate_weight_decay: float = Field(1e-4, ge=0)
    gate_window: int = Field(50, ge=1, description="steps averaged per gate SGD step")
    gate_resource_weight: float = Field(5e-4, ge=0, description="weight of z dR/dlogits in "
                                        "the gate gradient")
    kd_alpha: float = Field(0.1, ge=0, le=1, description="(1 - alpha) CE + alpha KD")
    kd_temperature: float = Field(1.0, gt=0)
    grad_clip: float | None = Field(1.0, gt=0, description="published gradient-norm clip; "
                                    "search.grad_clip overrides it")
    width_multiple: int = Field(1, ge=1, description="ours: the export rounds each head's "
                                "value dims and each block's MLP neurons to the nearest multiple "
                                "of this (then down where it would cost more MACs than the "
                                "budget); 1 = as published")


@register_method("uvc")
class UVC(SearchMethod):
    section = "uvc"
    Options = UVCOptions

    def __init__(self, cfg: Any, steps_per_epoch: int, dense_arch: ViTArch, seed: int = 0):
        super().__init__(cfg, steps_per_epoch, dense_arch, seed)
        self.warmup_steps = int(self.opts.gate_warmup_epochs * steps_per_epoch)
        self.budget = self.target_macs / self.dense_macs
        self.clamp = resource_clamp(self.budget)
        self.teacher: nn.Module | None = None
        self.step = 0
        self.gate_opt: torch.optim.SGD | None = None
        self._gate_opt_state: dict[str, Any] | None = None  # restored, loaded at first use
        self.window: torch.Tensor | None = None  # sum of gate gradients in the open window
        self.window_n = 0
        self._noise: torch.Tensor | None = None

    # --- the contract ---------------------------------------------------------------------------
    def setup(self, device: torch.device) -> None:
        super().setup(device)
        if self.teacher is not None:
            self.teacher.to(device)

    def wrap(self, dense: nn.Module) -> UVCViT:
        self.teacher = copy.deepcopy(dense).eval().requires_grad_(False).to(self.device)
        sn = UVCViT(dense)
        sn.tau = self.opts.gate_tau
        return sn

    def grad_clip(self) -> float | None:
        return self.cfg.grad_clip or self.opts.grad_clip

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        sn: UVCViT = unwrap(model)
        return decay_groups(sn.named_parameters(), self.cfg.weight_decay,
                            no_decay=[sn.gate_logits])

    def forward(self, model: nn.Module, images: torch.Tensor, step: int):
        sn: UVCViT = unwrap(model)
        self.step = step
        # three draws per step, the same on every worker: the forward's gates, R1, R2
        self._noise = gumbel_noise((3, *sn.gate_logits.shape), self.seed * 1_000_003 + step,
                                   self.device)
        sn.half_strength = step < self.warmup_steps
        sn.gate_noise = self._noise[0]
        return model(images), None

    def losses(self, model, images, targets, logits, aux, step) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher = self.teacher(images)
        a = self.opts.kd_alpha
        return {"ce": (1 - a) * self.task_loss(logits, targets),
                "kd": a * soft_kd(logits, teacher, self.opts.kd_temperature)}

    def after_step(self, model, step, optimizer) -> bool:
        sn: UVCViT = unwrap(model)
        lr_w = optimizer.param_groups[0]["lr"]
        imp = sn.importance()
        sn.shrink_(*prox_factors(imp.c, imp.a, imp.n, sn.s, sn.r, sn.y, sn.p, lr_w))
        if step < self.warmup_steps:
            return False
        noise = self._noise if self._noise is not None else gumbel_noise(
            (3, *sn.gate_logits.shape), self.seed * 1_000_003 + step, self.device)
        g_s, g_r, g_gate = self._primal_grads(sn, noise[1])
        frac = self.opts.count_step == "fraction"
        with torch.no_grad():
            ub_s = torch.cat([torch.full_like(sn.s[:, :1], sn.H),
                              torch.full_like(sn.s[:, 1:], sn.h)], dim=1)
            sn.s.copy_(primal_step(sn.s, g_s, ub_s, self.opts.primal_lr, frac))
            sn.r.copy_(primal_step(sn.r, g_r, torch.full_like(sn.r, sn.d), self.opts.primal_lr,
                                   frac))
        self._gate_step(sn, step, g_gate)
        self._dual_step(sn, noise[2])
        return False

    def finished(self, model: nn.Module) -> bool:
        return False  # runs search.epochs, as published (31 epochs on ImageNet)

    def finalize(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
        m = self.metrics(model)
        return (f"blocks kept {m['kept_blocks']} of {self.dense_arch.depth}; pruned "
                f"{m['heads_pruned']} heads, {m['v_dims_pruned']} value dims and "
                f"{m['neurons_pruned']} MLP neurons; {m['params_fraction']:.1%} of the dense "
                f"parameters, {m['current_macs'] / self.dense_macs:.1%} of its MACs")

    def extract(self, model: nn.Module):
        sn: UVCViT = unwrap(model)
        plan, m = plan_of(sn), self.opts.width_multiple
        if m > 1:
            limit = max(self.target_macs, count_macs(plan.arch(self.dense_arch)))
            plan = round_plan(plan, sn.importance(), m, self.dense_arch, limit)
        return extract_subnet(sn, plan)

    def smallest_arch(self) -> ViTArch:
        """One block runs (hard gates never skip them all), keeping one head (q, k at full
        head_dim) with one value dim and one MLP neuron."""
        a = self.dense_arch
        return replace(a, blocks=(BlockArch(1, a.blocks[0].head_dim, 1, v_dims=(1,)),))

    def additions(self) -> dict[str, Any]:
        used = super().additions()
        if self.clamp != 0.5:  # METHODS.md 6b: budgets below 0.5 need a wider clamp to move
            used["uvc.resource_clamp"] = round(self.clamp, 6)
        if self.cfg.grad_clip is None:  # the published clip is not an addition
            used.pop("grad_clip", None)
        return used

    # --- the primal-dual pieces -----------------------------------------------------------------
    def _primal_grads(self, sn: UVCViT, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """d/ds, d/dr of y LeastS + p LeastR + z clamp(R1 - B), and z d clamp(R1 - B)/dlogits."""
        imp = sn.importance()
        with torch.enable_grad():
            s = sn.s.detach().clone().requires_grad_()
            r = sn.r.detach().clone().requires_grad_()
            logits = sn.gate_logits.detach().float().clone().requires_grad_()
            run = gate_probs(logits, noise, sn.tau)[:, 1]
            r1 = resource_ratio(sn.dense_arch, s, r, imp.a, run)
            resource = sn.z[0] * (r1 - self.budget).clamp(-self.clamp, self.clamp)
            obj = (sn.y[:, 0] * least_s(ste_ceil(s[:, 0]), imp.a)).sum() \
                + (sn.y[:, 1] * least_s(ste_ceil(s[:, 1]), imp.n)).sum() \
                + (sn.p * least_s(ste_ceil(r), imp.c)).sum() + resource
            return torch.autograd.grad(obj, [s, r, logits])

    @torch.no_grad()
    def _gate_step(self, sn: UVCViT, step: int, g_resource: torch.Tensor) -> None:
        t = step % self.steps_per_epoch  # completed steps in this epoch
        if t == 0 or self.window is None:
            self.window, self.window_n = torch.zeros_like(sn.gate_logits), 0
        task = sn.gate_logits.grad
        g = self.opts.gate_resource_weight * g_resource.to(sn.gate_logits.dtype)
        self.window = self.window.to(sn.gate_logits.device, non_blocking=True) + g + (
            0 if task is None else task)
        self.window_n += 1
        if (t + 1) % self.opts.gate_window:
            return
        opt = self._gate_optimizer(sn)
        sn.gate_logits.grad = self.window / self.window_n
        opt.step()
        sn.gate_logits.grad = None
        self.window, self.window_n = torch.zeros_like(sn.gate_logits), 0

    def _gate_optimizer(self, sn: UVCViT) -> torch.optim.SGD:
        if self.gate_opt is None:  # built at first use, next to the logits on their device
            o = self.opts
            self.gate_opt = torch.optim.SGD([sn.gate_logits], lr=o.gate_lr,
                                            momentum=o.gate_momentum,
                                            weight_decay=o.gate_weight_decay)
            if (st := self._gate_opt_state) is not None:  # restored on the CPU: move it
                dev = sn.gate_logits.device                   # without a blocking upload
                self.gate_opt.load_state_dict({**st, "state": {
                    k: {n: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v
                        for n, v in ps.items()} for k, ps in st["state"].items()}})
        return self.gate_opt

    @torch.no_grad()
    def _dual_step(self, sn: UVCViT, noise: torch.Tensor) -> None:
        imp, o = sn.importance(), self.opts
        sn.y[:, 0] = dual_ascent(sn.y[:, 0], least_s(torch.ceil(sn.s[:, 0]), imp.a), o.dual_lr)
        sn.y[:, 1] = dual_ascent(sn.y[:, 1], least_s(torch.ceil(sn.s[:, 1]), imp.n), o.dual_lr)
        sn.p.copy_(dual_ascent(sn.p, least_s(torch.ceil(sn.r), imp.c), o.dual_lr))
        run = gate_probs(sn.gate_logits.float(), noise, sn.tau)[:, 1]
        r2 = resource_ratio(sn.dense_arch, sn.s, sn.r, imp.a, run)
        sn.z.copy_(dual_ascent(sn.z, r2 - self.budget, o.z_lr))

    # --- reporting and state --------------------------------------------------------------------
    def metrics(self, model: nn.Module) -> dict[str, Any]:
        sn: UVCViT = unwrap(model)
        plan = plan_of(sn)
        arch = plan.arch(self.dense_arch)
        L, H, d, h = self.dense_arch.depth, sn.H, sn.d, sn.h
        with torch.no_grad():
            run = gate_probs(sn.gate_logits.float(), None, sn.tau)[:, 1]
            expected = resource_ratio(sn.dense_arch, sn.s, sn.r, sn.importance().a, run)
        kept_h = sum(len(x) for x in plan.heads)
        return {
            "target_macs": self.target_macs,
            "current_macs": cost_of(arch).macs,
            "expected_macs": float(expected) * self.dense_macs,
            "params_fraction": count_params(arch) / count_params(self.dense_arch),
            "kept_blocks": ",".join(map(str, plan.run)),
            "blocks_skipped": L - len(plan.run),
            "heads_pruned": len(plan.run) * H - kept_h,
            "v_dims_pruned": kept_h * d - sum(len(x) for hs in plan.dims for x in hs),
            "neurons_pruned": len(plan.run) * h - sum(len(x) for x in plan.neurons),
            "z": float(sn.z[0]), "gate_run_prob_mean": float(run.mean()),
            "s_heads_mean": float(sn.s[:, 0].mean()), "s_mlp_mean": float(sn.s[:, 1].mean()),
            "r_mean": float(sn.r.mean()),
        }

    def state_dict(self) -> dict[str, Any]:
        opt = self.gate_opt.state_dict() if self.gate_opt is not None else self._gate_opt_state
        return {"step": self.step, "window_n": self.window_n,
                "window": None if self.window is None else self.window.detach().cpu(),
                "gate_opt": opt}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.window_n = int(state["step"]), int(state["window_n"])
        self.window = state["window"]
        self._gate_opt_state, self.gate_opt = state["gate_opt"], None
