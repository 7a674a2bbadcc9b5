"""The driver's Tune callback: each finished trial written to the store at once (the progress line it keeps is
`sweeps.launcher.progress`, the search trials it records are resolved by `sweeps.launcher.search.SearchTrials`)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ray import tune

from engram.trial import TrialResult
from sweeps.launcher.worker import drop_resume
from sweeps.launcher.progress import ProgressLine
from sweeps.plan import PlannedTrial
from sweeps.spec import SweepSpec
from sweeps.store import ResultStore, curve_frame, result_row

if TYPE_CHECKING:
    from sweeps.launcher.search import PendingSearch, SearchTrials


class Recorder(tune.Callback):
    """Writes each finished trial to the store at once and keeps the one-line progress view."""

    def __init__(self, spec: SweepSpec, store: ResultStore, grid: list[PlannedTrial],
                 searches: dict[str, PendingSearch], stream: TextIO | None, search_trials: SearchTrials,
                 resume_root: Path | None) -> None:
        self.spec, self.store, self.resume_root = spec, store, resume_root
        self.search_trials = search_trials
        self.planned = {t.trial_id: t for t in grid}
        n_total = len(grid) + sum(v.n_left for v in searches.values())
        self.view = ProgressLine(spec.name, n_total, {t.trial_id: t.est_seconds for t in grid},
                                 search_trials.estimate_seconds(searches), stream)
        self.log: TextIO | None = None
        self.statuses: list[str] = []
        self.recorded_ids: list[str] = []
        self.trial_seconds = 0.0
        self.n_resumed = 0
        self.setup_seconds: list[float] = []
        self._started_at: dict[str, str] = {}  # Tune trial id -> first start (ISO UTC)
        self._host: dict[str, str] = {}
        self._cpu: dict[str, str | None] = {}
        self._progress: dict[str, float] = {}  # Tune trial id -> fraction done, while running
        self._retries = 0
        self._actual_over_est: list[tuple[float, float]] = []

    @property
    def n_slots(self) -> int:
        return self.view.n_slots

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into every experiment-state snapshot (for Tuner.restore, which the launcher
        # does not use: re-runs go through the store); keep that snapshot small and free of open streams.
        return {}

    def attach(self, stream: TextIO, log: TextIO, n_slots: int) -> None:
        self.log = log
        self.view.attach(stream, n_slots)
        self._draw(force=True)

    def close(self) -> None:
        self._draw(force=True)
        self.view.close()

    # -- Tune hooks ---------------------------------------------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._started_at.setdefault(trial.trial_id, now())
        self._progress.setdefault(trial.trial_id, 0.0)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        tid = trial.trial_id
        self._host[tid] = result.get("host", self._host.get(tid))
        self._cpu[tid] = result.get("cpu", self._cpu.get(tid))
        if "trial_result" in result:
            planned = self._planned(trial, result.get("engram_trial_id"))
            trial_result = TrialResult.from_dict(json.loads(result["trial_result"]))
            self._write(trial, planned, trial_result, None, result.get("setup_seconds"), result.get("resumed"))
            self.n_resumed += bool(result.get("resumed"))
        elif result.get("total_steps"):
            self._progress[tid] = result["step"] / result["total_steps"]
        self._draw()

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._retries += 1
        self._draw()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        planned = self._planned(trial, None)
        self._write(trial, planned, None, _error_text(trial))
        self._draw()

    def on_step_end(self, iteration, trials, **info) -> None:
        self._draw()

    # -- recording ----------------------------------------------------------------------------------------------

    def _planned(self, trial, reported_id: str | None) -> PlannedTrial:
        tid = trial.config["trial_id"]
        assert reported_id is None or reported_id == tid, (reported_id, tid)
        if tid in self.planned:
            return self.planned[tid]
        return self.search_trials.planned_for(tid, trial.config["search"], float(trial.config["rho"]))

    def _write(self, trial, planned: PlannedTrial, result: TrialResult | None, error: str | None,
               setup_seconds: float | None = None, resumed: bool = False) -> None:
        tid = trial.trial_id
        # Tune counts failures: a trial that errored for good has failed in every attempt.
        attempts = trial.num_failures + (1 if result is not None else 0)
        row = result_row(planned, result, error=error, attempts=max(1, attempts),
                         started_at=self._started_at.get(tid, now()), finished_at=now())
        if self._host.get(tid):
            row["host"] = self._host[tid]  # the node the trial ran on, not the driver's
        if self._cpu.get(tid):  # and its CPU
            row["versions"] = json.dumps({**json.loads(row["versions"]), "cpu": self._cpu[tid]}, sort_keys=True)
        self.store.write_trial(row, curve_frame(result) if result is not None else None)
        if self.log is not None:
            self.log.write(f"{now()} recorded {planned.trial_id} ({planned.experiment}) status {row['status']} "
                           f"attempts {row['attempts']} resumed {bool(resumed)} host {row['host']}"
                           + (f" error {row['error']}" if row["error"] else "") + "\n")
        if self.resume_root is not None and result is not None:  # complete: its saved state is of no more use
            drop_resume(self.resume_root, planned.trial_id)
        self.statuses.append(row["status"])
        self.recorded_ids.append(planned.trial_id)
        self._progress.pop(tid, None)
        if result is not None:
            self.trial_seconds += result.wall_seconds
            if setup_seconds is not None:
                self.setup_seconds.append(setup_seconds)
            self._actual_over_est.append((result.wall_seconds, planned.est_seconds))

    # -- the progress line (sweeps.launcher.progress) -------------------------------------------------------------

    def _draw(self, force: bool = False) -> None:
        self.view.draw(self.statuses, self.recorded_ids, self._progress, self._retries, self._actual_over_est,
                       force=force)


def _error_text(trial) -> str:
    """One line: the exception that ended the trial's last attempt (type: message)."""
    err = None
    path = trial.pickled_error_file
    if path and os.path.exists(path):
        from ray import cloudpickle

        with contextlib.suppress(Exception), open(path, "rb") as f:
            err = cloudpickle.load(f)
    if err is not None:
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException):
            return f"{type(cause).__name__}: {cause}".splitlines()[0]
        text = str(err).strip().splitlines()
        return f"{type(err).__name__}: {text[0] if text else ''}"
    if trial.error_file and os.path.exists(trial.error_file):
        lines = [ln for ln in Path(trial.error_file).read_text().splitlines() if ln.strip()]
        if lines:
            return lines[-1]
    return "trial failed (no error recorded by Ray)"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
