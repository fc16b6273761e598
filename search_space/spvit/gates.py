"""SPViT's gates (METHODS.md section 4): straight-through binary concrete samples of sigmoid(theta)
for training, thresholds for eval, the nested MSA / 3x3 / 1x1 gates and the complexity
surrogate. All device-side: no gate decision reads a value back to the host."""

from __future__ import annotations

import torch

THETA_INIT = 1.5


def sample(theta: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """b = 1[l > 0] + sigma(l) - sg(sigma(l)), l = log u - log(1 - u) + theta, u ~ U(0, 1):
    a hard 0/1 value whose gradient is that of the relaxed Bernoulli (temperature 1)."""
    if u is None:
        u = torch.rand_like(theta)
    u = u.clamp(1e-6, 1 - 1e-6)
    logit = torch.log(u) - torch.log1p(-u) + theta
    soft = torch.sigmoid(logit)
    return (logit > 0).to(theta.dtype) + soft - soft.detach()


def hard(theta: torch.Tensor) -> torch.Tensor:
    """Eval gates: 1[theta > 0]."""
    return (theta > 0).to(theta.dtype)


def nested(b: torch.Tensor) -> torch.Tensor:
    """g = cumprod(b) over (1x1, 3x3, MSA), with the published detach rule: when the 1x1 and
    the 3x3 gates are both on, g0 carries no gradient; when MSA is on too, g1 neither.
    b (3,) -> g (3,): g0 1x1 on, g1 3x3 on, g2 MSA on."""
    g0 = b[0]
    g1 = g0 * b[1]
    g2 = g1 * b[2]
    both = (g0.detach() == 1) & (g1.detach() == 1)
    all_on = both & (g2.detach() == 1)
    g0 = torch.where(both, g0.detach(), g0)
    g1 = torch.where(all_on, g1.detach(), g1)
    return torch.stack([g0, g1, g2])


def path_weights(g: torch.Tensor) -> torch.Tensor:
    """Weights of (MSA, 3x3, 1x1) in the output: g2, g1 (1 - g2), g0 (1 - g1)(1 - g2).
    Exactly one is 1 (or none: the mixer is off) when g is hard."""
    return torch.stack([g[2], g[1] * (1 - g[2]), g[0] * (1 - g[1]) * (1 - g[2])])


def complexity_st(theta: torch.Tensor) -> torch.Tensor:
    """ST(theta) = 1[theta > 0] + sigma(sigma(theta) - 0.5) - sg(same): the thresholded gate
    with the published surrogate gradient, for the complexity loss."""
    sur = torch.sigmoid(torch.sigmoid(theta) - 0.5)
    return (theta > 0).to(theta.dtype) + sur - sur.detach()
