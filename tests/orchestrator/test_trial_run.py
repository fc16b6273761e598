"""One Train run per trial on a real local Ray with 2 workers: search, extraction and
fine-tune in one worker group; a worker killed during the fine-tune resumes it from its
checkpoint, and both phases land where the separate runs put them."""

from __future__ import annotations

import pytest

from orchestrator.config import load_config
from orchestrator.phases import run_finetune, run_pretrain, run_search
from orchestrator.trial_run import run_trial
from search_space.subnet import load_subnet
from tests.conftest import tiny_overrides
from tests.orchestrator.faults import run_and_kill_after_checkpoint

pytestmark = pytest.mark.ray


def test_one_run_per_trial_survives_a_worker_killed_in_the_finetune(ray_cluster, tmp_path,
                                                                     fmnist_dir):
    # 10 fine-tune epochs of a fraction of a second: the kill, which waits for Ray to register
    # the first checkpoint, once landed after the last of 3 on a loaded machine
    cfg = load_config(None, tiny_overrides(tmp_path, **{
        "name": "trial", "search.method": "ofb", "search.epochs": 1, "search.budget": 0.5,
        "finetune.epochs": 10, "scaling.max_failures": 2}))
    dense = run_pretrain(cfg)
    from orchestrator.phases import equal_training

    run_dir = cfg.run_dir / "ray" / f"trial-{equal_training(cfg).finetune_key()}"
    search, tuned = run_and_kill_after_checkpoint(
        lambda: run_trial(cfg, dense), run_dir, pattern="checkpoint_*/finetune/state.json")
    assert [h["epoch"] for h in tuned.history][-1] == 10
    assert tuned.metrics["resumed_from_epoch"] >= 1, "the fine-tune restarted from scratch"
    assert search.final["phase"] == "search_done" and search.final["macs"] > 0
    assert search.cost.shared_run and tuned.cost.shared_run
    assert search.cost.worker_seconds > 0 and tuned.cost.worker_seconds > 0
    assert 0.0 <= tuned.metrics["test_top1"] <= 1.0
    load_subnet(search.subnet)
    assert (tuned.path / "model.safetensors").exists() and (tuned.path / "arch.json").exists()
    # stored as the separate runs store them: rerunning finds both phases done
    assert run_search(cfg, dense).final == search.final
    assert run_finetune(cfg, search.subnet).metrics == tuned.metrics
    again_search, again_tuned = run_trial(cfg, dense)
    assert again_tuned.metrics == tuned.metrics
