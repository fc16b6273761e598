"""SPViT's subnet, read from the gates (no hand-copied indicators, METHODS.md 6c): each block's
mixer kind from its thresholds, conv paths folded into plain Conv2d + BatchNorm2d + ReLU +
Linear (`ConvMixer`, starting from the searched weights: the folded kernel, the path's BN
statistics, the mixed output projection), MLPs with their gated-on neurons.

Exact: in eval mode the searchable model with the same gate decisions computes the same logits
(float rounding aside): the conv paths use the very kernels folded here, BN in eval mode uses
its running statistics in both, an off neuron's GELU output is multiplied by 0 there and absent
here, and an off mixer adds 0 there and is absent here (norm1 dropped with it).
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from search_space.arch import ViTArch
from search_space.cost import count_macs
from search_space.spvit.supernet import SPViTSearch
from search_space.subnet import build_from_arch
from search_space.widths import round_within

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def rounded_neurons(sn: SPViTSearch, multiple: int, limit: float) -> list[torch.Tensor]:
    """Each block's gated-on MLP neurons, their count rounded to a multiple by the gate
    thresholds theta (a higher theta is further from switching off), nearest first, then down
    where needed to stay within `limit` MACs (the budget, or the unrounded subnet's MACs if the
    search ended above it)."""
    thetas = [blk.mlp.theta.detach().cpu() for blk in sn.vit.blocks]
    return round_within(thetas, sn.kept_neurons(), multiple,
                        lambda kept: count_macs(sn.current_arch(kept)), limit)


@torch.no_grad()
def extract_subnet(sn: SPViTSearch, kept_neurons: list[torch.Tensor] | None = None
                   ) -> tuple[VisionTransformer, ViTArch]:
    """`kept_neurons`: per block, the MLP units to keep (default: those gated on)."""
    kept_neurons = sn.kept_neurons() if kept_neurons is None else kept_neurons
    arch = sn.current_arch(kept_neurons)
    sd = {k: v.detach().clone() for k, v in sn.vit.state_dict().items()}
    out = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    for i, (blk, b, kept) in enumerate(zip(sn.vit.blocks, arch.blocks, kept_neurons,
                                           strict=True)):
        p = f"blocks.{i}."
        own = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
        keep = {k: v for k, v in own.items()
                if k.startswith(("norm2.", "ls1.", "ls2.")) or k.startswith("norm1.")
                and b.mixer != "none"}
        if b.mixer == "attn":
            keep.update({k: v for k, v in own.items() if k.startswith(("attn.qkv.", "attn.proj."))})
        elif b.mixer in ("conv3", "conv1"):
            k = 3 if b.mixer == "conv3" else 1
            w, bias, w_out = blk.attn.conv_weights(k)
            keep.update({"attn.conv.weight": w, "attn.conv.bias": bias,
                         "attn.proj.weight": w_out, "attn.proj.bias": own["attn.proj.bias"]})
            keep.update({f"attn.bn.{n}": own[f"attn.bn{k}.{n}"] for n in BN_KEYS})
        if b.mlp_hidden:
            idx = kept.to(own["mlp.fc1.weight"].device)
            keep.update({"mlp.fc1.weight": own["mlp.fc1.weight"][idx],
                         "mlp.fc1.bias": own["mlp.fc1.bias"][idx],
                         "mlp.fc2.weight": own["mlp.fc2.weight"][:, idx],
                         "mlp.fc2.bias": own["mlp.fc2.bias"]})
        else:
            keep = {k: v for k, v in keep.items() if not k.startswith("norm2.")}
        out.update({p + k: v.detach().clone().contiguous() for k, v in keep.items()})
    dev = sd["pos_embed"].device
    model = build_from_arch(arch, device=dev)
    model.load_state_dict({k: v.to(dev) for k, v in out.items()}, strict=True)
    return model.eval(), arch
