"""OFB, Once for Both (CVPR 2024): importance and sparsity searched in one stage.

Loss per step (METHODS.md section 1):
    CE + sum_m w_m [one-hot(p_m) + c_m sum sigmoid(S_m)]
       + w_flops ((F(alpha) - F_target) / F_dense)^2 + stopgrad(CE / L_rec) L_rec   (PMIM)

Schedules are per step: lambda 0.99 -> 0.1 and the PMIM mask ratio 0.05 -> `mask_ratio` over the
warm-up, then held; the ratio drops to 0 (decoder frozen) when every module is finished.

Defaults are the published code's (METHODS.md section 1): elimination every
len(loader) // `eliminations_per_epoch` steps from step 0 whatever the MACs, alpha's Adam state
reset at every elimination, alpha at the weights' lr, a fixed MACs-loss weight, the one-hot loss
always on, one-hot temperature 1, no gradient clipping (`search.grad_clip: null`).

Our additions, each off by default and recorded with the trial when used (`additions()`):
- `alpha_lr`: alpha's own lr (short searches on small models converge faster with a higher
  one).
- `defer_elimination`: elimination waits until the ramp (`ramp_epochs`, the lambda and
  mask-ratio warm-up) ends; during it lambda ~ 1, so the masks barely depend on alpha yet.
- `macs_tolerance`, "budget first": while the expected MACs are above the target or more than
  the tolerance (x dense MACs) below it (one-sided: a comparison never gets a subnet above its
  budget from it), elimination waits, the MACs-loss weight grows 1% per step
  (relaxing back to `macs_loss_weight` inside) and the one-hot term is held back. The
  published 100-epoch schedule gives the MACs loss time to act before the one-hot loss
  saturates the softmax; in short searches the one-hot loss can lock modules in above the
  budget (measured on a tiny ViT at a 30% budget: 1.12-1.37x the target for MACs-loss weights
  5 to 50; a two-sided 2% tolerance met 0.5 and 0.3 budgets at 0.96-1.05x).
- `temperature` other than 1: divides alpha in the one-hot loss only.
- `cap_within_budget`: modules still undecided at the epoch cap take the most probable choice
  within the budget (and the `macs_tolerance` band, if set) instead of each its argmax
  (search_space/ofb/cap.py).

Other decisions: before each elimination alpha is averaged over workers and S broadcast from
rank 0, so every worker slices identically. Three AdamW groups as published (weights + S,
alpha with betas 0.5/0.999, decoder + mask token), weight decay by the shared policy
(trainers/optim.py: S, alpha, the mask token and biases not decayed; published: alpha and the
decoder bias decayed). At the epoch cap every unfinished module takes its argmax candidate (or, with
`cap_within_budget`, the choice above), and the note and `argmax_modules` say how many.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn

from search_space.arch import ViTArch
from search_space.cost import count_macs
from search_space.models import unwrap
from search_space.ofb import bimask, pmim
from search_space.ofb.cap import choose_within_budget
from search_space.ofb.extract import extract_subnet
from search_space.ofb.modules import smallest_arch
from search_space.ofb.supernet import SearchableViT
from trainers.methods.base import SearchMethod, register_method
from trainers.optim import decay_groups
from trainers.sections import Section


class OFBOptions(Section):
    """`search.ofb.*` (METHODS.md section 1; fewer epochs for small models)."""

    # ours, not published: recorded with a trial that changes them from these values
    ADDITIONS: ClassVar[dict[str, Any]] = {
        "alpha_lr": None, "defer_elimination": False, "macs_tolerance": None, "temperature": 1.0,
        "embed_mask_on_branches": False, "freeze_finished": False, "cap_within_budget": False,
        "width_multiple": 1}

    ramp_epochs: float = Field(1, ge=0, description="lambda 0.99 -> 0.1 and PMIM mask-ratio "
                               "ramp (published: 20 of 100 epochs)")
    alpha_lr: float | None = Field(None, gt=0, description="ours: alpha's own lr; null = the "
                                   "weights' lr (published)")
    defer_elimination: bool = Field(False, description="ours: eliminate only after the ramp; "
                                    "published: from step 0")
    freeze_finished: bool = Field(False, description="ours: a finished module's scale stays "
                                  "fixed; published: it trains (no L1) until the export")
    embed_mask_on_branches: bool = Field(False, description="ours: the embedding mask also on "
                                         "every attention/MLP output; published: only where "
                                         "tokens enter")
    temperature: float = Field(1.0, gt=0, description="ours: one-hot temperature, softmax(alpha"
                               " / T) in the one-hot loss only; 1 = published")
    width_multiple: int = Field(1, ge=1, description="only candidate widths that are multiples"
                                " of this (8: hardware-friendly); 1 = the published lists")
    mask_ratio: float = Field(0.25, ge=0, lt=1, description="PMIM ratio after the ramp")
    mask_ratio_start: float = Field(0.05, ge=0, lt=1)
    lambda_start: float = Field(0.99, ge=0, le=1)
    lambda_end: float = Field(0.1, ge=0, le=1)
    macs_loss_weight: float = Field(5.0, ge=0)
    macs_tolerance: float | None = Field(
        None, gt=0, description="ours, 'budget first': decide only while target - this x dense "
        "MACs <= expected MACs <= target, with an adaptive MACs-loss weight; null = always, "
        "weight fixed (published)")
    cap_within_budget: bool = Field(False, description="ours: at the epoch cap, undecided "
                                    "modules take the most probable choice within the budget "
                                    "(search_space/ofb/cap.py); published: each its argmax")
    eliminations_per_epoch: int = Field(3, ge=1)
    elimination_factor: float = Field(0.2, gt=0, lt=1)


def _one_hot(m: Any, index: int) -> torch.Tensor:
    """A choice of candidate `index` as a distribution over the module's candidates."""
    p = torch.zeros_like(m.alpha.detach())
    p[index] = 1.0
    return p


@register_method("ofb")
class OFB(SearchMethod):
    section = "ofb"
    Options = OFBOptions
    budget_metrics = ("macs", "latency")


    def __init__(self, cfg: Any, steps_per_epoch: int, dense_arch: ViTArch, seed: int = 0):
        super().__init__(cfg, steps_per_epoch, dense_arch, seed)
        o = self.opts
        self.warmup_steps = int(o.ramp_epochs * steps_per_epoch)
        self.elim_every = max(1, steps_per_epoch // o.eliminations_per_epoch)
        self.step = 0
        self.macs_weight = o.macs_loss_weight  # adaptive; checkpointed with the method's state

    # --- schedules ---------------------------------------------------------------------------
    def lam(self, step: int) -> float:
        return bimask.linear_schedule(step, self.warmup_steps, self.opts.lambda_start,
                                      self.opts.lambda_end)

    def mask_ratio(self, step: int, model: nn.Module) -> float:
        if unwrap(model).is_finished:
            return 0.0
        return bimask.linear_schedule(step, self.warmup_steps, self.opts.mask_ratio_start,
                                      self.opts.mask_ratio)

    # --- interface ---------------------------------------------------------------------------
    @property
    def pmim_on(self) -> bool:
        return self.opts.mask_ratio > 0 or self.opts.mask_ratio_start > 0

    def wrap(self, dense: nn.Module) -> SearchableViT:
        sn = SearchableViT(dense, self.opts.width_multiple, self.opts.embed_mask_on_branches,
                           self.opts.freeze_finished)
        if not self.pmim_on:  # PMIM off: the decoder and mask token would never get gradients
            sn.freeze_decoder()
        return sn

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        sn: SearchableViT = unwrap(model)
        wd, lr = self.cfg.weight_decay, self.cfg.lr
        alpha, S, dec = sn.arch_params(), sn.importance_params(), sn.decoder_params()
        special = {id(p) for p in (*alpha, *dec)}
        weights = [(n, p) for n, p in sn.named_parameters() if id(p) not in special]
        dec_ids = {id(p) for p in dec}
        return [
            *decay_groups(weights, wd, no_decay=[*S, *sn.scale_params()], lr=lr),
            {"params": alpha, "lr": self.opts.alpha_lr or lr, "weight_decay": 0.0,
             "betas": (0.5, 0.999), "name": "alpha"},
            *decay_groups([(n, p) for n, p in sn.named_parameters() if id(p) in dec_ids], wd,
                          name="decoder", lr=lr),
        ]

    def forward(self, model: nn.Module, images: torch.Tensor, step: int):
        self.step = step
        sn: SearchableViT = unwrap(model)
        sn.set_schedule(self.lam(step), self.opts.temperature)
        ratio = self.mask_ratio(step, model)
        if ratio <= 0 and not any(p.requires_grad for p in sn.decoder_params()):
            return model(images), None
        # a step at ratio 0 with a trainable decoder (e.g. mask_ratio_start=0) still runs it,
        # on no masked patch: zero gradients, but gradients, which DDP needs from every
        # parameter at every step
        n = sn.dense_arch.num_patches
        patch_mask = pmim.random_patch_mask(images.shape[0], n, ratio, images.device)
        logits, recon = model(images, patch_mask)
        return logits, (patch_mask, recon)

    def losses(self, model, images, targets, logits, aux, step) -> dict[str, torch.Tensor]:
        ce = self.task_loss(logits, targets)
        sn: SearchableViT = unwrap(model)
        terms = sn.pop_terms()  # this step's p and sigmoid(S), shared with its forward
        if sn.is_finished:
            return {"ce": ce}
        tol = self.opts.macs_tolerance
        # with the one-sided band [target - tol, target] the MACs loss aims at its middle
        expected, target, dense = self._budget(sn, terms)
        rel = (expected - (target - (tol or 0.0) / 2 * dense)) / dense
        on_budget = 1.0
        if tol is not None:  # outside the band the MACs weight grows, inside it relaxes
            # kept on the device (0-d tensors): deciding on the host would stall every step
            on = rel.detach().abs() <= tol / 2  # = inside [target - tol, target]
            w0, w = self.opts.macs_loss_weight, self.macs_weight
            if not torch.is_tensor(w):  # after init or a restore: a fill, not a host copy
                w = torch.full_like(rel.detach(), w)
            self.macs_weight = torch.where(on, torch.clamp(w / 1.01, min=w0),
                                           torch.clamp(w * 1.01, max=w0 * 1000))
            on_budget = on.to(rel.dtype)
        search = sn.search_loss(on_budget, terms)
        out = {"ce": ce, "search": search, "macs": self.macs_weight * rel**2}
        if aux is not None:
            patch_mask, recon = aux
            rec = pmim.reconstruction_loss(recon, images, patch_mask, sn.dense_arch.patch_size)
            out["pmim"] = pmim.weighted(ce, rec)
        return out

    def _budget(self, sn: SearchableViT, terms: Any = None) -> tuple[torch.Tensor, float, float]:
        """(expected cost, target, dense cost) in the budget's unit: MACs, or ms per batch from
        the latency table (`search.budget_metric`); the MACs loss, its tolerance band and
        elimination's budget check all use these, so a latency budget steers the same way."""
        if self.latency is not None:
            return (sn.expected_latency(self.latency, terms), *self._target())
        return (sn.expected_macs(terms), *self._target())

    def _target(self) -> tuple[float, float]:
        """(target, dense cost) in the budget's unit."""
        if self.latency is not None:
            return self.target_latency, self.dense_latency
        return self.target_macs, self.dense_macs

    @torch.no_grad()
    def _sync(self, sn: SearchableViT) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size()
        for m in sn.searchable():
            if m.is_finished:
                continue
            dist.all_reduce(m.alpha.data)
            m.alpha.data /= world
            dist.broadcast(m.S.data, src=0)

    def after_step(self, model, step, optimizer) -> bool:
        if (step + 1) % self.elim_every or (self.opts.defer_elimination
                                            and step < self.warmup_steps):
            return False
        sn: SearchableViT = unwrap(model)
        if sn.is_finished:
            return False
        self._sync(sn)
        # published: alpha's Adam state starts afresh at every elimination tick (its second
        # moment would otherwise remember the one-hot loss's large early gradients for ~1000
        # steps and freeze alpha once that loss is held back or has done its work)
        for m in sn.searchable():
            optimizer.state.pop(m.alpha, None)
        tol = self.opts.macs_tolerance
        if tol is not None:
            with torch.no_grad():
                expected, target, dense = self._budget(sn)
                rel = (float(expected) - target) / dense
            if not -tol <= rel <= 0:  # one-sided, as in `losses`
                return False
        changed = False
        for m in sn.searchable():
            if m.eliminate(self.opts.elimination_factor, optimizer=optimizer):
                changed = True
            if not m.is_finished and m.n_live() == 1:
                m.finish(optimizer)
                changed = True
        if sn.is_finished:
            sn.freeze_decoder()
        return changed

    def finished(self, model) -> bool:
        return unwrap(model).is_finished

    def finalize(self, model, optimizer) -> str:
        sn: SearchableViT = unwrap(model)
        open_ = [n for n, m in sn.named_searchable() if not m.is_finished]
        if not open_:
            return ""
        self._sync(sn)
        self.decided_by_argmax = len(open_)
        choice, how = {}, "each took its most probable candidate"
        if self.opts.cap_within_budget:
            tol = self.opts.macs_tolerance
            target, dense = self._target()
            cost = None if self.latency is None else (
                lambda pick: float(sn.latency_at(self.latency, lambda m: _one_hot(m, pick(m)))))
            choice = choose_within_budget(sn, target, None if tol is None else target - tol * dense,
                                          cost)
            how = "they took the most probable choice within the budget (cap_within_budget)"
        for m in sn.searchable():
            if not m.is_finished:
                m.finish(optimizer, choice.get(m))
        sn.freeze_decoder()
        return (f"search reached its epoch cap with {len(open_)} undecided module(s) "
                f"({', '.join(open_)}); {how}")

    def smallest_arch(self) -> ViTArch:
        return smallest_arch(self.dense_arch, self.opts.width_multiple)  # narrowest candidates

    def extract(self, model):
        return extract_subnet(unwrap(model))

    def metrics(self, model) -> dict[str, Any]:
        sn: SearchableViT = unwrap(model)
        live = {n.replace("vit.", ""): m.n_live() for n, m in sn.named_searchable()}
        return {
            "expected_macs": float(sn.expected_macs().detach()),
            "current_macs": count_macs(sn.current_arch()),
            "target_macs": self.target_macs,
            "live_candidates": sum(live.values()),
            "live_per_module": live,
            "finished_modules": sum(m.is_finished for m in sn.searchable()),
            "lambda": self.lam(self.step),
            "macs_loss_weight": float(self.macs_weight),
            "mask_ratio": self.mask_ratio(self.step, model),
            **({"expected_latency_ms": float(sn.expected_latency(self.latency).detach()),
                "target_latency_ms": self.target_latency} if self.latency is not None else {}),
        }

    def restore(self, model, weights) -> None:
        unwrap(model).load_search_state(weights)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "macs_weight": float(self.macs_weight)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.macs_weight = int(state["step"]), float(state["macs_weight"])

