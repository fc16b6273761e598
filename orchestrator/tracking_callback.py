"""The Tune callback that keeps MLflow in step with a sweep (in the driver): a child run per
trial as it starts, its curves as it reports, its subnet when it is done, and at the sweep's
end each finished trial an outage left incomplete (orchestrator/tracking.py has the runs)."""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from orchestrator.records import TrialRecord
from orchestrator.tracking import Tracker, warn


class TrackingCallback(Callback):
    """Tune callback in the driver: child runs follow trials as they start, report, end."""

    def __init__(self, tracker: Tracker, pretrain_share: float,
                 pretrain_kind: str | None = None):
        """`pretrain_share`: each trial's share of the dense pretrain, in `pretrain_kind` hours
        (default: the dense model's kind, as the tracker logged it on the sweep run)."""
        self.cfg, self.parent_id = tracker.cfg, tracker.parent_id
        self.pretrain_share = pretrain_share
        self.pretrain_kind = pretrain_kind or tracker.dense_kind
        self._tracker: Tracker | None = tracker

    def __getstate__(self) -> dict:  # Tune pickles callbacks with the experiment state
        return {**self.__dict__, "_tracker": None}

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:  # unpickled: reconnect to the same runs
            self._tracker = Tracker(self.cfg)
            self._tracker.attach(self.parent_id)
        return self._tracker

    def run_id(self, trial_id: str) -> str | None:
        return self.tracker.children.get(trial_id)

    def _safely(self, what: str, fn, *args) -> None:
        """A tracking hiccup (server restart, full disk) is reported, never kills the sweep:
        the trial's results stay in results.parquet and its folder."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001
            warn(what, e, self.cfg.run_dir)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._safely(f"create the run of trial {trial.trial_id}", self.tracker.child,
                     trial.trial_id, dict(trial.config or {}))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        self._safely(f"log trial {trial.trial_id}", self._log, trial, result)

    def _log(self, trial: Any, result: dict) -> None:
        run_id = self.tracker.child(trial.trial_id, dict(trial.config or {}))
        if result.get("phase") == "done":
            rec = TrialRecord.from_row(result, hparam_keys=())
            self.tracker.log_trial(run_id, rec, self.pretrain_share, self.pretrain_kind)
        else:
            self.tracker.log_progress(run_id, result)

    def on_experiment_end(self, trials: list, **info) -> None:
        """Log each finished trial whose run an outage left incomplete (in a restored sweep,
        those of the run before too); the first failure is one warning and ends the tracking."""
        try:
            for trial in trials:
                result = trial.last_result or {}
                if result.get("phase") != "done":
                    continue
                run_id = self.run_id(trial.trial_id)
                if run_id is None or not self.tracker.complete(run_id):
                    print(f"[mlflow] logging trial {trial.trial_id}, missed earlier", flush=True)
                    self._log(trial, result)
        except Exception as e:  # noqa: BLE001
            if self._tracker is not None:
                self._tracker.failed = True
            warn("log the finished trials missed earlier", e, self.cfg.run_dir)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info) -> None:
        if (run_id := self.run_id(trial.trial_id)) is not None:
            self._safely("mark a failed run", self.tracker.end, run_id, "FAILED", "failed")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info) -> None:
        if (trial.last_result or {}).get("phase") != "done" and (
                run_id := self.run_id(trial.trial_id)) is not None:
            self._safely("mark a stopped run", self.tracker.end, run_id, "KILLED",
                         "stopped_early")
