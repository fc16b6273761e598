"""Every OFB default is the published code's (METHODS.md section 1); our additions are off."""

from __future__ import annotations

import torch

from search_space.arch import ViTArch
from search_space.models import build_vit
from search_space.ofb.modules import SearchableAttention, SearchableMlp, head_candidates
from search_space.ofb.supernet import SearchablePatchEmbed
from trainers.config import SearchConfig
from trainers.methods import get_method


def _ofb(**ofb):
    torch.manual_seed(0)
    vit = build_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=3,
                    num_classes=4, embed_dim=64, depth=2, num_heads=4)
    cfg = SearchConfig(method="ofb", ofb=ofb)
    method = get_method("ofb")(cfg, 30, ViTArch.from_timm(vit))
    return method, method.wrap(vit), cfg


def test_published_defaults():
    method, sn, cfg = _ofb()
    o = method.opts
    assert (o.lambda_start, o.lambda_end) == (0.99, 0.1)
    assert (o.mask_ratio_start, o.mask_ratio) == (0.05, 0.25)
    assert o.macs_loss_weight == 5.0 and o.macs_tolerance is None  # fixed weight, always on
    assert o.eliminations_per_epoch == 3 and o.elimination_factor == 0.2
    assert o.temperature == 1.0 and o.alpha_lr is None and o.defer_elimination is False
    assert o.width_multiple == 1 and cfg.grad_clip is None
    assert method.elim_every == 10  # len(loader) // 3 steps, from step 0
    groups = {g["name"]: g for g in method.param_groups(sn)}
    assert groups["alpha"]["lr"] == cfg.lr and groups["alpha"]["betas"] == (0.5, 0.999)
    assert method.additions() == {}


def test_published_search_space_and_constants():
    _, sn, _ = _ofb()
    assert head_candidates(3) == [1, 2, 3] and head_candidates(4) == [2, 4]
    assert head_candidates(6) == [2, 4, 6] and head_candidates(12) == [2, 4, 6, 8, 10, 12]
    attn, mlp = sn.vit.blocks[0].attn, sn.vit.blocks[0].mlp
    assert isinstance(attn, SearchableAttention) and isinstance(mlp, SearchableMlp)
    assert sorted(set(attn.cand_dims.tolist())) == list(range(16 // 4, 17, 2))
    assert mlp.cand_widths.tolist() == list(range(256 // 4, 257, 256 // 8))  # 7 candidates
    pe = sn.vit.patch_embed
    assert isinstance(pe, SearchablePatchEmbed)
    assert pe.cand_widths.tolist() == list(range(32, 65, min(64 // 32, 12)))
    assert (attn.l1_coef, mlp.l1_coef, pe.l1_coef) == (4e-4, 1e-4, 1e-4)
    assert attn.loss_weight == mlp.loss_weight == pe.loss_weight == 0.5
    alphas = torch.cat([m.alpha.detach() for m in sn.searchable()])
    assert 0 <= float(alphas.min()) and float(alphas.max()) < 1  # U[0,1), not near zero
    assert float(alphas.std()) > 0.2


def test_our_additions_are_recorded():
    method, _, _ = _ofb(macs_tolerance=0.02, temperature=0.5)
    assert method.additions() == {"ofb.macs_tolerance": 0.02, "ofb.temperature": 0.5}


def test_a_finished_module_trains_its_channel_scale_unless_frozen():
    for freeze in (False, True):
        method, sn, _ = _ofb(freeze_finished=freeze)
        opt = torch.optim.AdamW(method.param_groups(sn), lr=1e-2)
        m = sn.vit.blocks[0].mlp
        m.finish(opt)
        before = m.channel_scale.detach().clone()
        logits, aux = method.forward(sn, torch.randn(4, 3, 32, 32), 0)
        sum(method.losses(sn, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), logits,
                          aux, 0).values()).backward()
        opt.step()
        changed = not torch.equal(m.channel_scale.detach(), before)
        assert changed is not freeze, freeze
        assert not m.alpha.requires_grad and not m.S.requires_grad
    assert method.additions() == {"ofb.freeze_finished": True}
