"""Which weights follow one unit of a timm ViT, written once.

A unit is an embedding channel (one channel of the residual stream), an attention unit
(head h, dim j: one row of q, k and v each, and one column of proj), or an MLP hidden unit
(a row of fc1 with its bias, a column of fc2). Removing, scoring, masking or folding a unit
touches exactly its group. The supernet's slicing, the subnet fold, the two-stage pruner and the
importance scores all read the groups from here, so the four can never disagree.

A `Member` names one tensor (a state-dict key), the axis along which it holds the unit, and
where the unit's slab starts on that axis (q, k and v are thirds of qkv). Embedding members
carry a role: `entry` tensors put the channel into the stream (patch embedding, cls / register /
mask tokens, pos-embed), `write` tensors are branch outputs added to it (proj, fc2 rows and
biases), `read` tensors take it in (qkv, fc1, head, PMIM decoder columns), `norm` tensors scale
it per channel (LayerNorm affine, layer scale).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from search_space.slicing import along, slice_param_


@dataclass(frozen=True)
class Member:
    key: str  # state-dict key, e.g. "blocks.0.attn.qkv.weight"
    dim: int  # the axis that indexes the unit (negative: from the end)
    offset: int = 0  # where the unit's slab starts on that axis
    role: str = ""  # embed: entry | write | read | norm; attention: q | k | v | proj


# (pattern on the key's tail, axis, role) of every tensor that follows an embedding channel
_EMBED_RULES = [
    (r"patch_embed\.proj\.(weight|bias)", 0, "entry"),
    (r"(cls_token|reg_token|pos_embed|mask_token)", -1, "entry"),
    (r"attn\.proj\.(weight|bias)|mlp\.fc2\.(weight|bias)", 0, "write"),
    (r"attn\.qkv\.weight|mlp\.fc1\.weight|head\.weight|decoder\.weight", 1, "read"),
    (r"(norm1|norm2|norm|fc_norm|norm_pre)\.(weight|bias)|ls[12]\.gamma", 0, "norm"),
]
_EMBED = [(re.compile(rf"(^|\.){p}$"), d, r) for p, d, r in _EMBED_RULES]


def embed_members(keys: Iterable[str]) -> list[Member]:
    """The members of an embedding channel among `keys` (a model's parameter names)."""
    out = []
    for k in keys:
        for pat, dim, role in _EMBED:
            if pat.search(k):
                out.append(Member(k, dim, 0, role))
                break
    return out


def attn_members(prefix: str, inner: int, bias: bool = True) -> list[Member]:
    """Attention unit r = h * d + j of a block (`prefix` ends with "attn." or is ""):
    q, k and v rows r (+ biases), proj column r. `inner` = heads * head dim now."""
    out = []
    for i, part in enumerate("qkv"):
        out.append(Member(f"{prefix}qkv.weight", 0, i * inner, part))
        if bias:
            out.append(Member(f"{prefix}qkv.bias", 0, i * inner, part))
    return [*out, Member(f"{prefix}proj.weight", 1, 0, "proj")]


def mlp_members(prefix: str, bias: bool = True) -> list[Member]:
    """MLP hidden unit j (`prefix` ends with "mlp." or is ""): fc1 row j (+ bias), fc2 column."""
    return [Member(f"{prefix}fc1.weight", 0), *([Member(f"{prefix}fc1.bias", 0)] if bias else []),
            Member(f"{prefix}fc2.weight", 1)]


def _by_key(members: Iterable[Member]) -> dict[str, list[Member]]:
    out: dict[str, list[Member]] = defaultdict(list)
    for m in members:
        out[m.key].append(m)
    return out


def _index(ms: list[Member], idx: torch.Tensor) -> torch.Tensor:
    """Indices along the members' axis: the kept units of every slab, slab by slab."""
    return torch.cat([idx + m.offset for m in ms])


def take(tensors: dict[str, torch.Tensor], members: Iterable[Member],
         idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """A copy of `tensors` in which every member keeps only the units `idx` (sorted)."""
    out = dict(tensors)
    for key, ms in _by_key(members).items():
        t = out[key]
        out[key] = t.index_select(ms[0].dim % t.ndim, _index(ms, idx).to(t.device))
    return out


def unit_sums(tensors: dict[str, torch.Tensor], members: Iterable[Member],
              n: int) -> torch.Tensor:
    """Per unit (n,), the sum of every member's entries over the unit's group (e.g. per-weight
    importance summed into unit importance)."""
    total = None
    for m in members:
        t = tensors[m.key]
        t = t.movedim(m.dim % t.ndim, 0).narrow(0, m.offset, n)  # (n, ...)
        s = t.reshape(n, -1).sum(1)
        total = s if total is None else total + s
    return total


def scale_(tensors: dict[str, torch.Tensor], members: Iterable[Member],
           scale: torch.Tensor | dict[str, torch.Tensor]) -> None:
    """Multiply each member's slab by a per-unit `scale` (n,) in place (folding a mask); a
    dict gives one scale per role (e.g. q rows also take the softmax-scale fix)."""
    for m in members:
        s = scale[m.role] if isinstance(scale, dict) else scale
        t = tensors[m.key]
        slab = t.movedim(m.dim % t.ndim, 0).narrow(0, m.offset, s.numel())  # a view
        slab.mul_(s.to(t.device, t.dtype).reshape((-1,) + (1,) * (t.ndim - 1)))


def slice_(root: nn.Module, members: Iterable[Member], idx: torch.Tensor,
           optimizer: torch.optim.Optimizer | None = None) -> None:
    """Physically keep units `idx` in `root`'s parameters (with their optimizer state), then
    bring the touched modules' shape attributes up to date."""
    owners = set()
    for key, ms in _by_key(members).items():
        owner_name, _, attr = key.rpartition(".")
        owner = root.get_submodule(owner_name)
        t = getattr(owner, attr)
        slice_param_(owner, attr, along(ms[0].dim % t.ndim, _index(ms, idx)), optimizer)
        owners.add(owner)
    for mod in owners:
        refresh_shape(mod)


def refresh_shape(mod: nn.Module) -> None:
    """Shape attributes of a Linear / LayerNorm / Conv2d from its (sliced) weight."""
    w = getattr(mod, "weight", None)
    if w is None:
        return
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = w.shape
    elif isinstance(mod, nn.LayerNorm):
        mod.normalized_shape = (w.shape[0],)
    elif isinstance(mod, nn.Conv2d):
        mod.out_channels, mod.in_channels = w.shape[0], w.shape[1] * mod.groups
