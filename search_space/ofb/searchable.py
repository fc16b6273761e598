"""Searchable units: the shared state of every OFB module (alpha, S, live candidates).

A subclass says what its units and candidates are (`_survival`, `_widest`, `_slice_units`) and
how its mask enters its forward. The base answers the questions every method and the search
loop ask: live candidates, expected width (for the MACs loss), elimination, freezing.

Lifecycle of a module: searching (mask = lambda*sigmoid(S) + (1-lambda)*V) -> candidates are
eliminated, weights sliced to the widest survivor -> one candidate left: `finish()` turns the
mask into a per-channel `channel_scale` parameter that goes on training (as published: fresh
optimizer state, no L1; fixed instead with our option `freeze_finished`), alpha and S stop
learning -> folded into the weights at export.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from search_space.ofb import bimask


class SearchableMixin:
    """State and behaviour shared by all searchable modules (mixed into timm module classes)."""

    kind: ClassVar[str] = ""
    l1_coef: ClassVar[float] = 1e-4  # c_type of the L1 term on sigmoid(S)
    loss_weight: ClassVar[float] = 0.5  # w_type

    # Set by the search loop before each forward (plain attributes, not state).
    lam: float = 1.0
    freeze_finished: bool = False  # ours: keep the finished scale fixed (published: it trains)
    temperature: float = 1.0
    # The embedding mask m_e for a module whose output joins the residual stream; set by
    # SearchableViT for the duration of one forward.
    stream_mask: torch.Tensor | None = None
    # (p, sigmoid(S)) computed once for the whole step by SearchableViT (its `step_terms`), so
    # that the mask, the MACs loss and the search loss share them; set for one forward.
    step: tuple[torch.Tensor, torch.Tensor] | None = None

    def _init_search(self, S_shape: tuple[int, ...], n_candidates: int,
                     device: torch.device | None) -> None:
        # U[0,1) as published: p starts off uniform enough for the one-hot loss to act at once
        self.alpha = nn.Parameter(torch.rand(n_candidates, device=device))
        self.S = nn.Parameter(nn.init.trunc_normal_(torch.empty(S_shape, device=device),
                                                    std=0.2, a=-0.4, b=0.4))
        self.register_buffer("live", torch.ones(n_candidates, dtype=torch.bool, device=device))
        self.register_buffer("finished", torch.zeros((), dtype=torch.bool, device=device))
        # the finished module's per-channel scale: a parameter without gradient until `finish`
        self.channel_scale = nn.Parameter(torch.ones(S_shape, device=device), requires_grad=False)
        self._host_live, self._host_finished = [True] * n_candidates, False
        self.register_load_state_dict_post_hook(lambda m, _: m._refresh_host())

    def _refresh_host(self) -> None:
        """Mirror `live` and `finished` on the host. They change only at elimination, finish and
        load; the per-step questions (finished? widest? how many live?) then need no device ->
        host round trip, which on a GPU is a stall per question (87 per step before)."""
        self._host_live = [bool(v) for v in self.live.tolist()]
        self._host_finished = bool(self.finished)

    # --- questions the loop asks -------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self._host_finished

    def probs(self) -> torch.Tensor:
        """softmax(alpha) over the live candidates: masks, the MACs loss and elimination."""
        return bimask.probs(self.alpha, self.live)

    def one_hot_probs(self) -> torch.Tensor:
        """softmax(alpha / T): the one-hot loss only (T = 1 as published)."""
        return bimask.probs(self.alpha, self.live, self.temperature)

    def n_live(self) -> int:
        return sum(self._host_live)

    def live_indices(self) -> list[int]:
        return [i for i, alive in enumerate(self._host_live) if alive]

    def _live_values(self, values: list) -> list:
        return [v for v, alive in zip(values, self._host_live, strict=True) if alive]

    def mask(self) -> torch.Tensor:
        """Current per-unit multiplier (shape of S)."""
        if self.is_finished:  # a view: a plain tensor (callers may store it), gradients flow
            return self.channel_scale.view(self.channel_scale.shape)
        p, sig = self.step if self.step is not None else (self.probs(), torch.sigmoid(self.S))
        V, alive = self._survival(p, sig)
        return bimask.unit_mask(self.S, V, self.lam, alive, sig)

    def search_loss(self, one_hot_weight: float = 1.0) -> torch.Tensor:
        """w_type * [one-hot loss + c_type * sum sigmoid(S)]; 0 once finished.

        `one_hot_weight` lets a method hold the one-hot pressure back (OFB does while the
        expected MACs are far from the budget)."""
        if self.is_finished:
            return self.S.sum() * 0.0
        oh = bimask.one_hot_loss(self.one_hot_probs(), self.live, self.n_live()) * one_hot_weight
        return self.loss_weight * (oh + self.l1_coef * torch.sigmoid(self.S).sum())

    def eliminate(self, factor: float = 0.2, slice_weights: bool = True,
                  optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Drop candidates with p <= factor/n; slice to the widest survivor. True if changed."""
        if self.is_finished:
            return False
        with torch.no_grad():
            drop = bimask.candidates_to_drop(self.probs(), self.live, factor)
        if not drop.any():
            return False
        before = self._widest()
        self.live &= ~drop
        self._refresh_host()
        if slice_weights and self._widest() != before:
            self.slice_to_widest(optimizer)
        return True

    def slice_to_widest(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        with torch.no_grad():
            self._slice_units(optimizer)

    def finish(self, optimizer: torch.optim.Optimizer | None = None,
               index: int | None = None) -> None:
        """Keep only candidate `index` (default: the argmax), slice to it, and make the mask the
        module's `channel_scale` (trainable with fresh optimizer state unless
        `freeze_finished`)."""
        with torch.no_grad():
            keep = torch.zeros_like(self.live)
            keep[torch.argmax(self.probs()) if index is None else index] = True
            self.live.copy_(keep)
            self._refresh_host()
            self._slice_units(optimizer)
            self.channel_scale.copy_(self.mask())
            self.finished.fill_(True)
            self._host_finished = True
        if optimizer is not None:
            optimizer.state.pop(self.channel_scale, None)
        self._set_trainable()

    def _set_trainable(self) -> None:
        """alpha and S learn while searching; the scale once finished (unless frozen)."""
        done = self.is_finished
        self.alpha.requires_grad_(not done)
        self.S.requires_grad_(not done)
        self.channel_scale.requires_grad_(done and not self.freeze_finished)

    # --- what subclasses define ----------------------------------------------------------
    def _survival(self, p: torch.Tensor, sig: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(V, alive) in the shape of S, from p and sigmoid(S); alive None when the module is
        sliced to its widest live candidate (every unit kept by one, as after elimination)."""
        raise NotImplementedError

    def _widest(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _slice_units(self, optimizer: torch.optim.Optimizer | None) -> None:
        raise NotImplementedError

    def expected_width(self, p: torch.Tensor | None = None) -> torch.Tensor:
        """E[units] under p (default: `probs()`), for the MACs loss."""
        raise NotImplementedError

    def candidate_widths(self) -> list[int]:
        """Each candidate's unit count (attention: heads x dims), live or not."""
        raise NotImplementedError

    def resize_(self, widths: tuple[int, ...]) -> None:
        """Shrink to `widths` without caring about values (restoring a checkpoint)."""
        raise NotImplementedError


def linear_candidates(n: int, lo_frac: float, step: int, multiple: int = 1) -> list[int]:
    """range(n*lo_frac, n+1, step), always ending at n; with `multiple` > 1 only widths that
    are multiples of it (plus n itself): hardware-friendly widths run closer to their MACs."""
    step = max(step, 1)
    out = [w for w in range(max(int(n * lo_frac), 1), n + 1, step) if w % multiple == 0]
    return out if out and out[-1] == n else [*out, n]


class VectorUnits(SearchableMixin):
    """Modules whose units are one vector of widths (MLP hidden, embedding): candidates are
    widths, S has shape (n,), and unit u survives iff its rank by S is below the width."""

    def _init_widths(self, widths: list[int], device: torch.device | None) -> None:
        self.register_buffer("cand_widths", torch.tensor(widths).to(device))
        self._widths = list(widths)
        self._init_search((widths[-1],), len(widths), device)

    def candidate_widths(self) -> list[int]:
        return list(self._widths)

    def n_units(self) -> int:
        """The current physical width."""
        return self.S.shape[0]

    def _widest(self) -> tuple[int]:
        return (max(self._live_values(self._widths)),)

    def _survival(self, p: torch.Tensor, sig: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        W = bimask.survival(p, self.cand_widths, self.n_units())  # (n,)
        r = bimask.rank_of(self.S)
        widest = self._widest()[0]
        return W[r], None if widest == self.n_units() else r < widest

    def expected_width(self, p: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_finished:
            return self.S.new_full((), float(self.n_units())).detach()  # a fill: no host copy
        p = self.probs() if p is None else p
        return p @ self.cand_widths.to(self.S.dtype)


def topk_units(S: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k most important units, in their original order."""
    return torch.sort(torch.topk(S.detach(), k).indices).values
