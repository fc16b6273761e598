"""OFB through the shared loop, in one process: schedules, elimination, the MACs target."""

from __future__ import annotations

import pytest
import torch

from search_space.arch import ViTArch
from search_space.cost import count_macs
from search_space.models import build_vit
from search_space.ofb.supernet import SearchableViT
from trainers.config import DataConfig, SearchConfig
from trainers.data import build_splits, make_loader
from trainers.loop import train_one_epoch
from trainers.methods import SearchMethod, get_method, list_methods, register_method


def _setup(**search):
    torch.manual_seed(0)
    s = build_splits(DataConfig(dataset="synthetic", synthetic_size=640))
    vit = build_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=3,
                    num_classes=4, embed_dim=48, depth=2, num_heads=4)
    ofb = {"alpha_lr": 0.05, "ramp_epochs": 0.5, "eliminations_per_epoch": 4,
           **search.pop("ofb", {})}
    cfg = SearchConfig(**{"epochs": 20, "lr_warmup_epochs": 0.5, "ofb": ofb, **search})
    loader = make_loader(s.train, 32, True, drop_last=True)
    method = get_method("ofb")(cfg, len(loader), ViTArch.from_timm(vit))
    model = method.wrap(vit)
    opt = torch.optim.AdamW(method.param_groups(model), lr=cfg.lr)
    return method, model, opt, loader


def test_registry():
    assert "ofb" in list_methods()
    with pytest.raises(ValueError, match="already registered"):
        register_method("ofb")(SearchMethod)
    with pytest.raises(ValueError, match="search.method='nope'"):
        get_method("nope")


def test_schedules():
    method, model, _, loader = _setup(ofb={"ramp_epochs": 1})
    n = len(loader)
    assert method.lam(0) == pytest.approx(0.99) and method.lam(n) == pytest.approx(0.1)
    assert method.mask_ratio(0, model) == pytest.approx(0.05)
    assert method.mask_ratio(n // 2, model) == pytest.approx(0.15, abs=0.02)
    assert method.mask_ratio(10 * n, model) == pytest.approx(0.25)
    groups = {g["name"]: g for g in method.param_groups(model)}
    assert groups["alpha"]["betas"] == (0.5, 0.999) and groups["alpha"]["lr"] == 0.05
    assert all(p.ndim == 1 for p in groups["alpha"]["params"])


@pytest.mark.parametrize("budget", [0.5, 0.3])
def test_search_finishes_at_the_target_macs(budget):
    method, model, opt, loader = _setup(budget=budget)
    n, terms = len(loader), []
    for epoch in range(20):
        st = train_one_epoch(model, loader, opt, None, torch.device("cpu"), method=method,
                             step_offset=epoch * n, label_smoothing=0.1)
        terms.append(st.terms)
        if method.finished(model):
            break
    assert method.finished(model), "the search did not converge to one candidate per module"
    assert "pmim" in terms[0] and "search" in terms[0] and "macs" in terms[0]
    assert method.mask_ratio(10**6, model) == 0.0
    assert not any(p.requires_grad for p in model.decoder_params())  # decoder frozen
    subnet, arch = method.extract(model)
    assert count_macs(arch) == pytest.approx(method.target_macs, rel=0.05)
    assert st.top1 > 0.5  # the learnable synthetic task is still solved (chance: 0.25)
    assert isinstance(model, SearchableViT) and subnet(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_epoch_cap_takes_argmax_and_says_so():
    method, model, opt, loader = _setup(ofb={"alpha_lr": 1e-6})
    train_one_epoch(model, loader, opt, None, torch.device("cpu"), method=method)
    assert not method.finished(model)
    note = method.finalize(model, opt)
    assert "epoch cap" in note and "most probable" in note and method.finished(model)
