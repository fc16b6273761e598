"""SPViT as a method of the shared loop: its optimisers, its complexity loss towards the budget,
and what the search reports."""

from __future__ import annotations

import pytest
import torch

from search_space.arch import ViTArch
from search_space.models import unwrap
from tests.trainers.test_method_contract import CPU, _batches, _dense
from trainers.config import SearchConfig
from trainers.loop import train_one_epoch
from trainers.methods import get_method


def _spvit(budget: float = 0.5, **spvit):
    cfg = SearchConfig(method="spvit", budget=budget, epochs=1, lr=1e-3, lr_warmup_epochs=0,
                       spvit=spvit)
    method = get_method("spvit")(cfg, 4, ViTArch.from_timm(_dense()), seed=0)
    method.setup(CPU)
    model = method.wrap(_dense())
    return method, model


def test_published_optimisers():
    method, model = _spvit(arc_lr=5e-4)
    groups = method.param_groups(model)
    theta = [g for g in groups if g.get("name") == "theta"]
    assert len(theta) == 1 and theta[0]["lr"] == 5e-4 and theta[0]["weight_decay"] == 0
    assert {id(p) for p in theta[0]["params"]} == {id(p) for p in unwrap(model).thetas()}
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert not decayed & {id(m.P) for m in unwrap(model).msas()}  # mixing logits: no decay
    assert method.min_lr() == method.cfg.lr and method.grad_clip() is None  # constant, no clip
    assert method.additions() == {"spvit.arc_lr": 5e-4}  # recorded: 1e-3 is the default
    assert _spvit()[0].additions() == {}


def test_complexity_loss_pulls_the_gates_towards_the_budget():
    method, model = _spvit(arc_lr=0.5, complexity_weight=100.0)
    sn = unwrap(model)
    rel = (sn.complexity() - method.target_macs) / method.dense_macs
    terms = method.losses(model, None, torch.zeros(2, dtype=torch.long),
                          torch.zeros(2, 4), None, 0)
    assert terms["complexity"].item() == pytest.approx(100.0 * rel.item() ** 2)
    before = [t.detach().clone() for t in sn.thetas()]
    opt = torch.optim.AdamW(method.param_groups(model), lr=1e-3)
    train_one_epoch(model, _batches()[:4], opt, None, CPU, method=method)
    after = sn.thetas()
    # at dense MACs, above a 50% target: every threshold moves down
    assert all((a < b).all() for a, b in zip(after, before, strict=True))
    m = method.metrics(model)
    assert {"mixers", "mixers_attn", "neurons_kept", "current_macs", "target_macs"} <= set(m)


def test_bad_key_is_refused():
    with pytest.raises(ValueError, match="arc_lr"):
        SearchConfig(method="spvit", spvit={"arc_lr": -1})
