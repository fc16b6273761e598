"""The comparison's rules, without Ray: equal training for every method's weights."""

from __future__ import annotations

import pytest

from orchestrator.config import load_config
from orchestrator.phases import equal_training


@pytest.mark.parametrize("method,extra", [("ofb", 0), ("vit_slim", 0),
                                          ("two_stage_taylor", 3), ("two_stage_magnitude", 3),
                                          ("dense_control", 3)])
def test_methods_whose_search_trains_no_weights_fine_tune_longer(method, extra):
    cfg = load_config(None, [f"search.method={method}", "search.epochs=3", "finetune.epochs=1"])
    out = equal_training(cfg)
    assert out.finetune.epochs == 1 + extra
    assert (out.finetune_key() == cfg.finetune_key()) is (extra == 0)
    assert cfg.finetune.epochs == 1  # the trial's own config is left as it was
