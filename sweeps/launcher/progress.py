"""The one-line progress view of a running sweep: trials done, running, failed, diverged, retried, and the ETA.

The recorder (`sweeps.launcher.recorder`) owns the counts and passes them in; this module only turns them into a
line and decides when to print it (a terminal redraws in place, a log or pipe gets a new line on each change).
"""

from __future__ import annotations

import time
from typing import TextIO

from engram.util import format_duration

# The live line is redrawn at most this often on a terminal, and printed at most this often to a log/pipe
# (besides every change in the done/failed counts).
REFRESH_TTY_S = 1.0
REFRESH_PIPE_S = 60.0


class ProgressLine:
    """`[name] done/total done | running | failed | diverged | (retried) | ETA`, from the plan's estimates."""

    def __init__(self, name: str, n_total: int, estimates: dict[str, float], search_estimate: float,
                 stream: TextIO | None) -> None:
        self.name, self.n_total = name, n_total
        self.estimates = estimates  # planned seconds of each grid trial, by trial id
        self.search_estimate = search_estimate  # planned seconds of one search trial
        self.stream = stream
        self.n_slots = 1
        self._tty = False
        self._last_line, self._last_draw = "", 0.0

    def attach(self, stream: TextIO, n_slots: int) -> None:
        self.stream, self.n_slots = stream, n_slots
        self._tty = bool(getattr(stream, "isatty", lambda: False)())

    def close(self) -> None:
        if self.stream is not None and self._tty:
            self.stream.write("\n")
            self.stream.flush()

    def eta_seconds(self, recorded_ids: list[str], running: dict[str, float],
                    actual_over_est: list[tuple[float, float]]) -> float:
        """Planned seconds of the trials not recorded yet, less the done part of the running ones, scaled by
        measured / planned time of the trials finished so far, over the trials that run at once."""
        done_ids = set(recorded_ids)
        pending = sum(s for tid, s in self.estimates.items() if tid not in done_ids)
        n_search_left = self.n_total - len(self.estimates) - sum(1 for i in recorded_ids if i not in self.estimates)
        pending += max(0, n_search_left) * self.search_estimate
        # Running trials: take off the part they have done (their planned time x fraction done).
        mean_est = pending / max(1, self.n_total - len(recorded_ids))
        pending -= sum(frac * mean_est for frac in running.values())
        if actual_over_est:  # calibrate the plan's estimate with the trials measured so far
            actual, est = map(sum, zip(*actual_over_est))
            if est > 0:
                pending *= actual / est
        return max(0.0, pending) / self.n_slots

    def line(self, statuses: list[str], recorded_ids: list[str], running: dict[str, float], retries: int,
             actual_over_est: list[tuple[float, float]]) -> str:
        parts = [f"[{self.name}] {len(statuses)}/{self.n_total} done", f"{len(running)} running",
                 f"{statuses.count('failed')} failed", f"{statuses.count('diverged')} diverged"]
        if retries:
            parts.append(f"{retries} retried")
        parts.append("ETA " + format_duration(self.eta_seconds(recorded_ids, running, actual_over_est)))
        return " | ".join(parts)

    def draw(self, statuses: list[str], recorded_ids: list[str], running: dict[str, float], retries: int,
             actual_over_est: list[tuple[float, float]], *, force: bool = False) -> None:
        if self.stream is None:
            return
        t_now = time.monotonic()
        line = self.line(statuses, recorded_ids, running, retries, actual_over_est)
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
