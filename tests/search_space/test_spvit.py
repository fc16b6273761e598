"""SPViT's formulas on tiny tensors (METHODS.md section 4): the nested gates, the straight-through
gradients, the shared-weight conv kernels, the cls bypass, the complexity and an exact fold."""

from __future__ import annotations

import itertools

import pytest
import torch

from search_space.cost import count_macs, measure_macs
from search_space.models import build_vit
from search_space.spvit import gates
from search_space.spvit.extract import extract_subnet
from search_space.spvit.supernet import SPViTSearch


def _vit(depth: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1,
                     num_classes=10, embed_dim=32, depth=depth, num_heads=4, mlp_ratio=2)


@pytest.mark.parametrize("b", list(itertools.product([0.0, 1.0], repeat=3)))
def test_nested_gates_pick_exactly_one_path(b):
    w = gates.path_weights(gates.nested(torch.tensor(b)))  # (MSA, 3x3, 1x1)
    on = [i for i in range(3) if w[i] == 1]
    assert all(x in (0.0, 1.0) for x in w.tolist()) and len(on) <= 1
    expected = {(1, 1, 1): [0], (1, 1, 0): [1]}.get(tuple(int(x) for x in b),
                                                     [2] if b[0] == 1 else [])
    assert on == expected  # the 1x1 gate off turns the whole mixer off


def test_straight_through_gradients():
    theta = torch.tensor([0.3, -2.0], requires_grad=True)
    u = torch.tensor([0.5, 0.9])
    b = gates.sample(theta, u)
    logit = torch.log(u) - torch.log1p(-u) + theta.detach()
    assert b.tolist() == (logit > 0).float().tolist()  # hard values
    b.sum().backward()
    s = torch.sigmoid(logit)
    torch.testing.assert_close(theta.grad, s * (1 - s))  # the relaxed Bernoulli's gradient
    # the detach rule: all on -> g0 and g1 carry no gradient; only g2's product does
    bb = torch.ones(3, requires_grad=True)
    gates.nested(bb)[:2].sum().backward()
    assert bb.grad.tolist() == [0.0, 0.0, 0.0]
    bb = torch.tensor([1.0, 1.0, 0.0], requires_grad=True)
    g = gates.nested(bb)
    g[1].backward()  # 3x3 on, MSA off: g1 = b0 b1 keeps its gradient
    assert bb.grad.tolist() == [1.0, 1.0, 0.0]
    # complexity surrogate: d/dtheta sigma(sigma(theta) - 0.5)
    t = torch.tensor([0.7, -0.4], requires_grad=True)
    st = gates.complexity_st(t)
    assert st.tolist() == [1.0, 0.0]
    st.sum().backward()
    sg = torch.sigmoid(t.detach())
    outer = torch.sigmoid(sg - 0.5)
    torch.testing.assert_close(t.grad, outer * (1 - outer) * sg * (1 - sg))


def test_conv_kernel_from_wv_and_p_by_hand():
    sn = SPViTSearch(_vit(depth=1))
    m = sn.msas()[0]
    with torch.no_grad():
        m.P.copy_(torch.randn(4, 9))
    H, d = 4, 8
    pi = torch.softmax(m.P.detach() / 0.01, dim=0)
    wv = m.qkv.weight.detach()[2 * H * d:]
    bv = m.qkv.bias.detach()[2 * H * d:]
    wo = m.proj.weight.detach()
    k3, b3, o3 = (t.detach() for t in m.conv_weights(3))
    for row, col in itertools.product(range(3), range(3)):
        k = row + 3 * col  # the published position layout
        hand = sum(pi[h, k] * wv[h * d:(h + 1) * d] for h in range(H))
        torch.testing.assert_close(k3[:, :, row, col], hand)
    torch.testing.assert_close(b3, sum(pi[h, k] * bv[h * d:(h + 1) * d]
                                       for h in range(H) for k in range(9)))
    torch.testing.assert_close(o3, sum(pi[h, k] * wo[:, h * d:(h + 1) * d]
                                       for h in range(H) for k in range(9)))
    k1, b1, o1 = (t.detach() for t in m.conv_weights(1))
    torch.testing.assert_close(k1[:, :, 0, 0], k3[:, :, 1, 1])  # the centre, k = 4
    torch.testing.assert_close(o1, sum(pi[h, 4] * wo[:, h * d:(h + 1) * d] for h in range(H)))


def test_cls_bypasses_the_conv_paths():
    m = SPViTSearch(_vit(depth=1)).msas()[0].eval()
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        for k in (3, 1):
            y = m.conv_path(x, k)
            torch.testing.assert_close(y[:, 0], x[:, 0])  # the branch input itself, no bias
            assert not torch.allclose(y[:, 1:], x[:, 1:])


def test_complexity_at_the_thresholds_is_the_subnets_macs():
    sn = SPViTSearch(_vit())
    assert sn.complexity().item() == pytest.approx(sn.dense_macs)  # every gate on
    with torch.no_grad():
        for m, t in zip(sn.msas(), [[1, 1, -1], [1, -1, 1], [-1, 1, 1], [1, 1, 1]],
                        strict=True):
            m.theta.copy_(torch.tensor(t, dtype=torch.float))
        sn.vit.blocks[1].mlp.theta[:20] = -1.0
    assert sn.kinds() == ["conv3", "conv1", "none", "attn"]
    F = sn.complexity()
    assert F.item() == pytest.approx(count_macs(sn.current_arch()))
    F.backward()  # the surrogate reaches every threshold
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sn.thetas())


def test_folded_subnet_equals_the_searchable_model_in_eval():
    """Tolerance 1e-5 (float32 rounding of the folded kernels): the same logits as the searchable
    model in eval mode with the same gate decisions."""
    sn = SPViTSearch(_vit())
    with torch.no_grad():
        for m, t in zip(sn.msas(), [[1, 1, -1], [1, -1, 1], [-1, 1, 1], [1, 1, 1]],
                        strict=True):
            m.theta.copy_(torch.tensor(t, dtype=torch.float))
            m.P.copy_(torch.randn(4, 9))
        sn.vit.blocks[3].mlp.theta[:30] = -1.0
        sn.vit.blocks[2].mlp.theta[:] = -1.0  # no MLP branch either: the block is x -> x
        sn.train()
        for _ in range(3):  # BN running statistics away from their init
            sn(torch.randn(8, 1, 28, 28))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = sn.eval()(x)
        sub, arch = extract_subnet(sn)
        torch.testing.assert_close(sub(x), expected, rtol=1e-5, atol=1e-5)
    assert [b.mixer for b in arch.blocks] == ["conv3", "conv1", "none", "attn"]
    assert [b.mlp_hidden for b in arch.blocks] == [64, 64, 0, 34]
    assert count_macs(arch) == measure_macs(sub, arch)


def test_a_none_block_is_x_plus_mlp():
    sn = SPViTSearch(_vit(depth=1))
    with torch.no_grad():
        sn.msas()[0].theta.fill_(-1.0)
    sub, arch = extract_subnet(sn.eval())
    blk, x = sub.blocks[0], torch.randn(2, 17, 32)
    assert arch.blocks[0].mixer == "none"
    with torch.no_grad():
        torch.testing.assert_close(blk(x), x + blk.mlp(blk.norm2(x)))
        sblk = sn.vit.blocks[0]
        torch.testing.assert_close(sblk(x), x + sblk.mlp(sblk.norm2(x)))
