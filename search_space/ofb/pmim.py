"""PMIM, progressive masked image modelling (SimMIM-like), as OFB uses it during the search.

A random fraction of patch embeddings is replaced by a learnable mask token (the sequence keeps
its length); the decoder (1x1 conv + PixelShuffle, in `SearchableViT`) reconstructs the image
from the final-norm patch tokens; the target is the image normalised by its local mean and
variance; the loss is L1 on masked pixels only. It is weighted by stopgrad(L_cls / L_rec), so
it contributes as much as the classification loss in value.

The local-normalisation window is 47 pixels at 224 (published); we scale it with the image size
and round to the nearest odd number >= 3 (5 at 28x28, 7 at 32x32).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def window_size(img_size: int, base: int = 47, base_img: int = 224) -> int:
    k = max(3, round(base * img_size / base_img))
    return k if k % 2 else k + 1


def random_patch_mask(batch: int, num_patches: int, ratio: float, device: torch.device,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N) bool with round(ratio*N) True entries per row, chosen uniformly."""
    n_mask = int(round(ratio * num_patches))
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    idx = noise.argsort(dim=1)[:, :n_mask]
    mask = torch.zeros(batch, num_patches, dtype=torch.bool, device=device)
    return mask.scatter_(1, idx, True)


CHUNK_ELEMENTS = 1 << 17  # float64 planes per chunk: ~1 MB, cache-sized


def _box_sums(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Sums of x over the window [i - k//2, i + k//2] along `dim`, clipped to the image, as
    differences of one prefix sum: O(1) per pixel whatever k. (..., n, ...) -> same."""
    r, n = k // 2, x.shape[dim]
    pad = [0, 0] * (x.dim() - 1 - dim) + [r + 1, r]  # zeros outside the image
    cs = F.pad(x, pad).cumsum(dim)  # cs[j] = sum of the padded row up to j
    return cs.narrow(dim, 2 * r + 1, n) - cs.narrow(dim, 0, n)


@functools.lru_cache(maxsize=16)
def _window_pixels(h: int, w: int, k: int, device: torch.device) -> torch.Tensor:
    """(h, w) pixels inside each clipped k x k window (a constant: built once per shape)."""
    def per_axis(n: int) -> torch.Tensor:
        i, r = torch.arange(n, device=device), k // 2
        return ((i + r + 1).clamp_max(n) - (i - r).clamp_min(0)).double()
    return per_axis(h)[:, None] * per_axis(w)


@torch.no_grad()
def local_normalize(img: torch.Tensor, k: int, eps: float = 1e-6) -> torch.Tensor:
    """(x - local mean) / local std over a k x k window, per channel, with the unbiased
    variance as published (n / (n - 1), n = the window's pixels inside the image).
    (B, C, H, W) -> same, in img's dtype.

    The published code pools with a k x k average (k = 47 at 224 pixels: 4.3 s for 32 images
    on this machine's CPU, far more than the model's step). Box sums from prefix sums give the
    same target in O(1) per pixel. They are taken in float64 on each plane minus its mean
    (float32 prefix sums over 224 pixels lose digits that flat regions, divided by a near-zero
    std, would show), a few planes at a time so the float64 work stays in cache (measured: 2x
    faster than whole batches at 224). The target is a constant of the loss: no autograd.
    """
    B, C, H, W = img.shape
    planes = img.reshape(B * C, 1, H, W)
    per_chunk = max(1, CHUNK_ELEMENTS // (H * W))
    n = _window_pixels(H, W, k, img.device)  # (H, W)
    out = torch.empty_like(planes)
    for src, dst in zip(planes.split(per_chunk), out.split(per_chunk), strict=True):
        x = src.double()
        x = x - x.mean(dim=(2, 3), keepdim=True)
        s1 = _box_sums(_box_sums(x, k, 3), k, 2)
        s2 = _box_sums(_box_sums(x * x, k, 3), k, 2)
        mean = s1 / n
        var = ((s2 - s1 * mean) / (n - 1).clamp_min(1)).clamp_min(0)  # unbiased
        dst.copy_((x - mean) / (var + eps).sqrt())
    return out.reshape(B, C, H, W)


def reconstruction_loss(pred: torch.Tensor, img: torch.Tensor, patch_mask: torch.Tensor,
                        patch_size: int) -> torch.Tensor:
    """L1 between the decoder's output and the locally normalised image, on masked pixels only.

    pred: (B, N, p*p*C), the decoder's tokens before PixelShuffle; img: (B, C, H, W);
    patch_mask: (B, N) bool. The published loss compares images after PixelShuffle; comparing
    tokens with the pixel-unshuffled target is the same sum over the same pixels, without
    building full-resolution masks and errors (what made PMIM's loss costly at 224 pixels).
    """
    B, N, _ = pred.shape
    target = F.pixel_unshuffle(local_normalize(img.float(), window_size(img.shape[-1])),
                               patch_size)  # (B, C*p*p, g, g)
    target = target.flatten(2).transpose(1, 2)  # (B, N, C*p*p): PixelShuffle's channel order
    w = patch_mask.to(pred.dtype)  # (B, N)
    err = ((pred.float() - target).abs().sum(-1) * w).sum()
    return err / (w.sum() * pred.shape[-1]).clamp_min(1.0)


def weighted(l_cls: torch.Tensor, l_rec: torch.Tensor) -> torch.Tensor:
    """stopgrad(L_cls / L_rec) * L_rec."""
    return (l_cls.detach() / l_rec.detach().clamp_min(1e-8)) * l_rec
