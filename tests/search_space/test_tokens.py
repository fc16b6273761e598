"""ViT-Slim's token multipliers: l1 term, monotone keep-sets, budget, the token-pruned subnet."""

from __future__ import annotations

import copy

import pytest
import torch

from search_space.arch import ViTArch
from search_space.cost import count_macs, measure_macs
from search_space.models import build_vit
from search_space.prune import PrunePlan, apply_plan
from search_space.slim.multipliers import SlimViT
from search_space.subnet import build_from_arch, export_onnx, export_subnet, load_subnet
from search_space.tokens import monotone_keep
from search_space.two_stage.allocate import allocate_threshold


def _slim(seed=0):
    torch.manual_seed(seed)
    vit = build_vit("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                    num_classes=10, embed_dim=64, depth=3, num_heads=4).eval()
    sv = SlimViT(vit, tokens=True)
    with torch.no_grad():
        for z in sv.zetas():
            z.uniform_(-2.0, 2.0)
    return sv, ViTArch.from_timm(vit)


def test_monotone_keep_by_hand():
    s = [torch.tensor([0.0, 0.9, 0.2, 0.8, 0.7]),
         torch.tensor([0.0, 0.1, 0.9, 0.9, 0.6]),
         torch.tensor([0.0, 0.9, 0.9, 0.1, 0.9])]
    keep = monotone_keep(s, 0.5, num_prefix=1)
    # position 2 is below at block 0, so never comes back; 1 drops at block 1; cls always kept
    assert [k.tolist() for k in keep] == [[0, 1, 3, 4], [0, 3, 4], [0, 4]]
    none = monotone_keep(s, 5.0, num_prefix=0)  # nothing above: the best survivor stays
    assert [k.tolist() for k in none] == [[1], [1], [1]]
    arch = ViTArch.from_dict({**_slim()[1].to_dict(), "tokens": [[0, 1, 2], [0, 3], [0]]})
    with pytest.raises(ValueError, match=r"positions \[3\] were dropped by an earlier block"):
        build_from_arch(arch)


def test_token_l1_term():
    sv, _ = _slim()
    l1 = sv.l1(0.0, 0.0, 1e-4)
    hand = 1e-4 * sum(torch.tanh(z).abs().sum() for z in sv.zeta_tok)
    assert float(l1.detach()) == pytest.approx(float(hand.detach()))
    l1.backward()
    z = sv.zeta_tok[1].detach()
    torch.testing.assert_close(sv.zeta_tok[1].grad,
                               1e-4 * torch.sign(z) * (1 - torch.tanh(z) ** 2))
    assert len(sv.zeta_tok) == 3 and sv.zeta_tok[0].shape == (17,)  # 16 patches + cls


@pytest.mark.parametrize("budget", [0.5, 0.3])
def test_threshold_with_tokens_meets_the_budget_and_is_monotone(budget, tmp_path):
    sv, dense = _slim()
    target = budget * count_macs(dense)
    scales = sv.token_scales()
    plan = allocate_threshold(sv.scores(), dense, target, [t.abs() for t in scales])
    plan.token_scale = scales
    assert target * 0.98 <= plan.macs(dense) <= target
    kept = [set(t.tolist()) for t in plan.tokens]
    assert all(0 in k for k in kept)  # the cls token
    assert all(b <= a for a, b in zip(kept, kept[1:], strict=False))  # monotone over depth
    assert len(kept[-1]) < 17  # tokens were pruned
    sub, arch = apply_plan(copy.deepcopy(sv).fold(), plan)
    assert ViTArch.from_timm(sub) == arch and arch.tokens is not None
    assert measure_macs(sub, arch) == count_macs(arch)  # the counter follows the tokens
    x = torch.randn(3, 1, 28, 28)
    folder = export_subnet(sub, arch, tmp_path / "sub")
    back = load_subnet(folder)
    torch.testing.assert_close(back(x), sub(x))
    torch.testing.assert_close(back.blocks[2].token_scale, scales[2][plan.tokens[2]])


def test_token_pruned_subnet_computes_the_hand_forward():
    """Block l sees only its kept positions, each input of attn / MLP times tanh(zeta_tok)."""
    sv, dense = _slim()
    x = torch.randn(2, 1, 28, 28)
    scales = sv.token_scales()
    keep = monotone_keep([t.abs() for t in scales], 0.6, dense.num_prefix_tokens)
    plan = PrunePlan.full(dense)
    plan.tokens, plan.token_scale = keep, scales
    vit = copy.deepcopy(sv).fold()
    sub, _ = apply_plan(vit, plan)
    with torch.no_grad():
        h = vit._pos_embed(vit.patch_embed(x))  # (B, 17, D)
        pos = torch.arange(17)
        for blk, k, t in zip(vit.blocks, keep, scales, strict=True):
            h = h[:, torch.searchsorted(pos, k)]
            pos, s = k, t[k][:, None]
            h = h + blk.attn(blk.norm1(h) * s)
            h = h + blk.mlp(blk.norm2(h) * s)
        want = vit.head(vit.norm(h)[:, 0])
    torch.testing.assert_close(sub(x), want, atol=1e-5, rtol=1e-5)
    # keeping every position, the subnet is the searched model exactly
    plan.tokens = [torch.arange(17)] * 3
    full, _ = apply_plan(copy.deepcopy(sv).fold(), plan)
    torch.testing.assert_close(full(x), sv(x), atol=1e-5, rtol=1e-5)


def test_token_pruned_subnet_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    sv, dense = _slim()
    scales = sv.token_scales()
    plan = allocate_threshold(sv.scores(), dense, 0.4 * count_macs(dense),
                              [t.abs() for t in scales])
    plan.token_scale = scales
    sub, arch = apply_plan(sv.fold(), plan)
    path = export_onnx(sub, arch, tmp_path / "m.onnx", batch=2)
    x = torch.randn(3, 1, 28, 28)
    got = ort.InferenceSession(str(path)).run(None, {"images": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), sub(x).detach(), atol=1e-4, rtol=1e-4)


def test_token_multipliers_start_at_the_published_3():
    from search_space.slim.multipliers import TOKEN_INIT, SlimViT

    torch.manual_seed(0)
    vit = build_vit("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                    num_classes=10, embed_dim=32, depth=2, num_heads=2)
    slim = SlimViT(vit, tokens=True)
    assert TOKEN_INIT == 3.0
    assert all(bool((z == 3.0).all()) for z in slim.zeta_tok)
