"""One weight-decay policy for every optimizer in the project: the supervised loop and every
search method build their AdamW groups here, so no method trains under a different rule.

Decayed: weight matrices and conv kernels (>= 2-D). Not decayed: norms and biases (1-D),
position / class / register / mask tokens, and the search logits a method names (OFB's alpha
and S, ViT-Slim's zeta, ...). This is timm's rule (`no_weight_decay` + 1-D) extended to the
parameters a search adds; it departs from the published OFB code (alpha and the decoder bias
decayed) and ViT-Slim code (zeta decayed), so that one policy serves the whole comparison.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

TOKENS = ("pos_embed", "cls_token", "reg_token", "dist_token", "mask_token")


def decays(name: str, p: nn.Parameter) -> bool:
    """True if the policy decays parameter `name` (its dotted name in the model)."""
    return p.ndim >= 2 and name.rsplit(".", 1)[-1] not in TOKENS


def decay_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 no_decay: Iterable[nn.Parameter] = (), name: str = "weights",
                 **options: Any) -> list[dict[str, Any]]:
    """AdamW groups `name` (decayed) and `name`_no_wd for the trainable parameters in `named`.

    `no_decay`: parameters kept out of decay whatever their shape (search logits).
    `options` (lr, betas, ...) go to both groups. Frozen parameters stay in their group (they
    get no gradient, so AdamW skips them): a restored search rebuilds the very same groups.
    """
    skip = {id(p) for p in no_decay}
    dec, nod = [], []
    for n, p in named:
        (dec if decays(n, p) and id(p) not in skip else nod).append(p)
    return [{"params": dec, "weight_decay": weight_decay, "name": name, **options},
            {"params": nod, "weight_decay": 0.0, "name": f"{name}_no_wd", **options}]
