"""OFB, Once for Both (CVPR 2024): importance and sparsity searched in one stage.

Loss per step (METHODS.md section 1):
    CE + sum_m w_m [one-hot(p_m) + c_m sum sigmoid(S_m)]
       + w_flops ((F(alpha) - F_target) / F_dense)^2 + stopgrad(CE / L_rec) L_rec   (PMIM)

Schedules are per step: lambda 0.99 -> 0.1 and the PMIM mask ratio 0.05 -> `mask_ratio` over the
warm-up, then held; the ratio drops to 0 (decoder frozen) when every module is finished.

Decisions where the paper leaves a choice:
- Elimination runs `eliminations_per_epoch` times per epoch from the end of the warm-up on
  (during the warm-up lambda ~ 1, so the masks barely depend on alpha yet). Before each
  elimination alpha is averaged over workers and S broadcast from rank 0, so every worker
  slices identically.
- Three AdamW groups as published: weights + S (S without weight decay), alpha (betas 0.5/0.999,
  its own lr `alpha_lr`, which we raise above the weights' lr so short searches converge),
  decoder + mask token.
- Budget first, then decide: while the expected MACs are further than `macs_tolerance` (x dense
  MACs) from the target, elimination waits and the MACs-loss weight grows 1% per step (it relaxes
  back to the published 5 inside the tolerance) and the one-hot term is held back. (Latching
  the one-hot term on after the first entry, or a 1% tolerance, missed a 30% budget: the search
  hit its cap at 0.66-0.70x the target; 2% met 0.5 and 0.3 budgets at 0.96-1.00x.) The
  published 100-epoch schedule gives the MACs loss time to act before the one-hot loss
  saturates the softmax; in short searches the one-hot loss otherwise locks modules in above
  the budget (measured on a tiny ViT at a 30% budget: 1.12-1.37x the target for MACs-loss
  weights 5 to 50). `macs_tolerance: null` restores the published rule exactly.
- At the epoch cap, every unfinished module takes its argmax candidate (and the note says so).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from search_space import bimask, pmim
from search_space.arch import ViTArch
from search_space.cost import count_macs
from search_space.models import unwrap
from search_space.subnet import extract_subnet
from search_space.supernet import SearchableViT
from trainers.methods.base import SearchMethod, register_method


@register_method("ofb")
class OFB(SearchMethod):
    def __init__(self, cfg: Any, steps_per_epoch: int, dense_arch: ViTArch):
        super().__init__(cfg, steps_per_epoch, dense_arch)
        self.warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
        self.elim_every = max(1, steps_per_epoch // cfg.eliminations_per_epoch)
        self.dense_macs = count_macs(dense_arch)
        self.target_macs = (cfg.target_gmacs * 1e9 if cfg.target_gmacs
                            else cfg.budget * self.dense_macs)
        self.step = 0
        self.macs_weight = cfg.macs_loss_weight  # adaptive; restarts at w0 after a resume

    # --- schedules ---------------------------------------------------------------------------
    def lam(self, step: int) -> float:
        return bimask.linear_schedule(step, self.warmup_steps, self.cfg.lambda_start,
                                      self.cfg.lambda_end)

    def mask_ratio(self, step: int, model: nn.Module) -> float:
        if unwrap(model).is_finished:
            return 0.0
        return bimask.linear_schedule(step, self.warmup_steps, self.cfg.mask_ratio_start,
                                      self.cfg.mask_ratio)

    # --- interface ---------------------------------------------------------------------------
    def wrap(self, dense: nn.Module) -> SearchableViT:
        return SearchableViT(dense, self.cfg.width_multiple)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        sn: SearchableViT = unwrap(model)
        c = self.cfg
        alpha, S, dec = sn.arch_params(), sn.importance_params(), sn.decoder_params()
        special = {id(p) for p in (*alpha, *S, *dec)}
        decay, no_decay = [], []
        for p in sn.parameters():
            if id(p) not in special:
                (no_decay if p.ndim <= 1 or p.ndim == 3 else decay).append(p)  # 3: tokens/pos
        return [
            {"params": decay, "lr": c.lr, "weight_decay": c.weight_decay, "name": "weights"},
            {"params": no_decay + S, "lr": c.lr, "weight_decay": 0.0, "name": "weights_no_wd"},
            {"params": alpha, "lr": c.alpha_lr, "weight_decay": c.weight_decay,
             "betas": (0.5, 0.999), "name": "alpha"},
            {"params": dec, "lr": c.lr, "weight_decay": c.weight_decay, "name": "decoder"},
        ]

    def forward(self, model: nn.Module, images: torch.Tensor, step: int):
        self.step = step
        sn: SearchableViT = unwrap(model)
        sn.set_schedule(self.lam(step), self.cfg.temperature)
        ratio = self.mask_ratio(step, model)
        if ratio <= 0:
            return model(images), None
        n = sn.dense_arch.num_patches
        patch_mask = pmim.random_patch_mask(images.shape[0], n, ratio, images.device)
        logits, recon = model(images, patch_mask)
        return logits, (patch_mask, recon)

    def extra_loss(self, model, images, logits, aux, ce) -> dict[str, torch.Tensor]:
        sn: SearchableViT = unwrap(model)
        if sn.is_finished:
            return {}
        rel = (sn.expected_macs() - self.target_macs) / self.dense_macs
        tol = self.cfg.macs_tolerance
        on_budget = tol is None or abs(float(rel.detach())) <= tol
        if tol is not None:  # outside the tolerance the MACs weight grows, inside it relaxes
            w0 = self.cfg.macs_loss_weight
            self.macs_weight = (max(w0, self.macs_weight / 1.01) if on_budget
                                else min(w0 * 1000, self.macs_weight * 1.01))
        search = sum(m.search_loss(1.0 if on_budget else 0.0) for m in sn.searchable())
        out = {"search": search, "macs": self.macs_weight * rel**2}
        if aux is not None:
            patch_mask, recon = aux
            rec = pmim.reconstruction_loss(recon, images, patch_mask, sn.dense_arch.patch_size)
            out["pmim"] = pmim.weighted(ce, rec)
        return out

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
        if step < self.warmup_steps or (step + 1) % self.elim_every:
            return False
        sn: SearchableViT = unwrap(model)
        if sn.is_finished:
            return False
        self._sync(sn)
        tol = self.cfg.macs_tolerance
        if tol is not None:
            with torch.no_grad():
                off = abs(float(sn.expected_macs()) - self.target_macs) / self.dense_macs
            if off > tol:
                return False
        changed = False
        for m in sn.searchable():
            if m.eliminate(self.cfg.elimination_factor, optimizer=optimizer):
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
        for _, m in sn.named_searchable():
            if not m.is_finished:
                m.finish(optimizer)
        sn.freeze_decoder()
        return (f"search reached its epoch cap with {len(open_)} undecided module(s) "
                f"({', '.join(open_)}); each took its most probable candidate")

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
            "macs_loss_weight": self.macs_weight,
            "mask_ratio": self.mask_ratio(self.step, model),
        }

    def restore(self, model, state) -> None:
        unwrap(model).load_search_state(state)

