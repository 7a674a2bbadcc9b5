"""The searcher of a launch: the grid trials first, then each `search` experiment's Optuna suggestions.

A suggested rho is resolved into a concrete trial by `SearchTrials.resolve` (which the recorder reads back); a
suggestion whose model the sweep already has (nearby rhos round to one model) is answered with its known loss and
Optuna is asked again, so no model is trained twice.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, NamedTuple

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from engram.accounting import AllocationError
from engram.config import to_dict
from sweeps.launcher.worker import METRIC
from sweeps.plan import PlannedTrial, Throughput, plan_search_trial
from sweeps.spec import SweepSpec
from sweeps.store import COMPLETE_STATUSES, ResultStore

MAX_RESUGGESTIONS = 50  # Optuna suggestions tried for one search trial before its experiment counts as exhausted


class SearchTrials:
    """The concrete trials of the search experiments, planned from suggested rhos and kept for their rows.
    Planning is deterministic, so a copy of this object (Tune may copy its searcher) resolves a suggestion to the
    same trial."""

    def __init__(self, spec: SweepSpec, fingerprint: str, throughput: Throughput) -> None:
        self.spec, self.fingerprint, self.throughput = spec, fingerprint, throughput
        self.planned: dict[str, PlannedTrial] = {}

    def resolve(self, experiment: str, rho: float) -> PlannedTrial:
        """The trial of search `experiment` at a suggested `rho`."""
        planned = plan_search_trial(self.spec, experiment, rho, self.spec.experiment(experiment).seed,
                                    throughput=self.throughput, fingerprint=self.fingerprint)
        self.planned[planned.trial_id] = planned
        return planned

    def planned_for(self, trial_id: str, experiment: str, rho: float) -> PlannedTrial:
        """The planned trial `trial_id` (of `experiment` at `rho`), resolving it again if this copy has not."""
        if trial_id not in self.planned:
            self.resolve(experiment, rho)
        return self.planned[trial_id]

    def estimate_seconds(self, searches: dict[str, PendingSearch]) -> float:
        """Planned seconds of one search trial (at rho = 1: realisable whenever the spec loaded, and P_act, hence
        the cost, barely moves with rho); 0 without searches."""
        if not searches:
            return 0.0
        name = next(iter(searches))
        return plan_search_trial(self.spec, name, 1.0, self.spec.experiment(name).seed, throughput=self.throughput,
                                 fingerprint=self.fingerprint).est_seconds


class SweepSearcher(Searcher):
    """Feeds one Tune run with every trial of a launch: the grid trials first, then the search experiments'
    Optuna suggestions (experiments in spec order), so that no slot idles between grid and search."""

    def __init__(self, grid_ids: list[str], optuna: dict[str, OptunaSearch], n_left: dict[str, int],
                 resolve: Callable[[str, float], PlannedTrial], stored_losses: dict[str, float]) -> None:
        super().__init__(metric=METRIC, mode="min")
        self._grid = list(grid_ids)
        self._optuna, self._left, self._resolve = optuna, dict(n_left), resolve
        self._owner: dict[str, str] = {}  # Tune trial id -> search experiment
        self._optuna_id: dict[str, str] = {}  # Tune trial id -> the id its suggestion had in Optuna
        # Models already trained (any experiment; NaN: diverged) or handed out in this launch: a suggestion
        # that resolves to one of them is not trained again (see `_suggest_new`).
        self._stored = dict(stored_losses)
        self._handed_out = set(grid_ids)
        self.n_abandoned = 0  # search trials given up: no new model left to suggest (counted as not requested)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # metric and mode are fixed; the space is per experiment, held by its OptunaSearch

    def suggest(self, trial_id: str) -> dict | str | None:
        if self._grid:
            return {"trial_id": self._grid.pop(0)}
        waiting = False
        for name, searcher in self._optuna.items():
            if self._left[name] > 0:
                planned = self._suggest_new(name, searcher, trial_id)
                if planned == Searcher.FINISHED:
                    self.n_abandoned += self._left[name]
                    self._left[name] = 0
                elif planned is None:  # nothing to suggest right now; ask again later
                    waiting = True
                else:
                    self._left[name] -= 1
                    self._owner[trial_id] = name
                    self._handed_out.add(planned.trial_id)
                    return {"trial_id": planned.trial_id, "search": name, "rho": planned.rho,
                            "config_json": json.dumps(to_dict(planned.config))}
        return None if waiting else Searcher.FINISHED

    def _suggest_new(self, name: str, searcher: OptunaSearch, trial_id: str) -> PlannedTrial | str | None:
        """Optuna's next rho whose model is new, or None (ask later) or FINISHED (no new model found).

        rho moves the model in whole routed experts, so nearby suggestions often resolve to one model, and an
        allocation grid of the same budget and seed may hold it already: training it again would overwrite that
        row (rows are keyed by trial id). Such a suggestion is told its known loss (or a failure, while it is
        still running or when the rho cannot be realised) and Optuna is asked again, at most
        MAX_RESUGGESTIONS times.
        """
        for attempt in range(MAX_RESUGGESTIONS):
            sub_id = trial_id if attempt == 0 else f"{trial_id}~{attempt}"
            config = searcher.suggest(sub_id)
            if config is None or config == Searcher.FINISHED:
                return config
            try:
                planned = self._resolve(name, float(config["rho"]))
            except AllocationError:  # a rho that no model of this shape realises (e.g. too few rows left)
                searcher.on_trial_complete(sub_id, error=True)
                continue
            if planned.trial_id not in self._stored and planned.trial_id not in self._handed_out:
                self._optuna_id[trial_id] = sub_id  # Tune reports back under its own id
                return planned
            loss = self._stored.get(planned.trial_id, math.nan)
            searcher.on_trial_complete(sub_id, result={METRIC: loss} if math.isfinite(loss) else None,
                                       error=not math.isfinite(loss))
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        name = self._owner.pop(trial_id, None)
        if name is not None:
            self._optuna[name].on_trial_complete(self._optuna_id.pop(trial_id), result=result, error=error)


class PendingSearch(NamedTuple):
    n_left: int  # trials still to run
    n_done: int  # complete trials in the store (ok or diverged)
    points: list[dict]  # Optuna warm start: the rho of each ok trial ...
    rewards: list[float]  # ... and its final validation loss (diverged trials teach the sampler nothing)


def pending_searches(spec: SweepSpec, store: ResultStore) -> dict[str, PendingSearch]:
    """The search experiments with trials left to run, by name."""
    out: dict[str, PendingSearch] = {}
    runs = store.runs()
    for exp in spec.experiments:
        if exp.kind != "search":
            continue
        mine = runs[(runs["experiment"] == exp.name) & runs["status"].isin(COMPLETE_STATUSES)]
        ok = mine[(mine["status"] == "ok") & mine["final_val_loss"].notna()]
        points = [{"rho": float(r)} for r in ok["rho"]]
        rewards = [float(v) for v in ok["final_val_loss"]]
        n_left = max(0, exp.n_trials - len(mine))
        if n_left:
            out[exp.name] = PendingSearch(n_left, len(mine), points, rewards)
    return out


def n_search_done(spec: SweepSpec, store: ResultStore) -> int:
    """Complete search trials stored (at most n_trials per experiment): the search part of a re-run's skips."""
    runs = store.runs()
    complete = runs[runs["status"].isin(COMPLETE_STATUSES)]
    return sum(min(exp.n_trials, int((complete["experiment"] == exp.name).sum()))
               for exp in spec.experiments if exp.kind == "search")
