"""Hardware-friendly widths (search_space/widths.py) in every method's extraction: the rounding
rule by hand, then ViT-Slim's threshold allocator, UVC's plan and SPViT's neurons rounded to
multiples of 8 without spending MACs the search did not."""

from __future__ import annotations

import torch

from search_space.arch import ViTArch
from search_space.cost import count_macs, measure_macs
from search_space.models import build_vit
from search_space.slim.multipliers import SlimViT
from search_space.spvit.extract import extract_subnet as spvit_extract
from search_space.spvit.extract import rounded_neurons
from search_space.spvit.supernet import SPViTSearch
from search_space.two_stage.allocate import allocate_threshold
from search_space.uvc.extract import extract_subnet as uvc_extract
from search_space.uvc.extract import plan_of, round_plan
from search_space.uvc.searchable import UVCViT
from search_space.widths import round_count, round_keep, step


def _vit(depth: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)  # head_dim 16, MLP 128: both multiples of 8
    return build_vit("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                     num_classes=10, embed_dim=64, depth=depth, num_heads=4, mlp_ratio=2)


def test_step_and_round_count_by_hand():
    assert step(64, 8) == 8 and step(12, 8) == 1 and step(8, 8) == 1 and step(64, 1) == 1
    assert [round_count(k, 64, 8) for k in (1, 3, 4, 11, 12, 60, 64)] == [8, 8, 8, 8, 16, 64, 64]
    assert [round_count(k, 64, 8, "floor") for k in (1, 11, 15, 16, 63)] == [8, 8, 8, 16, 56]
    assert round_count(5, 12, 8) == 5  # a dense width that is not a multiple: unit by unit


def test_round_keep_contains_or_is_contained_in_the_choice():
    scores = torch.tensor([9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0, 0.5, 0.2, 0.1,
                           0.3, 0.4, 0.6, 0.7])  # 16 units, step 8
    kept = torch.tensor([1, 3, 5, 9, 10])  # weak units chosen by the method: they stay first
    up = round_keep(scores, kept, 8)  # 5 -> 8: the 3 strongest others join
    assert set(kept.tolist()) <= set(up.tolist()) and up.tolist() == [0, 1, 2, 3, 4, 5, 9, 10]
    many = torch.arange(11)
    down = round_keep(scores, many, 8)  # 11 -> 8: the 3 weakest chosen ones leave
    assert set(down.tolist()) <= set(many.tolist()) and 9 not in down and 10 not in down
    assert round_keep(scores, torch.tensor([4, 2]), 1).tolist() == [2, 4]  # multiple 1: as is


def test_vit_slim_threshold_rounds_and_meets_the_budget():
    vit = _vit()
    arch = ViTArch.from_timm(vit)
    sv = SlimViT(vit)
    with torch.no_grad():
        for z in sv.zetas():
            z.uniform_(0.0, 1.0)
    target = 0.5 * count_macs(arch)
    plan = allocate_threshold(sv.scores(), arch, target, multiple=8)
    a = plan.arch(arch)
    assert all(b.head_dim % 8 == 0 and b.mlp_hidden % 8 == 0 for b in a.blocks), a.blocks
    assert target * 0.9 <= plan.macs(arch) <= target
    odd = allocate_threshold(sv.scores(), arch, target).arch(arch)  # published: unit by unit
    assert any(b.mlp_hidden % 8 for b in odd.blocks)


def _uvc_pruned() -> UVCViT:
    sn = UVCViT(_vit()).eval()
    with torch.no_grad():
        sn.s.copy_(torch.tensor([[1.0, 37.0], [0.0, 3.0], [2.0, 61.0]]))  # heads, neurons
        sn.r.copy_(torch.tensor([[3.0, 5.0, 1.0, 0.0], [7.0, 2.0, 9.0, 4.0],
                                 [2.0, 2.0, 3.0, 11.0]]))  # value dims removed per head
    return sn


def test_uvc_round_plan_rounds_value_dims_and_neurons():
    sn = _uvc_pruned()
    dense = sn.dense_arch
    plan = plan_of(sn)
    before = count_macs(plan.arch(dense))
    rounded = round_plan(plan, sn.importance(), 8, dense, limit=before * 1.05)
    assert all(len(js) % 8 == 0 for hs in rounded.dims for js in hs)
    assert all(len(ns) % 8 == 0 for ns in rounded.neurons)
    assert rounded.heads == plan.heads and rounded.run == plan.run
    assert count_macs(rounded.arch(dense)) <= before * 1.05
    floor = round_plan(plan, sn.importance(), 8, dense, limit=before)  # nearest costs more
    assert count_macs(floor.arch(dense)) <= before
    sub, arch = uvc_extract(sn, floor)
    assert count_macs(arch) == measure_macs(sub, arch)
    assert sub(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_spvit_rounded_neurons_within_the_limit():
    sn = SPViTSearch(_vit()).eval()
    with torch.no_grad():
        for blk, off in zip(sn.vit.blocks, (11, 70, 3), strict=True):
            blk.mlp.theta[:off] = -1.0  # 117, 58, 125 neurons gated on
    before = count_macs(sn.current_arch())
    kept = rounded_neurons(sn, 8, limit=before * 1.05)
    assert [len(k) for k in kept] == [120, 56, 128]  # nearest: 4 neurons more
    assert count_macs(sn.current_arch(kept)) <= before * 1.05
    # within the unrounded MACs: one block that rounded up goes down instead, the one whose
    # dropped units have the lowest thresholds (block 0's are made the strongest here)
    with torch.no_grad():
        sn.vit.blocks[0].mlp.theta[11:] = 3.0
    fit = rounded_neurons(sn, 8, limit=before)
    assert [len(k) for k in fit] == [120, 56, 120]
    assert count_macs(sn.current_arch(fit)) <= before
    sub, arch = spvit_extract(sn, fit)
    assert [b.mlp_hidden for b in arch.blocks] == [120, 56, 120]
    assert count_macs(arch) == measure_macs(sub, arch)
    every = rounded_neurons(sn, 8, limit=0)  # nothing fits: every block rounded down
    assert [len(k) for k in every] == [112, 56, 120]
