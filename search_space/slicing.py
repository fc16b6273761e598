"""Physical slicing of parameters, together with their optimizer state.

A sliced parameter is replaced by a new `nn.Parameter` (changing `.data`'s shape in place
breaks autograd: the old grad accumulator remembers the old shape). The optimizer is updated to
match: the new parameter takes the old one's place in its param group, and per-parameter state
tensors of the old shape (AdamW's exp_avg, exp_avg_sq) are sliced the same way. DDP must be
rebuilt by the caller after any slice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Transform = Callable[[torch.Tensor], torch.Tensor]


def along(dim: int, idx: torch.Tensor) -> Transform:
    """Keep `idx` along `dim`."""
    return lambda t: t.index_select(dim, idx.to(t.device)).contiguous()


def slice_param_(module: nn.Module, name: str, fn: Transform,
                 optimizer: torch.optim.Optimizer | None = None) -> nn.Parameter:
    """Replace `module.<name>` by `fn` of it; its optimizer state goes through `fn` too."""
    old = getattr(module, name)
    new = nn.Parameter(fn(old.detach()), requires_grad=old.requires_grad)
    setattr(module, name, new)
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        if old in optimizer.state:
            st = optimizer.state.pop(old)
            optimizer.state[new] = {
                k: fn(v) if torch.is_tensor(v) and v.shape == old.shape else v
                for k, v in st.items()}
    return new


def slice_linear_(lin: nn.Linear, idx: torch.Tensor, dim: int,
                  optimizer: torch.optim.Optimizer | None = None) -> None:
    """dim=0: keep output features `idx` (rows, and bias); dim=1: keep input features."""
    slice_param_(lin, "weight", along(dim, idx), optimizer)
    if dim == 0:
        if lin.bias is not None:
            slice_param_(lin, "bias", along(0, idx), optimizer)
        lin.out_features = len(idx)
    else:
        lin.in_features = len(idx)


def slice_layernorm_(ln: nn.LayerNorm, idx: torch.Tensor,
                     optimizer: torch.optim.Optimizer | None = None) -> None:
    for name in ("weight", "bias"):
        if getattr(ln, name, None) is not None:
            slice_param_(ln, name, along(0, idx), optimizer)
    ln.normalized_shape = (len(idx),)


def scale_rows_(t: torch.Tensor, scale: torch.Tensor) -> None:
    """Multiply the leading dimension of a weight/bias by `scale` (folding a channel mask)."""
    shape = (-1,) + (1,) * (t.ndim - 1)
    t.data.mul_(scale.to(t.dtype).reshape(shape))
