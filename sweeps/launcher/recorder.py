"""The driver's Tune callback: each finished trial written to the store at once, and the progress line."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ray import tune

from engram.trial import TrialResult
from engram.util import format_duration
from sweeps.launcher.worker import drop_resume
from sweeps.plan import PlannedTrial, Throughput, plan_search_trial
from sweeps.spec import SweepSpec
from sweeps.store import ResultStore, curve_frame, result_row

if TYPE_CHECKING:
    from sweeps.launcher.search import PendingSearch

# The live line is redrawn at most this often on a terminal, and printed at most this often to a log/pipe
# (besides every change in the done/failed counts).
REFRESH_TTY_S = 1.0
REFRESH_PIPE_S = 60.0


class Recorder(tune.Callback):
    """Writes each finished trial to the store at once and keeps the one-line progress view."""

    def __init__(self, spec: SweepSpec, store: ResultStore, grid: list[PlannedTrial],
                 searches: dict[str, PendingSearch], stream: TextIO | None, fingerprint: str,
                 throughput: Throughput, resume_root: Path | None) -> None:
        self.spec, self.store, self.resume_root = spec, store, resume_root
        self.fingerprint, self.throughput = fingerprint, throughput
        self.planned = {t.trial_id: t for t in grid}
        self.planned_search: dict[str, PlannedTrial] = {}
        self.n_total = len(grid) + sum(v.n_left for v in searches.values())
        self.search_est = self._search_estimate(searches)
        self.stream: TextIO | None = stream
        self.log: TextIO | None = None
        self.n_slots = 1
        self.statuses: list[str] = []
        self.recorded_ids: list[str] = []
        self.trial_seconds = 0.0
        self.n_resumed = 0
        self.setup_seconds: list[float] = []
        self._started_at: dict[str, str] = {}  # Tune trial id -> first start (ISO UTC)
        self._host: dict[str, str] = {}
        self._progress: dict[str, float] = {}  # Tune trial id -> fraction done, while running
        self._retries = 0
        self._actual_over_est: list[tuple[float, float]] = []
        self._last_line, self._last_draw = "", 0.0
        self._tty = False

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into every experiment-state snapshot (for Tuner.restore, which the launcher
        # does not use: re-runs go through the store); keep that snapshot small and free of open streams.
        return {}

    def attach(self, stream: TextIO, log: TextIO, n_slots: int) -> None:
        self.stream, self.log, self.n_slots = stream, log, n_slots
        self._tty = bool(getattr(stream, "isatty", lambda: False)())
        self._draw(force=True)

    def close(self) -> None:
        self._draw(force=True)
        if self.stream is not None and self._tty:
            self.stream.write("\n")
            self.stream.flush()

    # -- Tune hooks ---------------------------------------------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._started_at.setdefault(trial.trial_id, now())
        self._progress.setdefault(trial.trial_id, 0.0)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        tid = trial.trial_id
        self._host[tid] = result.get("host", self._host.get(tid))
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

    def resolve_search(self, experiment: str, rho: float) -> PlannedTrial:
        """The concrete trial of search `experiment` at a suggested `rho` (kept for its row)."""
        planned = plan_search_trial(self.spec, experiment, rho, self.spec.experiment(experiment).seed,
                                    throughput=self.throughput, fingerprint=self.fingerprint)
        self.planned_search[planned.trial_id] = planned
        return planned

    def _planned(self, trial, reported_id: str | None) -> PlannedTrial:
        tid = trial.config["trial_id"]
        assert reported_id is None or reported_id == tid, (reported_id, tid)
        if tid in self.planned:
            return self.planned[tid]
        if tid not in self.planned_search:  # the searcher's instance was a copy: resolve again (deterministic)
            self.resolve_search(trial.config["search"], float(trial.config["rho"]))
        return self.planned_search[tid]

    def _write(self, trial, planned: PlannedTrial, result: TrialResult | None, error: str | None,
               setup_seconds: float | None = None, resumed: bool = False) -> None:
        tid = trial.trial_id
        # Tune counts failures: a trial that errored for good has failed in every attempt.
        attempts = trial.num_failures + (1 if result is not None else 0)
        row = result_row(planned, result, error=error, attempts=max(1, attempts),
                         started_at=self._started_at.get(tid, now()), finished_at=now())
        if self._host.get(tid):
            row["host"] = self._host[tid]  # the node the trial ran on, not the driver's
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

    # -- the progress line --------------------------------------------------------------------------------------

    def _search_estimate(self, searches: dict[str, PendingSearch]) -> float:
        if not searches:
            return 0.0
        name = next(iter(searches))
        # rho = 1: realisable whenever the spec loaded (checked there); P_act, hence the cost, barely moves with rho
        return plan_search_trial(self.spec, name, 1.0, self.spec.experiment(name).seed, throughput=self.throughput,
                                 fingerprint=self.fingerprint).est_seconds

    def _eta_seconds(self) -> float:
        est_of = {t.trial_id: t.est_seconds for t in self.planned.values()}
        done_ids = set(self.recorded_ids)
        pending = sum(s for tid, s in est_of.items() if tid not in done_ids)
        n_search_left = self.n_total - len(self.planned) - sum(1 for i in self.recorded_ids if i not in est_of)
        pending += max(0, n_search_left) * self.search_est
        # Running trials: take off the part they have done (their planned time x fraction done).
        mean_est = pending / max(1, self.n_total - len(self.statuses))
        pending -= sum(frac * mean_est for frac in self._progress.values())
        if self._actual_over_est:  # calibrate the plan's estimate with the trials measured so far
            actual, est = map(sum, zip(*self._actual_over_est))
            if est > 0:
                pending *= actual / est
        return max(0.0, pending) / self.n_slots

    def _line(self) -> str:
        n_done = len(self.statuses)
        n_failed, n_div = self.statuses.count("failed"), self.statuses.count("diverged")
        eta = self._eta_seconds()  # plan estimates, scaled by measured / estimated time of finished trials
        parts = [f"[{self.spec.name}] {n_done}/{self.n_total} done", f"{len(self._progress)} running",
                 f"{n_failed} failed", f"{n_div} diverged"]
        if self._retries:
            parts.append(f"{self._retries} retried")
        parts.append("ETA " + format_duration(eta))
        return " | ".join(parts)

    def _draw(self, force: bool = False) -> None:
        if self.stream is None:
            return
        t_now = time.monotonic()
        line = self._line()
        # A terminal redraws on any change; a log or pipe gets a line when a trial ends (and now and then).
        cut = " | ETA" if self._tty else " | "
        changed = line.split(cut)[0] != self._last_line.split(cut)[0]
        wait = REFRESH_TTY_S if self._tty else REFRESH_PIPE_S
        if not (changed or t_now - self._last_draw >= wait or (force and line != self._last_line)):
            return
        if self._tty:
            self.stream.write("\r\x1b[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last_line, self._last_draw = line, t_now


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
