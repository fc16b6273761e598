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

# our short-search additions (off by default): the budget-first rule with its adaptive MACs
# weight, elimination after the ramp, a faster alpha
BUDGET_FIRST = {"alpha_lr": 0.05, "macs_tolerance": 0.02, "defer_elimination": True}


def _setup(published: bool = False, **search):
    torch.manual_seed(0)
    s = build_splits(DataConfig(dataset="synthetic", synthetic_size=640))
    vit = build_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=3,
                    num_classes=4, embed_dim=48, depth=2, num_heads=4)
    ofb = {**({} if published else BUDGET_FIRST), "ramp_epochs": 0.5,
           "eliminations_per_epoch": 4, **search.pop("ofb", {})}
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


def _search(method, model, opt, loader, epochs: int = 20):
    n, terms = len(loader), []
    for epoch in range(epochs):
        st = train_one_epoch(model, loader, opt, None, torch.device("cpu"), method=method,
                             step_offset=epoch * n, label_smoothing=0.1)
        terms.append(st.terms)
        if method.finished(model):
            break
    return st, terms


@pytest.mark.parametrize("budget", [0.5, 0.3])
def test_budget_first_search_never_lands_above_its_target(budget):
    """Our one-sided budget-first option: the subnet is at most its target and not far below
    (measured: 0.887x and 0.940x after 20 and 9 epochs); modules still open at the epoch cap
    are decided by argmax and counted."""
    method, model, opt, loader = _setup(budget=budget)
    st, terms = _search(method, model, opt, loader)
    assert "pmim" in terms[0] and "search" in terms[0] and "macs" in terms[0]
    note = method.finalize(model, opt)
    assert method.finished(model) and (method.decided_by_argmax > 0) == bool(note)
    assert method.mask_ratio(10**6, model) == 0.0
    assert not any(p.requires_grad for p in model.decoder_params())  # decoder frozen
    subnet, arch = method.extract(model)
    assert 0.85 * method.target_macs <= count_macs(arch) <= method.target_macs
    assert st.top1 > 0.5  # the learnable synthetic task is still solved (chance: 0.25)
    assert isinstance(model, SearchableViT) and subnet(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    assert set(method.additions()) == {f"ofb.{k}" for k in BUDGET_FIRST}


def test_published_short_search_is_recorded_honestly():
    """The published rule (alpha at the weights' lr, no budget tolerance) needs the published
    100-epoch schedule; 20 tiny epochs eliminate nothing, every module is decided by argmax at
    the cap, and the record says so (measured: 1.14x the target at a 50% budget)."""
    method, model, opt, loader = _setup(published=True, budget=0.5)
    assert method.additions() == {}
    _search(method, model, opt, loader)
    note = method.finalize(model, opt)
    _, arch = method.extract(model)
    assert count_macs(arch) < method.dense_macs
    n_modules = len(model.searchable())
    assert method.decided_by_argmax == n_modules and f"{n_modules} undecided" in note


def test_epoch_cap_takes_argmax_and_says_so():
    method, model, opt, loader = _setup(ofb={"alpha_lr": 1e-6})
    train_one_epoch(model, loader, opt, None, torch.device("cpu"), method=method)
    assert not method.finished(model)
    note = method.finalize(model, opt)
    assert "epoch cap" in note and "most probable" in note and method.finished(model)
