"""Our addition `search.ofb.cap_within_budget`: the choice of the modules still undecided when a
search reaches its epoch cap.

Published: each takes its argmax candidate, whatever the subnet's MACs (the published 100-epoch
searches decide every module by elimination first). A short search can end with modules
undecided and their probabilities nearly flat, and their argmax then lands anywhere: measured
with configs/compare_methods.yaml (3 epochs, published defaults, every module undecided) at
29%, 41% and 62% of dense for seeds 0-2, the same at a 30% and a 50% budget. This picks,
greedily from the argmax, a joint choice within [low, high] MACs: a move steps one undecided
module to its next narrower live candidate while the subnet is above `high`, or to its next
wider one (never above `high`) while it is below `low`, and always the move that loses the least
log-probability per MAC moved. Candidates are only ever live ones, so the result is something
the search still allowed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from search_space.ofb.searchable import SearchableMixin
from search_space.ofb.supernet import SearchableViT


def choose_within_budget(sn: SearchableViT, high: float, low: float | None = None,
                         cost: Callable[[Callable[[SearchableMixin], int]], float] | None = None
                         ) -> dict[SearchableMixin, int]:
    """{undecided module: candidate index}: the argmax, moved as above; finished modules keep
    their one candidate. `cost(pick)`: the subnet's cost with candidate `pick(module)` in each
    module, in the unit of `high` and `low` (default: MACs by `sn.macs_at`; a latency budget
    prices choices with its table)."""
    open_ = [m for m in sn.searchable() if not m.is_finished]
    widths = {m: m.candidate_widths() for m in sn.searchable()}
    ladder, logp, pos = {}, {}, {}  # per module: live indices narrow -> wide, log p, position
    for m in open_:
        live = sorted(m.live_indices(), key=lambda i, w=widths[m]: w[i])
        with torch.no_grad():
            lp = torch.log(m.probs().clamp_min(1e-30)).tolist()
        ladder[m], logp[m] = live, lp
        pos[m] = live.index(max(live, key=lambda i: lp[i]))

    def pick(m: SearchableMixin) -> int:
        return ladder[m][pos[m]] if m in pos else m.live_indices()[0]

    def macs() -> float:
        if cost is not None:
            return float(cost(pick))
        return float(sn.macs_at(lambda m: widths[m][pick(m)]))

    def best_move(step: int, ok) -> SearchableMixin | None:
        now, best, best_cost = macs(), None, float("inf")
        for m in open_:
            j = pos[m] + step
            if not 0 <= j < len(ladder[m]):
                continue
            pos[m] = j
            after = macs()
            pos[m] -= step
            moved = abs(after - now)
            if moved == 0 or not ok(after):
                continue
            cost = (logp[m][ladder[m][pos[m]]] - logp[m][ladder[m][j]]) / moved
            if cost < best_cost:
                best, best_cost = m, cost
        return best

    while macs() > high and (m := best_move(-1, lambda _: True)) is not None:
        pos[m] -= 1
    while low is not None and macs() < low and (
            m := best_move(+1, lambda after: after <= high)) is not None:
        pos[m] += 1
    return {m: ladder[m][pos[m]] for m in open_}
