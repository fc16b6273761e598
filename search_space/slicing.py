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
