"""OFB at the epoch cap: published, every undecided module takes its argmax; our addition
`cap_within_budget` takes the most probable choice within the budget (and band)."""

from __future__ import annotations

import pytest
import torch

from search_space.arch import ViTArch
from search_space.cost import count_macs
from search_space.models import build_vit
from search_space.ofb.cap import choose_within_budget
from trainers.config import SearchConfig
from trainers.methods import get_method


def _at_cap(budget: float, **ofb):
    """An OFB supernet whose every module prefers its widest candidate, none decided."""
    torch.manual_seed(0)
    vit = build_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=3,
                    num_classes=4, embed_dim=64, depth=2, num_heads=4)
    dense = ViTArch.from_timm(vit)
    method = get_method("ofb")(SearchConfig(method="ofb", budget=budget, ofb=ofb), 30, dense)
    sn = method.wrap(vit)
    with torch.no_grad():
        for m in sn.searchable():
            w = torch.tensor(m.candidate_widths(), dtype=torch.float)
            m.alpha.copy_(w / w.max())  # softly prefers wider candidates
    return method, sn, count_macs(dense)


def test_published_cap_takes_each_argmax():
    method, sn, dense_macs = _at_cap(0.5)
    method.finalize(sn, None)
    assert method.decided_by_argmax == len(sn.searchable())
    assert count_macs(sn.current_arch()) == dense_macs  # every argmax is the widest
    assert method.additions() == {}


@pytest.mark.parametrize("budget", [0.5, 0.3])
@pytest.mark.parametrize("tol", [None, 0.02])
def test_cap_within_budget_meets_the_target(budget, tol):
    method, sn, dense_macs = _at_cap(budget, cap_within_budget=True, macs_tolerance=tol)
    note = method.finalize(sn, None)
    macs = count_macs(sn.current_arch())  # the exported subnet's MACs, by the counter
    assert macs <= method.target_macs, (macs, method.target_macs)
    assert macs >= method.target_macs - 0.05 * dense_macs  # the greedy stops near the target
    assert all(m.is_finished and m.n_live() == 1 for m in sn.searchable())
    assert "within the budget" in note
    assert method.additions()["ofb.cap_within_budget"] is True


def test_cap_within_budget_fills_the_band_from_below():
    """An argmax far below the target moves up into [target - tol, target], never above."""
    method, sn, dense_macs = _at_cap(0.5, cap_within_budget=True, macs_tolerance=0.04)
    with torch.no_grad():
        for m in sn.searchable():
            m.alpha.neg_()  # now the narrowest candidate is every module's argmax
    low = method.target_macs - 0.04 * dense_macs
    choice = choose_within_budget(sn, method.target_macs, low)
    assert all(i in m.live_indices() for m, i in choice.items())
    method.finalize(sn, None)
    assert low <= count_macs(sn.current_arch()) <= method.target_macs


def test_cap_keeps_the_argmax_when_it_fits():
    method, sn, dense_macs = _at_cap(0.5)
    choice = choose_within_budget(sn, float(dense_macs))
    assert choice == {m: int(torch.argmax(m.probs())) for m in sn.searchable()}
