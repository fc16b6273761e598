"""ViT-Slim, the two-stage pruners and the dense control through the shared loop's hooks."""

from __future__ import annotations

import pytest
import torch

from search_space.arch import ViTArch
from search_space.cost import count_macs
from search_space.models import build_vit
from trainers.config import DataConfig, SearchConfig
from trainers.data import build_splits, make_loader
from trainers.loop import train_one_epoch
from trainers.methods import get_method, list_methods


def _run(name: str, budget: float, **search):
    torch.manual_seed(0)
    s = build_splits(DataConfig(dataset="synthetic", synthetic_size=384))
    vit = build_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=3,
                    num_classes=4, embed_dim=48, depth=2, num_heads=4)
    dense = {k: v.clone() for k, v in vit.state_dict().items()}
    two_stage = {"score_batches": 4, **search.pop("two_stage", {})}
    cfg = SearchConfig(method=name, budget=budget, two_stage=two_stage, lr=1e-3, **search)
    loader = make_loader(s.train, 32, True, drop_last=True)
    method = get_method(name)(cfg, len(loader), ViTArch.from_timm(vit))
    model = method.wrap(vit)
    opt = torch.optim.AdamW(method.param_groups(model), lr=cfg.lr)
    st = None
    steps = method.max_steps()
    if not method.finished(model):
        st = train_one_epoch(model, loader, opt, None, torch.device("cpu"), method=method,
                             max_steps=steps)
    subnet, arch = method.extract(model)
    return method, model, subnet, arch, st, dense


def test_registry_has_every_method():
    assert {"ofb", "vit_slim", "two_stage_taylor", "two_stage_magnitude",
            "dense_control"} <= set(list_methods())


@pytest.mark.parametrize("name", ["two_stage_taylor", "two_stage_magnitude", "vit_slim"])
@pytest.mark.parametrize("budget", [0.5, 0.3])
def test_subnet_meets_the_budget(name, budget):
    method, model, subnet, arch, st, dense = _run(name, budget)
    target = budget * count_macs(method.dense_arch)
    assert method.target_macs == pytest.approx(target)
    assert target * 0.98 <= count_macs(arch) <= target
    assert count_macs(ViTArch.from_timm(subnet)) == count_macs(arch)
    assert subnet(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    if name == "vit_slim":
        assert "l1" in st.terms
        assert method.metrics(model)["zeta_attn_mean"] < 1.0  # l1 pulls zeta down
    elif name == "two_stage_taylor":
        assert method.batches == 4 and st.steps == 4  # scored 4 batches, then stopped
    if name.startswith("two_stage"):  # stage 1 never changes the weights (lr 0)
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in dense.items())


def test_uniform_allocation_and_the_dense_control():
    method, _, subnet, arch, _, _ = _run("two_stage_taylor", 0.5,
                                         two_stage={"allocation": "uniform"})
    assert len({b.mlp_hidden for b in arch.blocks}) == 1
    assert count_macs(arch) <= 0.5 * count_macs(method.dense_arch)
    method, _, subnet, arch, st, _ = _run("dense_control", 0.5)
    assert st is None and arch == method.dense_arch  # not pruned, not trained
    assert method.target_macs == count_macs(arch)


def test_vit_slim_with_token_multipliers():
    method, model, subnet, arch, st, _ = _run("vit_slim", 0.4, vit_slim={"tokens": True})
    target = 0.4 * count_macs(method.dense_arch)
    assert target * 0.98 <= count_macs(arch) <= target
    kept = [set(t) for t in arch.tokens]
    assert all(b <= a for a, b in zip(kept, kept[1:], strict=False))  # monotone over depth
    assert ViTArch.from_timm(subnet) == arch
    assert subnet(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    assert "l1" in st.terms and all(not torch.all(z == 1) for z in model.zeta_tok)  # trained
    assert 0 < method.metrics(model)["tanh_zeta_tok_mean"] < 1


def test_vit_slim_stage_2_reports_its_choice():
    """One q/k width per exported block: the note says which heads x dims each block keeps and
    how much of the published per-(head, dim) mask's |zeta| that retains (<= 100%)."""
    import re

    method, model, _, arch, _, _ = _run("vit_slim", 0.5)
    note = method.finalize(model, None)
    m = re.search(r"per block (.*): ([\d.]+)% of the", note)
    assert m, note
    shape = [tuple(map(int, b.split("x"))) for b in m.group(1).split(", ")]
    assert shape == [(b.num_heads, b.head_dim) for b in arch.blocks]
    assert 50 < float(m.group(2)) <= 100
