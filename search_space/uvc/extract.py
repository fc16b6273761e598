"""UVC's subnet: skipped blocks removed, kept heads with their kept value dims, kept neurons.

Exact: the subnet computes what `UVCViT` computes in eval mode (hard gates, removed groups
masked). A skipped block is absent (depth shrinks), a removed head loses its q, k and v rows and
its proj columns, a removed value dim one v row and one proj column (q and k keep `head_dim`, so
the softmax scale is unchanged), a removed neuron one fc1 row and one fc2 column. Ties in
importance go by index, as in the search's masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer

from search_space.arch import BlockArch, ViTArch
from search_space.cost import count_macs
from search_space.subnet import build_from_arch
from search_space.uvc.searchable import Importance, UVCViT
from search_space.widths import round_within


@dataclass
class UVCPlan:
    """Host-side copy of what the subnet keeps, by dense index."""

    run: list[int]  # kept blocks
    heads: list[list[int]]  # per kept block: kept heads
    dims: list[list[list[int]]]  # per kept block and kept head: kept value dims
    neurons: list[list[int]]  # per kept block: kept MLP neurons

    def arch(self, dense: ViTArch) -> ViTArch:
        d = dense.blocks[0].head_dim
        blocks = []
        for heads, dims, neurons in zip(self.heads, self.dims, self.neurons, strict=True):
            v = tuple(len(x) for x in dims)
            blocks.append(BlockArch(len(heads), d, len(neurons),
                                    v_dims=None if all(x == d for x in v) else v))
        return ViTArch(**{**dense.to_dict(), "blocks": tuple(blocks)})


def plan_of(sn: UVCViT) -> UVCPlan:
    run, cols, neurons = (t.cpu() for t in sn.keep_masks())
    cols = cols.unflatten(-1, (sn.H, sn.d))  # (L, H, d)
    keep = [int(i) for i in run.nonzero().flatten()]
    heads = [[h for h in range(sn.H) if cols[i, h].any()] for i in keep]
    dims = [[cols[i, h].nonzero().flatten().tolist() for h in hs]
            for i, hs in zip(keep, heads, strict=True)]
    return UVCPlan(keep, heads, dims, [neurons[i].nonzero().flatten().tolist() for i in keep])


def round_plan(plan: UVCPlan, imp: Importance, multiple: int, dense: ViTArch,
               limit: float) -> UVCPlan:
    """`plan` with each kept head's value dims and each block's MLP neurons rounded to a
    multiple by the search's own importance (squared column norms), nearest first, then down
    where needed to stay within `limit` MACs (the budget, or the unrounded plan's MACs if the
    search ended above it: rounding never buys a method MACs its search did not spend)."""
    c, n = imp.c.cpu(), imp.n.cpu()  # (L, H, d), (L, h): a one-off choice on the host
    scores = [c[i, h] for i, hs in zip(plan.run, plan.heads, strict=True) for h in hs]
    kept = [torch.tensor(js, dtype=torch.long) for jss in plan.dims for js in jss]
    scores += [n[i] for i in plan.run]
    kept += [torch.tensor(ns, dtype=torch.long) for ns in plan.neurons]
    n_heads = [len(hs) for hs in plan.heads]

    def as_plan(units: list[torch.Tensor]) -> UVCPlan:
        it = iter(u.tolist() for u in units)
        dims = [[next(it) for _ in range(k)] for k in n_heads]
        return UVCPlan(plan.run, plan.heads, dims, [next(it) for _ in plan.run])

    return as_plan(round_within(scores, kept, multiple,
                                lambda u: count_macs(as_plan(u).arch(dense)), limit))


@torch.no_grad()
def extract_subnet(sn: UVCViT, plan: UVCPlan | None = None) -> tuple[VisionTransformer, ViTArch]:
    """The physically smaller timm ViT of `plan` (default: the current state's)."""
    plan = plan_of(sn) if plan is None else plan
    arch = plan.arch(sn.dense_arch)
    sd = {k: v.detach().clone() for k, v in sn.vit.state_dict().items()}
    out = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    H, d = sn.H, sn.d
    for new, (old, heads, dims, neurons) in enumerate(zip(plan.run, plan.heads, plan.dims,
                                                          plan.neurons, strict=True)):
        src, dst = f"blocks.{old}.", f"blocks.{new}."
        blk = {k[len(src):]: v for k, v in sd.items() if k.startswith(src)}
        qk = [h * d + j for h in heads for j in range(d)]
        vcols = [h * d + j for h, js in zip(heads, dims, strict=True) for j in js]
        rows = torch.tensor(qk + [H * d + i for i in qk] + [2 * H * d + i for i in vcols])
        blk["attn.qkv.weight"] = blk["attn.qkv.weight"][rows]
        if "attn.qkv.bias" in blk:
            blk["attn.qkv.bias"] = blk["attn.qkv.bias"][rows]
        blk["attn.proj.weight"] = blk["attn.proj.weight"][:, torch.tensor(vcols)]
        keep = torch.tensor(neurons)
        blk["mlp.fc1.weight"], blk["mlp.fc1.bias"] = blk["mlp.fc1.weight"][keep], \
            blk["mlp.fc1.bias"][keep]
        blk["mlp.fc2.weight"] = blk["mlp.fc2.weight"][:, keep]
        out.update({dst + k: v.contiguous() for k, v in blk.items()})
    dev = sd["pos_embed"].device
    model = build_from_arch(arch, device=dev)
    model.load_state_dict({k: v.to(dev) for k, v in out.items()}, strict=True)
    return model.eval(), arch
