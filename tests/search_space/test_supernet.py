"""The searchable ViT: gradients, slicing with optimizer state, folding, export, ONNX."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from search_space.cost import count_macs, measure_macs
from search_space.models import build_vit
from search_space.ofb.extract import extract_subnet
from search_space.ofb.modules import SearchableAttention, SearchableMlp, head_candidates
from search_space.ofb.supernet import SearchableViT
from search_space.subnet import export_onnx, export_subnet, load_subnet

FOLD_ATOL = 1e-5  # fold + export vs the searchable model in eval mode, fp32


def tiny_vit(seed: int = 0, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, in_chans=3, num_classes=5, embed_dim=48, depth=2,
                num_heads=4)
    args.update(kw)
    return build_vit("vit_tiny_patch16_224", **args)


def test_candidate_lists():
    assert head_candidates(3) == [1, 2, 3]
    assert head_candidates(6) == [2, 4, 6] and head_candidates(12) == [2, 4, 6, 8, 10, 12]
    sn = SearchableViT(tiny_vit())
    attn = sn.vit.blocks[0].attn
    assert sorted(set(attn.cand_dims.tolist())) == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert sn.vit.blocks[0].mlp.cand_widths.tolist() == [48, 72, 96, 120, 144, 168, 192]
    assert sn.vit.patch_embed.cand_widths.tolist()[0] == 24
    assert sn.vit.patch_embed.cand_widths.tolist()[-1] == 48


def test_wrapping_keeps_weights_and_every_search_param_learns():
    vit = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = vit.eval()(x)
    sn = SearchableViT(copy.deepcopy(vit)).eval()
    for m in sn.searchable():  # full widths with masks of exactly 1 reproduce the dense model
        with torch.no_grad():
            full = m.cand_heads * m.cand_dims if hasattr(m, "cand_heads") else m.cand_widths
            m.alpha.copy_(full.float())
        m.finish()
        assert m.channel_scale.requires_grad  # as published: the finished scale trains on
        with torch.no_grad():
            m.channel_scale.fill_(1.0)
    with torch.no_grad():
        assert torch.allclose(sn(x), ref, atol=1e-5)
    sn = SearchableViT(copy.deepcopy(vit)).train()
    sn.set_schedule(0.5, 1.0)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, :4] = True
    logits, recon = sn(x, mask)
    assert sn.to_image(recon).shape == x.shape
    (logits.sum() + recon.mean() + sum(m.search_loss() for m in sn.searchable())
     + sn.expected_macs() / 1e6).backward()
    for name, p in sn.named_parameters():
        if p.requires_grad:  # a channel scale learns only once its module is finished
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for m in sn.searchable():
        assert m.alpha.grad.abs().sum() > 0 and m.S.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [SearchableAttention, SearchableMlp])
def test_slicing_is_output_preserving_and_slices_optimizer_state(cls):
    torch.manual_seed(1)
    vit = tiny_vit()
    dense = vit.blocks[0].attn if cls is SearchableAttention else vit.blocks[0].mlp
    a = cls.from_dense(dense)
    a.lam = 0.3
    with torch.no_grad():  # make the widest candidates improbable: they will be dropped
        a.alpha.copy_(torch.linspace(3, -3, len(a.alpha)))
        if cls is SearchableAttention:
            a.alpha.copy_(-5.0 * ((a.cand_heads == 4) | (a.cand_dims >= 10)).float())
    with torch.no_grad():  # distinct values, so kept entries can be found again by value
        for n, p in a.named_parameters():
            if n != "alpha":
                p.copy_(torch.randn_like(p) * 0.2)
    opt = torch.optim.AdamW(a.parameters(), lr=1e-3)
    x = torch.randn(2, 17, 48)
    a(x).sum().backward()
    opt.step()
    b = copy.deepcopy(a)
    before = {n: p.detach().clone() for n, p in a.named_parameters()}
    state_before = {n: opt.state[p]["exp_avg"].clone() for n, p in a.named_parameters()
                    if p in opt.state}  # not the channel scale: no gradient before `finish`
    assert a.eliminate(0.2, slice_weights=True, optimizer=opt)
    b.eliminate(0.2, slice_weights=False)
    assert a.S.shape != b.S.shape  # physically smaller
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-6)
    for n, p in a.named_parameters():
        if n not in state_before:
            continue
        st = opt.state[p]["exp_avg"]
        assert st.shape == p.shape, n
        if p.shape == before[n].shape:
            continue
        # every kept row/column of the parameter comes with the same row/column of its state
        flat_p, flat_b = p.detach().reshape(-1), before[n].reshape(-1)
        pos = [int((flat_b == v).nonzero()[0]) for v in flat_p[:5]]
        assert torch.equal(st.reshape(-1)[:5], state_before[n].reshape(-1)[pos]), n
    # a finished module: output is its frozen mask applied, unchanged by a further slice
    a.finish(opt)
    with torch.no_grad():
        y = a(x)
        a.slice_to_widest(opt)
        assert torch.equal(a(x), y)


def _finished_supernet(seed: int = 0, mask_branches: bool = False) -> SearchableViT:
    sn = SearchableViT(tiny_vit(seed), mask_branches=mask_branches).eval()
    sn.set_schedule(0.1, 1.0)
    g = torch.Generator().manual_seed(seed)
    for m in sn.searchable():
        with torch.no_grad():
            m.alpha.add_(torch.randn(m.alpha.shape, generator=g) * 3)
            m.S.add_(torch.randn(m.S.shape, generator=g))
        m.finish()
    return sn


def test_embedding_mask_on_branches_option_folds_too():
    """Ours, off by default: the embedding mask on every branch output; the fold follows it."""
    x = torch.randn(4, 3, 32, 32)
    outs = []
    for mask_branches in (False, True):
        sn = _finished_supernet(seed=3, mask_branches=mask_branches)
        with torch.no_grad():
            ref = sn(x)
            out = extract_subnet(sn)[0](x)
        assert torch.allclose(out, ref, atol=FOLD_ATOL), (mask_branches, (out - ref).abs().max())
        outs.append(ref)
    assert not torch.allclose(outs[0], outs[1])  # the two rules are different models


def test_expected_macs_equal_actual_when_one_hot():
    sn = _finished_supernet()
    assert float(sn.expected_macs()) == pytest.approx(count_macs(sn.current_arch()), rel=1e-6)
    assert count_macs(sn.current_arch()) < count_macs(sn.dense_arch)


def test_fold_export_reload_and_onnx(tmp_path):
    sn = _finished_supernet(seed=3)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = sn(x)
    sub, arch = extract_subnet(sn)
    with torch.no_grad():
        out = sub(x)
    assert torch.allclose(out, ref, atol=FOLD_ATOL), (out - ref).abs().max()
    # a narrowed head dim keeps the searched softmax scale though fused attention is used
    assert any(b.head_dim != 12 for b in arch.blocks)
    assert count_macs(arch) == pytest.approx(measure_macs(sub, arch), rel=0.01)

    folder = export_subnet(sub, arch, tmp_path / "subnet", extra={"macs": count_macs(arch)})
    assert json.loads((folder / "arch.json").read_text())["macs"] == count_macs(arch)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch\n"
        "from search_space.subnet import load_subnet\n"
        f"m = load_subnet({str(folder)!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        f"torch.save(m(x).detach(), {str(tmp_path / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    y = torch.load(tmp_path / "y.pt", weights_only=True)
    assert torch.allclose(y, ref, atol=FOLD_ATOL)

    import onnxruntime as ort

    path = export_onnx(load_subnet(folder), arch, tmp_path / "model.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = sess.run(None, {"images": x.numpy()})
    assert torch.allclose(torch.from_numpy(onnx_out), ref, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="arch.json is missing"):
        load_subnet(tmp_path)


def test_search_state_restores_sliced_supernet():
    sn = SearchableViT(tiny_vit(5)).eval()
    sn.set_schedule(0.4, 1.0)
    opt = torch.optim.AdamW(sn.parameters())
    with torch.no_grad():
        for m in sn.searchable():
            m.alpha.copy_(torch.linspace(2, -2, len(m.alpha)))
    for m in sn.searchable():
        m.eliminate(0.2, optimizer=opt)
    sn.vit.blocks[1].mlp.finish(opt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = sn(x)
    fresh = SearchableViT(tiny_vit(99)).eval()
    fresh.set_schedule(0.4, 1.0)
    fresh.load_search_state(sn.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh(x), ref, atol=1e-6)
    assert fresh.current_arch() == sn.current_arch()
    assert not fresh.vit.blocks[1].mlp.alpha.requires_grad


def test_unsupported_vit_is_refused():
    with pytest.raises(ValueError, match="class token"):
        SearchableViT(tiny_vit(class_token=False, global_pool="avg"))


def test_pmim_mask_token_goes_in_after_the_pos_embed():
    """As published, masked tokens carry no position: with every patch masked, the patches'
    position embeddings cannot change the output."""
    sn = SearchableViT(tiny_vit(1)).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.ones(2, sn.dense_arch.num_patches, dtype=torch.bool)
    with torch.no_grad():
        a, _ = sn(x, mask)
        sn.vit.pos_embed[:, 1:].add_(torch.randn_like(sn.vit.pos_embed[:, 1:]))
        b, _ = sn(x, mask)
        c, _ = sn(x, torch.zeros_like(mask))
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, c)


def test_pmim_target_uses_the_unbiased_local_variance():
    from search_space.ofb.pmim import local_normalize

    img = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    out = local_normalize(img, 3, eps=0.0)
    win = img[0, 1, 3:6, 3:6]  # the window around pixel (4, 4), all inside the image
    expected = (img[0, 1, 4, 4] - win.mean()) / win.std(unbiased=True)
    assert float(out[0, 1, 4, 4]) == pytest.approx(float(expected), rel=1e-9)
    corner = img[0, 0, :2, :2]  # at (0, 0) only 4 pixels are inside
    assert float(out[0, 0, 0, 0]) == pytest.approx(
        float((img[0, 0, 0, 0] - corner.mean()) / corner.std(unbiased=True)), rel=1e-9)


def _pooled_local_normalize(img, k, eps=1e-6):
    """The published k x k average-pool target (slow at 224 pixels), as the reference."""
    import torch.nn.functional as F

    pool = dict(kernel_size=k, stride=1, padding=k // 2, count_include_pad=False)
    mean = F.avg_pool2d(img, **pool)
    var = (F.avg_pool2d(img * img, **pool) - mean * mean).clamp_min(0)
    n = F.avg_pool2d(torch.ones_like(img[:1, :1]), kernel_size=k, stride=1, padding=k // 2,
                     count_include_pad=True) * (k * k)
    return (img - mean) / (var * n / (n - 1).clamp_min(1) + eps).sqrt()


@pytest.mark.parametrize("shape,k", [((2, 1, 28, 28), 5), ((1, 3, 224, 224), 47),
                                     ((2, 2, 5, 7), 5), ((3, 1, 32, 20), 7), ((1, 1, 9, 9), 3)])
def test_pmim_target_from_prefix_sums_equals_the_pooled_one(shape, k):
    from search_space.ofb.pmim import local_normalize

    g = torch.Generator().manual_seed(0)
    img = torch.rand(shape, generator=g, dtype=torch.float64)
    img[..., : shape[-2] // 2, :] = 0.0  # a flat region, where the std is ~0
    ref = _pooled_local_normalize(img, k)
    out = local_normalize(img.float(), k)
    assert out.dtype == torch.float32 and not out.requires_grad
    assert (out.double() - ref).abs().max() < 1e-5


def test_pmim_loss_on_tokens_equals_the_published_loss_on_images():
    """The token-space L1 sums the same masked pixels as the published image-space L1."""
    from search_space.ofb.pmim import local_normalize, reconstruction_loss, window_size

    vit = build_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=3,
                    num_classes=10, embed_dim=32, depth=2, num_heads=2)
    sn = SearchableViT(vit).train()
    x = torch.randn(3, 3, 32, 32)
    mask = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) < 0.4
    _, z = sn(x, mask)
    img = sn.to_image(z)  # (B, C, H, W)
    pix = mask.reshape(3, 1, 4, 4).float().repeat_interleave(8, 2).repeat_interleave(8, 3)
    err = (img - local_normalize(x, window_size(32))).abs() * pix
    published = err.sum() / (pix.sum() * 3)
    assert torch.allclose(reconstruction_loss(z, x, mask, 8), published, rtol=1e-5)


def test_the_step_terms_give_the_per_module_losses_and_macs():
    """One (p, sigmoid(S)) per module and step, shared by the forward, the batched search loss
    and the MACs loss: the same values as each module computing its own."""
    vit = build_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=3,
                    num_classes=10, embed_dim=32, depth=2, num_heads=4)
    sn = SearchableViT(vit).train()
    sn.set_schedule(0.5, 1.0)
    mods = sn.searchable()
    mods[1].eliminate(0.9)  # modules at different live counts, one of them sliced
    mods[2].finish()
    sn(torch.randn(2, 3, 32, 32))
    terms = sn.pop_terms()
    assert sn.pop_terms() is None and len(terms) == len(mods) - 1
    want = sum(m.search_loss(0.7) for m in mods)
    assert torch.allclose(sn.search_loss(0.7, terms), want, atol=1e-6)
    assert torch.allclose(sn.expected_macs(terms), sn.expected_macs())
