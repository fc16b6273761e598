"""UVC's formulas on tiny tensors (METHODS.md section 3): LeastS, the prox, the primal box, R
against the shared counter and a hand count, the gates, and an exact extraction."""

from __future__ import annotations

import pytest
import torch

from search_space.arch import ViTArch
from search_space.cost import count_macs, measure_macs
from search_space.mixers import ValuePrunedAttention
from search_space.models import build_vit
from search_space.uvc.extract import extract_subnet, plan_of
from search_space.uvc.primal_dual import (
    dual_ascent,
    hard_gates,
    least_s,
    primal_step,
    prox_factors,
    resource_clamp,
)
from search_space.uvc.resource import resource_ratio
from search_space.uvc.searchable import UVCViT


def _vit(depth: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                     num_classes=10, embed_dim=32, depth=depth, num_heads=4, mlp_ratio=2)


def test_least_s_value_and_gradient():
    v = torch.tensor([4.0, 1.0, 3.0, 2.0], requires_grad=True)
    k = torch.tensor(2.0, requires_grad=True)
    out = least_s(k, v)
    out.backward()
    assert out.item() == 3.0 and k.grad.item() == 3.0  # 1 + 2; the 3rd smallest is 3
    assert v.grad.tolist() == [0.0, 1.0, 0.0, 1.0]
    k = torch.tensor([0.0, 4.0], requires_grad=True)  # batched; K = n: d/dK is the largest
    out = least_s(k, torch.stack([v.detach(), v.detach()]))
    out.sum().backward()
    assert out.tolist() == [0.0, 10.0] and k.grad.tolist() == [1.0, 4.0]


def test_prox_factors_by_hand():
    # one block, 2 heads of 2 dims, 3 neurons; remove 1 head, 1 dim of head 0, 2 neurons
    c = torch.tensor([[[1.0, 5.0], [2.0, 3.0]]])  # (1, 2, 2): head sums a = 6, 5
    a, n = c.sum(-1), torch.tensor([[3.0, 1.0, 2.0]])
    s, r = torch.tensor([[0.4, 1.2]]), torch.tensor([[0.7, 0.0]])
    y, p, lr = torch.tensor([[2.0, 3.0]]), torch.tensor([[5.0, 7.0]]), 0.1
    proj, mlp = prox_factors(c, a, n, s, r, y, p, lr)
    fy0, fy1, fp0 = 1 / (1 + 2 * lr * 2.0), 1 / (1 + 2 * lr * 3.0), 1 / (1 + 2 * lr * 5.0)
    # head 1 (a = 5) is the least important; dim 0 of head 0 (c = 1) the least in its head
    torch.testing.assert_close(proj, torch.tensor([[fp0, 1.0, fy0, fy0]]))
    torch.testing.assert_close(mlp, torch.tensor([[1.0, fy1, fy1]]))  # ceil 1.2 = 2 smallest


def test_primal_step_box_clip_and_stickiness():
    ub = torch.full((1, 3), 4.0)
    x = torch.tensor([[0.0, 1.5, 3.0 - 1e-8]])  # the last at the top of its box (H - 1)
    g = torch.tensor([[5.0, -50.0, 10.0]])  # at 0 a positive gradient cannot push below 0
    new = primal_step(x, g, ub, lr=0.02)
    # infinity-norm clip: -50 -> -1, so the middle count moves by exactly lr; the top stays
    torch.testing.assert_close(new, torch.tensor([[0.0, 1.52, 3.0]]))
    frac = primal_step(torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[-1.0, 0.0, 0.0]]), ub,
                       lr=0.02, fraction=True)  # on x / ub with gradient ub g: moves lr * ub
    torch.testing.assert_close(frac, torch.tensor([[1.08, 1.0, 1.0]]))
    up = primal_step(torch.tensor([[2.99]]), torch.tensor([[-1.0]]), torch.tensor([[4.0]]), 0.02)
    assert up.item() <= 3.0  # never past ub - 1: one head always stays


def test_duals_ascend_and_clamp_at_zero():
    d = torch.tensor([1e-3, 1e-3, 0.2])
    out = dual_ascent(d, torch.tensor([5.0, -20.0, -0.1]), 1e-4)
    torch.testing.assert_close(out, torch.tensor([1e-3 + 5e-4, 0.0, 0.2 - 1e-5]))
    assert resource_clamp(0.5) == 0.5 and resource_clamp(0.7) == 0.5
    assert resource_clamp(0.3) == pytest.approx(0.7)


def _hand_macs(arch: ViTArch, heads: list[int], v: list[int], hidden: list[int],
               run: list[int]) -> float:
    T, D, d = arch.num_tokens, arch.embed_dim, arch.blocks[0].head_dim
    total = arch.num_patches * D * arch.in_chans * arch.patch_size**2 + D * arch.num_classes
    for h, vv, m, g in zip(heads, v, hidden, run, strict=True):
        total += g * (T * D * (2 * h * d + vv) + T * T * (h * d + vv) + T * vv * D
                      + 2 * T * D * m)
    return total


def test_resource_ratio_against_the_counter_and_a_hand_count():
    sn = UVCViT(_vit())
    arch = sn.dense_arch
    with torch.no_grad():
        sn.s.copy_(torch.tensor([[1.0, 10.0], [0.0, 0.0], [2.3, 3.0]]))  # ceil: 1, 10 / 3, 3
        sn.r.copy_(torch.tensor([[2.0, 0.0, 5.5, 1.0], [0.0] * 4, [7.0, 7.0, 1.0, 0.2]]))
        sn.gate_logits.copy_(torch.tensor([[-1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]]))  # skip 1
    imp = sn.importance()
    run = hard_gates(sn.gate_logits).float()
    R = resource_ratio(arch, sn.s, sn.r, imp.a, run)
    sub_arch = plan_of(sn).arch(arch)
    assert R.item() * count_macs(arch) == pytest.approx(count_macs(sub_arch), rel=1e-6)
    heads = [b.num_heads for b in sub_arch.blocks]
    v = [sum(b.v_dims or [b.head_dim] * b.num_heads) for b in sub_arch.blocks]
    hidden = [b.mlp_hidden for b in sub_arch.blocks]
    assert heads == [3, 1] and hidden == [54, 61]
    hand = _hand_macs(arch, [3, 4, 1], [v[0], 32, v[1]], [54, 64, 61], [1, 0, 1])
    assert count_macs(sub_arch) == hand
    # the published R (first formula of METHODS.md 3): 3 T D H'd on qkv, no classifier; it
    # overcounts qkv by T D (H'd - V) per kept block
    T, D, d = arch.num_tokens, arch.embed_dim, arch.blocks[0].head_dim
    published = arch.num_patches * D * arch.in_chans * arch.patch_size**2 + sum(
        3 * T * D * h * d + T * T * h * d + T * T * vv + T * vv * D + 2 * T * D * m
        for h, vv, m in zip(heads, v, hidden, strict=True))
    over = sum(T * D * (h * d - vv) for h, vv in zip(heads, v, strict=True))
    assert over > 0 and published == count_macs(sub_arch) - D * arch.num_classes + over


def test_warm_up_gates_run_every_block_at_half_strength():
    vit = _vit(depth=2)
    sn = UVCViT(vit).train()
    sn.half_strength = True
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        out = sn(x)
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for blk in vit.blocks:
            h = 0.5 * blk(h) + 0.5 * h
        expected = vit.forward_head(vit.norm(h))
    torch.testing.assert_close(out, expected)
    sn.half_strength = False  # after the warm-up: a soft Gumbel sample, rows sum to 1
    sn.gate_noise = torch.zeros(2, 2)
    g = sn.gates()
    torch.testing.assert_close(g.sum(-1), torch.ones(2))
    expected_run = torch.softmax(torch.tensor([-1.0, 1.0]) / 0.5, 0)[1].item()
    assert float(g[0, 1]) == pytest.approx(expected_run)


def test_hard_gates_keep_at_least_one_block():
    assert hard_gates(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])).tolist() == \
        [True, False, False]  # a tie skips
    assert hard_gates(torch.tensor([[2.0, 1.0], [1.0, 0.5], [3.0, 0.0]])).tolist() == \
        [False, True, False]  # none would run: the largest margin does


def test_a_skipped_block_is_removed_exactly_and_the_subnet_computes_the_eval_model():
    vit = _vit()
    sn = UVCViT(vit).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        sn.gate_logits.copy_(torch.tensor([[-1.0, 1.0], [2.0, -1.0], [-1.0, 1.0]]))
        full = sn(x)
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        h = vit.blocks[2](vit.blocks[0](h))  # block 1 skipped: x -> x
        torch.testing.assert_close(full, vit.forward_head(vit.norm(h)))
        sub, arch = extract_subnet(sn)
        assert arch.depth == 2
        torch.testing.assert_close(sub(x), full, rtol=1e-5, atol=1e-5)
        # now prune heads, value dims and neurons too: still the eval model, exactly
        sn.s.copy_(torch.tensor([[2.0, 20.0], [0.0, 0.0], [1.0, 5.0]]))
        sn.r.copy_(torch.tensor([[3.0, 1.0, 0.0, 6.0], [0.0] * 4, [2.0, 2.0, 4.0, 7.0]]))
        pruned = sn(x)
        sub, arch = extract_subnet(sn)
        torch.testing.assert_close(sub(x), pruned, rtol=1e-5, atol=1e-5)
    assert [b.num_heads for b in arch.blocks] == [2, 3]
    assert all(isinstance(b.attn, ValuePrunedAttention) for b in sub.blocks)
    assert count_macs(arch) == measure_macs(sub, arch)


def test_value_pruned_attention_against_a_hand_written_forward():
    torch.manual_seed(1)
    D, H, d, v_dims, T = 16, 2, 4, (3, 1), 5
    att = ValuePrunedAttention(D, H, d, v_dims).eval()
    att.fused_attn = False
    x = torch.randn(2, T, D)
    W, b = att.qkv.weight, att.qkv.bias
    q, k = x @ W[:H * d].T + b[:H * d], x @ W[H * d:2 * H * d].T + b[H * d:2 * H * d]
    v = x @ W[2 * H * d:].T + b[2 * H * d:]
    outs, off = [], 0
    for h in range(H):
        qh, kh = q[..., h * d:(h + 1) * d], k[..., h * d:(h + 1) * d]
        a = torch.softmax(qh @ kh.transpose(-1, -2) / d**0.5, dim=-1)
        outs.append(a @ v[..., off:off + v_dims[h]])
        off += v_dims[h]
    expected = torch.cat(outs, -1) @ att.proj.weight.T + att.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(att(x), expected)
        att.fused_attn = True
        torch.testing.assert_close(att(x), expected, rtol=1e-5, atol=1e-5)
