"""Two-stage building blocks: unit scores by hand, physical pruning, budget allocators, ViT-Slim."""

from __future__ import annotations

import copy

import pytest
import torch

from search_space.arch import ViTArch
from search_space.cost import count_macs
from search_space.models import build_vit
from search_space.prune import PrunePlan, apply_plan
from search_space.slim.multipliers import SlimViT
from search_space.two_stage.allocate import allocate_global, allocate_threshold, allocate_uniform
from search_space.two_stage.importance import elementwise, finalize_scores, group_scores


def _vit(seed=0, **kw):
    torch.manual_seed(seed)
    return build_vit("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                     num_classes=10, **{"embed_dim": 64, "depth": 3, "num_heads": 4, **kw}).eval()


def _taylor(vit, x):
    vit.zero_grad()
    vit(x).logsumexp(-1).mean().backward()
    return finalize_scores(group_scores(vit, elementwise(vit, "taylor")), "taylor")


def test_taylor_scores_match_a_hand_computation():
    vit, x = _vit(), torch.randn(4, 1, 28, 28)
    s = _taylor(vit, x)
    b = vit.blocks[1]
    t = {n: (p * p.grad).abs().detach() for n, p in b.named_parameters()}
    j = 7  # MLP hidden unit: fc1 row + bias, fc2 column
    hand = t["mlp.fc1.weight"][j].sum() + t["mlp.fc1.bias"][j] + t["mlp.fc2.weight"][:, j].sum()
    assert s.mlp[1][j] == pytest.approx(float(hand), rel=1e-5)
    h, i, d, inner = 2, 5, b.attn.head_dim, 64  # attention unit: q, k, v rows + proj column
    r = h * d + i
    hand = sum(t["attn.qkv.weight"][r + k * inner].sum() + t["attn.qkv.bias"][r + k * inner]
               for k in range(3)) + t["attn.proj.weight"][:, r].sum()
    assert s.attn[1][h, i] == pytest.approx(float(hand), rel=1e-5)
    c = 3  # embedding channel: every weight touching channel c, all over the model
    hand = 0.0
    for name, p in vit.named_parameters():
        g = (p * p.grad).abs().detach()
        if name in ("cls_token", "pos_embed"):
            hand += g[..., c].sum()
        elif name.startswith("patch_embed.proj") or name.endswith(("norm1.weight",
                "norm1.bias", "norm2.weight", "norm2.bias", "proj.bias", "fc2.bias")) or \
                name in ("norm.weight", "norm.bias"):
            hand += g[c].sum()
        elif name.endswith(("qkv.weight", "fc1.weight")) or name == "head.weight":
            hand += g[:, c].sum()
        elif name.endswith(("attn.proj.weight", "fc2.weight")):
            hand += g[c].sum()
    assert s.embed[c] == pytest.approx(float(hand), rel=1e-5)


def test_magnitude_is_the_group_l2_norm():
    vit = _vit()
    s = finalize_scores(group_scores(vit, elementwise(vit, "magnitude")), "magnitude")
    b, j = vit.blocks[0], 11
    with torch.no_grad():
        sq = (b.mlp.fc1.weight[j] ** 2).sum() + b.mlp.fc1.bias[j] ** 2 + (
            b.mlp.fc2.weight[:, j] ** 2).sum()
    assert s.mlp[0][j] == pytest.approx(float(sq.sqrt()), rel=1e-5)
    with pytest.raises(ValueError, match="allowed: \\('taylor', 'magnitude'\\)"):
        elementwise(vit, "random")


def test_pruning_keeps_the_function_of_the_kept_units():
    vit, x = _vit(), torch.randn(4, 1, 28, 28)
    arch = ViTArch.from_timm(vit)
    full, _ = apply_plan(vit, PrunePlan.full(arch))
    torch.testing.assert_close(full(x), vit(x))
    s = _taylor(vit, x)
    plan = allocate_global(s, arch, 0.6 * count_macs(arch), prune_embed=False)
    sub, sub_arch = apply_plan(vit, plan)
    masked = copy.deepcopy(vit)  # the dense model with the pruned units zeroed
    with torch.no_grad():
        for blk, h, d, m in zip(masked.blocks, plan.heads, plan.dims, plan.mlp, strict=True):
            keep = torch.zeros(blk.attn.num_heads * blk.attn.head_dim, dtype=torch.bool)
            keep[(h[:, None] * blk.attn.head_dim + d).reshape(-1)] = True
            k3 = keep.repeat(3)
            blk.attn.qkv.weight[~k3] = 0
            blk.attn.qkv.bias[~k3] = 0
            km = torch.zeros(blk.mlp.fc1.out_features, dtype=torch.bool)
            km[m] = True
            blk.mlp.fc2.weight[:, ~km] = 0
    torch.testing.assert_close(sub(x), masked(x), atol=1e-5, rtol=1e-5)
    assert count_macs(sub_arch) == count_macs(ViTArch.from_timm(sub)) < count_macs(arch)


@pytest.mark.parametrize("budget", [0.5, 0.3])
def test_allocators_meet_the_budget(budget):
    vit, x = _vit(), torch.randn(8, 1, 28, 28)
    arch = ViTArch.from_timm(vit)
    target = budget * count_macs(arch)
    s = _taylor(vit, x)
    for plan in (allocate_global(s, arch, target), allocate_threshold(s, arch, target)):
        assert target * 0.98 <= plan.macs(arch) <= target  # within 2%, never above
    uni = allocate_uniform(s, arch, target)
    assert uni.macs(arch) <= target and len({len(m) for m in uni.mlp}) == 1  # same per layer
    sub, sub_arch = apply_plan(vit, allocate_global(s, arch, target))
    assert sub(x).shape == (8, 10) and count_macs(sub_arch) <= target


def test_vit_slim_multipliers_l1_and_fold():
    vit, x = _vit(), torch.randn(4, 1, 28, 28)
    want = vit(x)
    sv = SlimViT(copy.deepcopy(vit))
    torch.testing.assert_close(sv(x), want)  # zeta = 1: the dense function
    with torch.no_grad():
        for z in sv.zetas():
            z.uniform_(-1.5, 1.5)
    l1 = sv.l1(2e-4, 5e-5)
    hand = 2e-4 * sum(z.abs().sum() for z in sv.zeta_attn) + 5e-5 * sum(
        z.abs().sum() for z in sv.zeta_mlp)
    assert float(l1.detach()) == pytest.approx(float(hand.detach()))
    l1.backward()
    torch.testing.assert_close(sv.zeta_mlp[0].grad, 5e-5 * sv.zeta_mlp[0].detach().sign())
    searched = sv(x).detach()
    scores = sv.scores()
    assert scores.attn[0].shape == (4, 16) and scores.mlp[0].shape == (256,)
    folded = sv.fold()
    torch.testing.assert_close(folded(x), searched, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("budget", [0.5, 0.3])
def test_allocators_keep_widths_in_multiples_when_asked(budget):
    """width_multiple 8: embedding, MLP and head dims move 8 units at a time (the dense widths
    are multiples of 8), and the budget still holds within 2%."""
    vit, x = _vit(), torch.randn(8, 1, 28, 28)
    arch = ViTArch.from_timm(vit)
    target = budget * count_macs(arch)
    s = _taylor(vit, x)
    for plan in (allocate_global(s, arch, target, multiple=8),
                 allocate_uniform(s, arch, target, multiple=8)):
        a = plan.arch(arch)
        widths = [a.embed_dim, *(b.mlp_hidden for b in a.blocks),
                  *(b.head_dim for b in a.blocks)]
        assert all(w % 8 == 0 for w in widths), widths
        assert plan.macs(arch) <= target
    assert target * 0.98 <= allocate_global(s, arch, target, multiple=8).macs(arch)
    plain = allocate_global(s, arch, target).arch(arch)
    assert any(w % 8 for w in [plain.embed_dim, *(b.mlp_hidden for b in plain.blocks),
                               *(b.head_dim for b in plain.blocks)])  # unit by unit otherwise
