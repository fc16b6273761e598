"""Physical slicing of parameters in place, together with their optimizer state.

Parameters keep their identity (`param.data` is replaced), so optimizer param groups stay valid;
per-parameter state tensors of the same shape (AdamW's exp_avg, exp_avg_sq) are sliced with the
same indices. DDP must be rebuilt by the caller after any slice (its buckets know old sizes).
"""

from __future__ import annotations

import torch
from torch import nn


def slice_tensor_(t: torch.Tensor | nn.Parameter, dim: int, idx: torch.Tensor,
                  optimizer: torch.optim.Optimizer | None = None) -> None:
    """Keep `idx` along `dim` of a parameter or buffer, and of its optimizer state."""
    idx = idx.to(t.device)
    old_shape = t.shape
    t.data = t.data.index_select(dim, idx).contiguous()
    if isinstance(t, nn.Parameter):
        t.grad = None
        if optimizer is not None and t in optimizer.state:
            st = optimizer.state[t]
            for k, v in list(st.items()):
                if torch.is_tensor(v) and v.shape == old_shape:
                    st[k] = v.index_select(dim, idx.to(v.device)).contiguous()


def slice_linear_(lin: nn.Linear, idx: torch.Tensor, dim: int,
                  optimizer: torch.optim.Optimizer | None = None) -> None:
    """dim=0: keep output features `idx` (rows, and bias); dim=1: keep input features."""
    slice_tensor_(lin.weight, dim, idx, optimizer)
    if dim == 0:
        if lin.bias is not None:
            slice_tensor_(lin.bias, 0, idx, optimizer)
        lin.out_features = len(idx)
    else:
        lin.in_features = len(idx)


def slice_layernorm_(ln: nn.LayerNorm, idx: torch.Tensor,
                     optimizer: torch.optim.Optimizer | None = None) -> None:
    if ln.weight is not None:
        slice_tensor_(ln.weight, 0, idx, optimizer)
    if ln.bias is not None:
        slice_tensor_(ln.bias, 0, idx, optimizer)
    ln.normalized_shape = (len(idx),)


def scale_rows_(t: torch.Tensor, scale: torch.Tensor) -> None:
    """Multiply the leading dimension of a weight/bias by `scale` (folding a channel mask)."""
    shape = (-1,) + (1,) * (t.ndim - 1)
    t.data.mul_(scale.to(t.dtype).reshape(shape))
