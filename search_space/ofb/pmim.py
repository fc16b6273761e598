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


def local_normalize(img: torch.Tensor, k: int, eps: float = 1e-6) -> torch.Tensor:
    """(x - local mean) / local std over a k x k window, per channel, with the unbiased
    variance as published (n / (n - 1), n = the window's pixels inside the image).
    (B, C, H, W) -> same."""
    pool = dict(kernel_size=k, stride=1, padding=k // 2, count_include_pad=False)
    mean = F.avg_pool2d(img, **pool)
    var = (F.avg_pool2d(img * img, **pool) - mean * mean).clamp_min(0)
    n = F.avg_pool2d(torch.ones_like(img[:1, :1]), kernel_size=k, stride=1, padding=k // 2,
                     count_include_pad=True) * (k * k)  # (1, 1, H, W)
    return (img - mean) / (var * n / (n - 1).clamp_min(1) + eps).sqrt()


def reconstruction_loss(pred: torch.Tensor, img: torch.Tensor, patch_mask: torch.Tensor,
                        patch_size: int) -> torch.Tensor:
    """L1 between pred and the locally normalised image, on masked pixels only."""
    B, C, H, W = img.shape
    g = H // patch_size
    pix = patch_mask.reshape(B, 1, g, g).to(img.dtype)
    pix = pix.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)  # (B, 1, H, W)
    target = local_normalize(img.float(), window_size(H))
    err = (pred.float() - target).abs() * pix
    return err.sum() / (pix.sum() * C).clamp_min(1.0)


def weighted(l_cls: torch.Tensor, l_rec: torch.Tensor) -> torch.Tensor:
    """stopgrad(L_cls / L_rec) * L_rec."""
    return (l_cls.detach() / l_rec.detach().clamp_min(1e-8)) * l_rec
