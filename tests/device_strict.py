"""A CPU stand-in for an accelerator: tensors that compute on the CPU but report the `meta`
device and obey CUDA's device rules, so device bugs show up on a machine without a GPU.

Inside `StrictDevice()` (a TorchDispatchMode):
- `x.to(DEVICE)` (and any factory with `device=DEVICE`) gives a `StandIn` tensor: CPU data,
  `device` reported as `meta`;
- an op that mixes a StandIn with a CPU tensor of more than one element raises, as CUDA does
  (0-d CPU tensors are allowed, as on CUDA);
- ops that force a host sync on CUDA are counted: `.item()`, `bool()`, `nonzero`, boolean-mask
  indexing, copies back to the CPU (`.cpu()`, `.tolist()`), and blocking host -> device copies
  (`.to(device)` without `non_blocking=True`: CUDA then synchronizes the stream).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("meta")
aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.is_nonzero.default}


# ops CUDA accepts with CPU operands: host-to-device copies, CPU index tensors
HOST_OK = {aten.copy_.default, aten.index.Tensor, aten.index_select.default,
           aten.index_put_.default, aten.index_put.default}


# in-place ops that change a tensor's shape or strides (matmul of a vector uses squeeze_)
INPLACE_VIEWS = {aten.squeeze_.dim, aten.squeeze_.default, aten.squeeze_.dims,
                 aten.unsqueeze_.default, aten.t_.default, aten.transpose_.default,
                 aten.as_strided_.default}


class DeviceMixError(RuntimeError):
    pass


class StandIn(torch.Tensor):
    """CPU data that reports the stand-in device."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, device=DEVICE, requires_grad=elem.requires_grad)

    def __init__(self, elem: torch.Tensor):
        self.elem = elem

    @property
    def is_meta(self) -> bool:  # it has data: code that skips meta tensors (nn.init) must not
        return False

    def tolist(self) -> list:  # not an aten op: a device -> host copy on CUDA, a sync
        if _ACTIVE:
            _ACTIVE[-1].syncs += 1
        return self.elem.tolist()

    def __reduce_ex__(self, proto):  # saved as its CPU data, as torch.load(map_location="cpu")
        return self.elem.__reduce_ex__(proto)

    def __repr__(self) -> str:
        return f"StandIn({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return NotImplemented  # only StrictDevice runs ops on StandIns


def _is_dev(d) -> bool:
    return d is not None and torch.device(d).type == DEVICE.type


_ACTIVE: list[StrictDevice] = []


class StrictDevice(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(a, torch.Tensor)]
        on_dev = any(isinstance(a, StandIn) for a in flat)
        to_dev = _is_dev(kwargs.get("device"))
        if func in (aten._to_copy.default, aten.to.dtype_layout) and on_dev and \
                kwargs.get("device") is not None and not to_dev:
            self.syncs += 1  # device -> host copy
            out = func(*tree_map(_unwrap, args), **kwargs)
            return out
        if on_dev and func not in HOST_OK:
            cpu = [a for a in flat if not isinstance(a, StandIn) and a.dim() > 0
                   and a.numel() > 1]
            if cpu:
                raise DeviceMixError(f"{func}: a {tuple(cpu[0].shape)} CPU tensor meets a tensor "
                                     f"on the device")
        if func in SYNC_OPS or (func is aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if len(args) > 1 else []) if i is not None)):
            self.syncs += on_dev
        if _blocking_upload(func, args, kwargs, to_dev):
            self.syncs += 1
        if to_dev:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*tree_map(_unwrap, args), **kwargs)
        if on_dev and func in INPLACE_VIEWS and isinstance(args[0], StandIn):
            # squeeze_ & co. change the tensor itself: mirror the new shape on the wrapper
            with torch._C._DisableTorchDispatch():
                func(*args, **kwargs)
            return args[0]
        if on_dev or to_dev:
            return tree_map(_wrap, out)
        return out


def _blocking_upload(func, args, kwargs, to_dev: bool) -> bool:
    """A host -> device copy without non_blocking: CUDA's copy then waits for the stream."""
    if func is aten._to_copy.default:
        return to_dev and not isinstance(args[0], StandIn) and not kwargs.get("non_blocking")
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
        blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        return isinstance(dst, StandIn) and not isinstance(src, StandIn) and blocking
    return False


def _unwrap(a):
    return a.elem if isinstance(a, StandIn) else a


def _wrap(a):
    return StandIn(a) if isinstance(a, torch.Tensor) and not isinstance(a, StandIn) else a


def mark_steps(batches, mode: StrictDevice, marks: list[int]):
    """Yield the batches, noting the sync count as each one is taken (= the end of the previous
    step): consecutive differences of `marks` are the syncs per step."""
    for b in batches:
        marks.append(mode.syncs)
        yield b
