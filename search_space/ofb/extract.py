"""OFB's subnet: every finished module's scale folded into a plain timm ViT.

The finished supernet is already sliced to its kept units; what is left are the per-channel
scales (`channel_scale`: the mask lambda sigmoid(S) + (1 - lambda) V when the module finished,
trained on since unless `freeze_finished`). They fold exactly into the weights that read or
write those units (search_space/groups.py): q/k/v rows, fc1 rows and bias (the MLP mask is on
fc1's output, before GELU). The searched model computed attention with the dense model's
scale 1/sqrt(d_dense) (timm's fused attention would silently switch to 1/sqrt(d_new)), so the
ratio sqrt(d_new / d_dense) is folded into the
q rows: the exported model needs no custom attention class and runs anywhere timm runs.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from search_space import groups
from search_space.arch import ViTArch
from search_space.subnet import build_from_arch


@torch.no_grad()
def extract_subnet(supernet: nn.Module) -> tuple[VisionTransformer, ViTArch]:
    """Fold the frozen masks of a finished `SearchableViT` into a plain timm ViT."""
    if not supernet.is_finished:
        raise ValueError("every searchable module must be finished before extraction")
    arch = supernet.current_arch()
    src = supernet.vit
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    m_e = src.patch_embed.channel_scale.detach()  # (D,)
    # the embedding mask where channels enter the stream (and on every branch output when the
    # search masked those too)
    roles = ("entry", "write") if supernet.mask_branches else ("entry",)
    groups.scale_(sd, [m for m in groups.embed_members(sd) if m.role in roles], m_e)
    for i, blk in enumerate(src.blocks):
        p = f"blocks.{i}."
        a = blk.attn
        m = a.channel_scale.detach().reshape(-1)  # (H*d,) mask on q, k and v
        q_fix = a.scale * a.head_dim**0.5  # searched softmax scale / the subnet's 1/sqrt(d)
        qkv = [u for u in groups.attn_members(p + "attn.", a.attn_dim, p + "attn.qkv.bias" in sd)
               if u.role in ("q", "k", "v")]
        groups.scale_(sd, qkv, {"q": m * q_fix, "k": m, "v": m})
        fc1_out = [u for u in groups.mlp_members(p + "mlp.", p + "mlp.fc1.bias" in sd)
                   if ".fc1." in u.key]
        # the MLP mask on fc1's rows and bias
        groups.scale_(sd, fc1_out, blk.mlp.channel_scale.detach())
    sd = {k: v for k, v in sd.items() if not _search_key(k)}
    out = build_from_arch(arch, device=next(supernet.parameters()).device)
    out.load_state_dict(sd, strict=True)
    return out.eval(), arch


def _search_key(k: str) -> bool:
    last = k.rsplit(".", 1)[-1]
    return last in ("alpha", "S", "live", "finished", "channel_scale", "cand_heads", "cand_dims",
                    "cand_widths")
