"""The Ray launcher: planned trials -> Ray Tune -> one row per finished trial in the results store.

This is the only module that imports Ray, and `_ray_session` is the only place that calls `ray.init`: an
embedded local Ray when no address is given, otherwise a connection to an existing cluster (the CLI reads
`--address` / RAY_ADDRESS and passes it in).

How one sweep runs (docs/reliability.md, docs/cluster.md):
- One Tune run per launch: a searcher hands out the grid trials (allocation, memory) first, then each `search`
  experiment's suggestions from Tune's OptunaSearch (TPE seeded with the experiment's seed, rho ~ U[0, 1],
  warm-started with the search trials already stored); the driver resolves each suggested rho into a concrete
  trial (`plan.plan_search_trial`) before Tune starts it, so trainables only ever run given configs.
- A trial is `engram.trial.run_trial` inside a Tune function trainable given `resources.cpus_per_trial` CPUs
  (torch threads follow) and `gpus_per_trial` GPUs (fractions share a device). Each run_trial checkpoint is
  reported to Tune (`Checkpoint.from_directory`), so a retry after a crash (`FailureConfig(max_failures=
  resources.max_retries)`) resumes from it via `tune.get_checkpoint()`. A diverged trial returns normally
  (status "diverged") and is never retried.
- The DRIVER writes each finished trial into the store the moment Tune hands it over (a Tune Callback):
  the final report carries the `TrialResult` as JSON; a trial out of retries becomes a "failed" row with its
  error. Rows are keyed by trial_id, so a re-run never duplicates a trial.
- Driver-kill resume: each checkpoint is also published atomically (temporary name, then rename) under
  `<store>/.tune/resume/<trial_id>.<n>`; a re-run of the sweep starts a partial trial from there when the
  trial's node can see that folder (always on one machine; on a cluster only with a shared filesystem).
- Ray's own output (its logging, Tune's tables, worker logs) goes to `log_path`; the terminal gets one live
  progress line: done / running / failed / ETA.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, TextIO

import ray
from ray import tune
from ray.exceptions import AuthenticationError
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from engram.accounting import AllocationError
from engram.config import TrialConfig, from_dict, to_dict
from engram.data import corpus_fingerprint
from engram.trial import TrialResult
from engram.util import format_duration
from sweeps.plan import PlannedTrial, Throughput, calibrate_throughput, plan_search_trial
from sweeps.spec import FailAttempts, SpecError, SweepSpec
from sweeps.footprint import check_trials_fit
from sweeps.store import COMPLETE_STATUSES, ResultStore, curve_frame, result_row

TUNE_DIR = ".tune"  # under the store root; git-ignored with results/
RESUME_DIR = "resume"  # under TUNE_DIR: the latest checkpoint of each unfinished trial, for driver-kill resume
STATE_DIR = "state"  # inside a reported checkpoint: run_trial's checkpoint_dir
META_FILE = "launcher.json"  # inside a reported checkpoint: attempt number, trial_id
METRIC = "val_loss"  # what the search minimises (final validation loss)
# The live line is redrawn at most this often on a terminal, and printed at most this often to a log/pipe
# (besides every change in the done/failed counts).
MAX_RESUGGESTIONS = 50  # Optuna suggestions tried for one search trial before its experiment counts as exhausted
REFRESH_TTY_S = 1.0
LAUNCH_MARK = "=== launch"  # opens each launch's part of Ray's log
AUTH_HINT = ("With token auth, every node and the driver need RAY_AUTH_MODE=token and the cluster's token "
             "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); see docs/cluster.md")
REFRESH_PIPE_S = 60.0


@dataclass(frozen=True)
class LaunchSummary:
    """What one `launch` did. Trial counts are over the trials it was asked to run (grid + search)."""

    n_requested: int  # grid trials given + search trials still to run
    n_skipped: int  # already complete in the store, not launched
    n_ok: int
    n_diverged: int
    n_failed: int
    n_unrecorded: int  # launched but never recorded (e.g. Tune gave up on them without an error)
    n_resumed: int  # recorded trials whose last attempt started from a saved checkpoint (retry or re-run)
    n_slots: int  # trials that can run at once given the cluster's CPUs/GPUs and max_concurrent
    wall_seconds: float  # the whole launch: Ray start, data preparation, the Tune run
    tune_seconds: float  # inside the Tune run only
    trial_seconds: float  # sum over recorded trials of their training wall time (TrialResult.wall_seconds)
    setup_seconds: tuple[float, ...]  # per trial: time in the trainable outside run_trial's training loop
    log_path: Path

    @property
    def n_recorded(self) -> int:
        return self.n_ok + self.n_diverged + self.n_failed

    @property
    def overhead_ratio(self) -> float | None:
        """Tune wall time over the ideal (sum of trial times / parallel slots); None when nothing trained."""
        if self.trial_seconds <= 0:
            return None
        return self.tune_seconds / (self.trial_seconds / self.n_slots)


class ClusterError(RuntimeError):
    """Ray could not be started or joined (unreachable head, refused token): one line for the user."""


def launch(spec: SweepSpec, trials: list[PlannedTrial], store: ResultStore, *, address: str | None,
           log_path: Path, cache_dir: Path | None = None, storage_path: str | None = None,
           stream: TextIO | None = None, spec_text: str | None = None) -> LaunchSummary:
    """Run `trials` (the grid) and the spec's `search` experiments on Ray; record each finished trial in `store`.

    Trials already complete in the store are skipped. `address`: None starts an embedded local Ray, otherwise
    the cluster to join ("auto", "ray://...", "host:port"). `cache_dir`: the data/tokenizer cache each trial
    uses (default: engram.data's per-user cache on each node). `storage_path`: where Tune keeps
    checkpoints (default <store>/.tune; on a multi-node cluster give shared or cloud storage, docs/cluster.md).
    `stream`: where the progress line goes (default: the terminal's stderr). `spec_text`: the resolved spec,
    written to the store once Ray is up and there is something to run (a re-run of a finished sweep writes
    nothing). Ray's output goes to `log_path` (appended).
    Raises ClusterError when Ray cannot be joined, SpecError when a trial cannot fit the cluster.
    """
    t_start = time.perf_counter()
    log_path = Path(log_path).resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir).resolve() if cache_dir is not None else None
    tune_root = store.root.resolve() / TUNE_DIR
    storage = storage_path if storage_path is not None else str(tune_root)
    # Driver-kill resume needs a folder the trial's node sees; only a local storage path guarantees that here.
    resume_root = tune_root / RESUME_DIR if storage_path is None or "://" not in storage_path else None

    done_ids = store.completed_ids()
    grid, seen = [], set()
    for t in trials:
        if t.kind != "search" and t.trial_id not in done_ids and t.trial_id not in seen:
            grid.append(t)
            seen.add(t.trial_id)
    searches = _pending_searches(spec, store)
    n_skipped = len({t.trial_id for t in trials if t.kind != "search"} & done_ids) + _n_search_done(spec, store)
    if not grid and not searches:  # nothing to run: no need to start Ray
        return LaunchSummary(
            n_requested=0, n_skipped=n_skipped, n_ok=0, n_diverged=0, n_failed=0, n_unrecorded=0, n_resumed=0,
            n_slots=1, wall_seconds=time.perf_counter() - t_start, tune_seconds=0.0, trial_seconds=0.0,
            setup_seconds=(), log_path=log_path)

    # Search trials are resolved from a suggested rho as Tune asks for them; that needs the corpus fingerprint
    # (trial ids) and a throughput (ETAs only), computed once here rather than per trial.
    fingerprint = corpus_fingerprint(spec.data)
    throughput = calibrate_throughput(spec, store.runs())
    n_requested = len(grid) + sum(v.n_left for v in searches.values())
    recorder = _Recorder(spec, store, grid, searches, stream, fingerprint, throughput, resume_root)
    _clean_tune_dir(tune_root, keep={t.trial_id for t in grid})
    tune_seconds = 0.0
    with _quiet(log_path) as (terminal, log):
        out = terminal if stream is None else stream
        where = "starting a local Ray" if address is None else f"connecting to Ray at {address}"
        # Joining a cluster can take minutes (Ray retries an unreachable address): say what is happening.
        out.write(f"[{spec.name}] {where} (Ray's log: {log_path})\n")
        out.flush()
        with _ray_session(address, log_path):
            if address is None:
                _check_fits(spec)
            else:  # the driver's machine was checked by the CLI; a cluster's nodes are known only now
                check_trials_fit(spec, grid, _largest_node_memory(), "the largest node's")
            if spec_text is not None:
                store.write_spec(spec_text)
            recorder.attach(out, log, _n_slots(spec))
            _prepare_data(spec, grid, searches, cache_dir)
            payload = _Payload(spec=spec, configs={t.trial_id: (t.experiment, to_dict(t.config)) for t in grid},
                               cache_dir=None if cache_dir is None else str(cache_dir),
                               resume_root=None if resume_root is None else str(resume_root),
                               fail=spec.testing.fail_attempts)
            optuna = {}
            for exp_name, pending in searches.items():
                # The sampler's seed also counts the trials already stored: TPE draws its first points at random
                # from its seed whatever the history, so a re-run seeded alike would repeat the stored rhos.
                optuna[exp_name] = OptunaSearch(
                    space={"rho": tune.uniform(0.0, 1.0)}, metric=METRIC, mode="min",
                    seed=spec.experiment(exp_name).seed + pending.n_done,
                    points_to_evaluate=pending.points or None, evaluated_rewards=pending.rewards or None)
            n_left = {name: pending.n_left for name, pending in searches.items()}
            stored = store.runs()
            stored = stored[stored["status"].isin(COMPLETE_STATUSES)]
            searcher = _SweepSearcher([t.trial_id for t in grid], optuna, n_left, recorder.resolve_search,
                                      dict(zip(stored["trial_id"], stored["final_val_loss"].astype(float))))
            t_tune = time.perf_counter()
            _run_tune(spec, payload, storage, recorder, searcher, num_samples=n_requested)
            tune_seconds = time.perf_counter() - t_tune
            recorder.close()

    st = recorder.statuses
    return LaunchSummary(
        n_requested=n_requested, n_skipped=n_skipped, n_ok=st.count("ok"), n_diverged=st.count("diverged"),
        n_failed=st.count("failed"), n_unrecorded=max(0, n_requested - searcher.n_abandoned - len(st)),
        n_resumed=recorder.n_resumed, n_slots=recorder.n_slots,
        wall_seconds=time.perf_counter() - t_start, tune_seconds=tune_seconds,
        trial_seconds=recorder.trial_seconds, setup_seconds=tuple(recorder.setup_seconds), log_path=log_path)


# ---------------------------------------------------------------------------------------------------------------
# Ray and Tune


@contextlib.contextmanager
def _ray_session(address: str | None, log_path: Path) -> Iterator[None]:
    """The one place Ray is started or joined; disconnects (and stops an embedded Ray) on the way out.

    No address means a NEW local Ray ("local"): left to None, ray.init joins whatever cluster this machine's
    Ray temp folder names, even a dead one (measured: 5+ minutes of retries after a head was killed).
    Ray's connection and token-authentication failures become one ClusterError line (details in the log).
    """
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level=logging.WARNING)
    except AuthenticationError as err:
        raise ClusterError(f"Ray token authentication failed: {_first_sentence(err)} {AUTH_HINT}") from None
    except ConnectionError as err:
        if _log_mentions_auth(log_path):
            raise ClusterError(f"Ray at {address} refused this driver's token (InvalidAuthToken). {AUTH_HINT}; "
                               f"Ray's log: {log_path}") from None
        raise ClusterError(f"could not join Ray at {address} ({_first_sentence(err)}); Ray's log: {log_path}") \
            from None
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _quiet(log_path: Path) -> Iterator[tuple[TextIO, TextIO]]:
    """Send everything this process writes to stdout/stderr (Ray's logging, Tune's tables and warnings) to
    `log_path`; yield a stream to the real stderr for the progress line, and the log itself.

    Redirected at the file-descriptor level and at the Python level, and the stream handlers of existing loggers
    (Ray's, created at import) are pointed at the log too: any of these alone lets some of the noise through.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved_err), "w", buffering=1)
    py_streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    with open(log_path, "a", buffering=1) as log:
        log.write(f"\n{LAUNCH_MARK} at {_now()} (pid {os.getpid()}) ===\n")
        log.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        handlers = [h for h in _all_stream_handlers() if h.stream in py_streams]
        old_streams = [h.setStream(log) for h in handlers]
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield terminal, log
        finally:
            for h, stream in zip(handlers, old_streams):
                h.setStream(stream)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            terminal.close()


def _all_stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def _check_fits(spec: SweepSpec) -> None:
    """On an embedded Ray (a fixed machine), a trial asking for more than the machine has would wait forever."""
    total = ray.cluster_resources()
    for field, key, need in (("cpus_per_trial", "CPU", spec.resources.cpus_per_trial),
                             ("gpus_per_trial", "GPU", spec.resources.gpus_per_trial)):
        have = total.get(key, 0.0)
        if need > have:
            raise SpecError(f"resources.{field}: {need:g} per trial, but this machine's Ray has {have:g} {key}s")


def _largest_node_memory() -> int:
    """Bytes of Ray's "memory" resource on the largest live node (what Ray lets tasks use there)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return int(max((n.get("Resources", {}).get("memory", 0.0) for n in nodes), default=0.0))


def _log_mentions_auth(log_path: Path) -> bool:
    """Whether this launch's part of Ray's log shows a refused token (Ray says so only there)."""
    with contextlib.suppress(OSError):
        text = log_path.read_text(errors="replace")
        return "InvalidAuthToken" in text[text.rfind(LAUNCH_MARK):]
    return False


def _first_sentence(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text.split(". ")[0].rstrip(".") + "."


def _n_slots(spec: SweepSpec) -> int:
    """Trials that fit at once on the cluster Ray reports (and under max_concurrent)."""
    res = spec.resources
    total = ray.cluster_resources()
    slots = math.floor(total.get("CPU", 0.0) / res.cpus_per_trial + 1e-9)
    if res.gpus_per_trial > 0:
        slots = min(slots, math.floor(total.get("GPU", 0.0) / res.gpus_per_trial + 1e-9))
    if res.max_concurrent is not None:
        slots = min(slots, res.max_concurrent)
    return max(1, slots)


def _run_tune(spec: SweepSpec, payload: _Payload, storage: str, recorder: _Recorder, searcher: _SweepSearcher,
              num_samples: int) -> None:
    res = spec.resources
    trainable = tune.with_resources(tune.with_parameters(_trainable, payload=payload),
                                    {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})
    run_name = f"sweep-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    tuner = tune.Tuner(
        trainable, param_space={},
        tune_config=tune.TuneConfig(
            search_alg=searcher, metric=METRIC, mode="min", num_samples=num_samples,
            max_concurrent_trials=res.max_concurrent,
            # A worker process keeps torch and the token cache imported between trials (start-up overhead).
            reuse_actors=True,
            trial_dirname_creator=lambda t: f"{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=run_name, storage_path=storage, verbose=0, callbacks=[recorder],
            failure_config=tune.FailureConfig(max_failures=res.max_retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )
    tuner.fit()
    # Finished trials are in the store; Tune's copies of their checkpoints are no longer needed.
    if "://" not in storage:
        shutil.rmtree(Path(storage) / run_name, ignore_errors=True)


class _SweepSearcher(Searcher):
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


class _PendingSearch(NamedTuple):
    n_left: int  # trials still to run
    n_done: int  # complete trials in the store (ok or diverged)
    points: list[dict]  # Optuna warm start: the rho of each ok trial ...
    rewards: list[float]  # ... and its final validation loss (diverged trials teach the sampler nothing)


def _pending_searches(spec: SweepSpec, store: ResultStore) -> dict[str, _PendingSearch]:
    """The search experiments with trials left to run, by name."""
    out: dict[str, _PendingSearch] = {}
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
            out[exp.name] = _PendingSearch(n_left, len(mine), points, rewards)
    return out


def _n_search_done(spec: SweepSpec, store: ResultStore) -> int:
    """Complete search trials stored (at most n_trials per experiment): the search part of a re-run's skips."""
    runs = store.runs()
    complete = runs[runs["status"].isin(COMPLETE_STATUSES)]
    return sum(min(exp.n_trials, int((complete["experiment"] == exp.name).sum()))
               for exp in spec.experiments if exp.kind == "search")


def _prepare_data(spec: SweepSpec, grid: list[PlannedTrial], searches: dict[str, _PendingSearch],
                  cache_dir: Path | None) -> None:
    """Tokenize the corpus once in the driver so that concurrent trials read the cache, not race to build it."""
    from engram.data import prepare_data

    wanted = {(t.config.data, t.config.model.vocab_size) for t in grid}
    if searches:
        wanted.add((spec.data, spec.model.vocab_size))
    for data, vocab_size in wanted:
        prepare_data(data, vocab_size, cache_dir)


# ---------------------------------------------------------------------------------------------------------------
# The trainable (runs in a Ray worker, possibly on another node)


@dataclass(frozen=True)
class _Payload:
    """Everything the trainable needs, shipped once through the object store (tune.with_parameters)."""

    spec: SweepSpec
    configs: dict[str, tuple[str, dict]]  # grid trials: trial_id -> (experiment, TrialConfig as a mapping)
    cache_dir: str | None
    resume_root: str | None
    fail: FailAttempts | None


def _trainable(tune_config: dict[str, Any], payload: _Payload) -> None:
    import torch

    from engram.trial import keep_large_buffers_in_heap, run_trial

    t_enter = time.perf_counter()
    # Torch threads follow the CPUs this trial was given (Ray sets no limit of its own for torch).
    torch.set_num_threads(max(1, int(payload.spec.resources.cpus_per_trial)))
    keep_large_buffers_in_heap()  # this worker process exists to train
    trial_id = tune_config["trial_id"]
    if "search" in tune_config:  # resolved by the driver when Optuna suggested its rho
        experiment, config_dict = tune_config["search"], json.loads(tune_config["config_json"])
    else:
        experiment, config_dict = payload.configs[trial_id]
    config = from_dict(TrialConfig, config_dict)

    node_id = ray.get_runtime_context().get_node_id()
    # "trial_id" is Tune's own key in a result, hence "engram_trial_id".
    where = {"engram_trial_id": trial_id, "host": f"{socket.gethostname()}/node-{node_id[:8]}"}
    work = Path(tempfile.mkdtemp(prefix=f"engram-{trial_id}-"))
    state = work / STATE_DIR
    attempt = 1
    restored = tune.get_checkpoint()
    if restored is not None:  # a retry in this Tune run: resume from the last reported checkpoint
        with restored.as_directory() as d:
            attempt = json.loads((Path(d) / META_FILE).read_text())["attempt"] + 1
            if (Path(d) / STATE_DIR).is_dir():
                shutil.copytree(Path(d) / STATE_DIR, state)
    elif payload.resume_root is not None:  # a re-run after the driver died: resume from the published state
        published = _latest_resume(Path(payload.resume_root), trial_id)
        if published is not None:
            shutil.copytree(published / STATE_DIR, state)
    resumed = state.is_dir()
    (work / META_FILE).write_text(json.dumps({"attempt": attempt, "trial_id": trial_id}))

    def report(metrics: dict[str, Any], checkpoint: bool = False) -> None:
        metrics = {METRIC: math.nan, **where, "attempt": attempt, **metrics}
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(work) if checkpoint else None)

    def on_progress(p) -> None:
        report({"step": p.step, "total_steps": p.total_steps, "elapsed": p.elapsed,
                METRIC: math.nan if p.val_loss is None else p.val_loss})

    def on_checkpoint(path: Path) -> None:
        report({}, checkpoint=True)
        if payload.resume_root is not None:
            # Best effort: on a cluster node that cannot reach the driver's results folder the trial goes on,
            # only without driver-kill resume.
            with contextlib.suppress(OSError):
                _publish_resume(Path(payload.resume_root), trial_id, work)

    if payload.fail is not None and payload.fail.applies(experiment, trial_id, attempt):
        report({}, checkpoint=True)  # the attempt count must survive the injected crash
        raise RuntimeError(f"injected fault: attempt {attempt} of trial {trial_id} (testing.fail_attempts)")

    cache_dir = None if payload.cache_dir is None else Path(payload.cache_dir)
    try:
        result = run_trial(config, cache_dir=cache_dir, checkpoint_dir=state,
                           on_progress=on_progress, on_checkpoint=on_checkpoint)
        setup = time.perf_counter() - t_enter - result.wall_seconds
        report({METRIC: math.nan if result.final_val_loss is None else result.final_val_loss,
                "trial_result": json.dumps(result.to_dict()), "setup_seconds": setup, "resumed": resumed})
    finally:  # Tune holds its own copy of every reported checkpoint
        shutil.rmtree(work, ignore_errors=True)


def _publish_resume(root: Path, trial_id: str, work: Path) -> None:
    """Copy the trial's checkpoint to <root>/<trial_id>.<n> atomically (copy to a temp name, then rename)."""
    root.mkdir(parents=True, exist_ok=True)
    n = 1 + max((_resume_index(p) for p in root.glob(f"{trial_id}.*")), default=0)
    tmp = root / f".{trial_id}.{n}.{os.getpid()}.tmp"
    shutil.copytree(work / STATE_DIR, tmp / STATE_DIR)
    os.replace(tmp, root / f"{trial_id}.{n}")
    for old in root.glob(f"{trial_id}.*"):
        if _resume_index(old) < n:
            shutil.rmtree(old, ignore_errors=True)


def _latest_resume(root: Path, trial_id: str) -> Path | None:
    found = [p for p in root.glob(f"{trial_id}.*") if _resume_index(p) > 0]
    return max(found, key=_resume_index) if found else None


def _clean_tune_dir(tune_root: Path, keep: set[str]) -> None:
    """Remove what earlier launches left behind: Tune run folders of drivers no longer alive (killed ones), and
    published states of trials other than `keep` (complete ones, and partial search trials: a re-run's Optuna
    suggests other rhos, so those states would never be resumed)."""
    if not tune_root.is_dir():
        return
    for p in tune_root.iterdir():
        if p.is_dir() and p.name != RESUME_DIR:
            pid = p.name.rsplit("-", 1)[-1]
            if not (pid.isdigit() and _pid_alive(int(pid))):
                shutil.rmtree(p, ignore_errors=True)
    resume = tune_root / RESUME_DIR
    if resume.is_dir():
        for p in resume.iterdir():
            if p.name.startswith(".") or p.name.split(".")[0] not in keep:
                shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a folder named after this process is from an earlier launch in it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _drop_resume(root: Path, trial_id: str) -> None:
    for p in root.glob(f"{trial_id}.*"):
        shutil.rmtree(p, ignore_errors=True)


def _resume_index(path: Path) -> int:
    suffix = path.name.rsplit(".", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


# ---------------------------------------------------------------------------------------------------------------
# The driver side: recording finished trials and the progress line


class _Recorder(tune.Callback):
    """Writes each finished trial to the store at once and keeps the one-line progress view."""

    def __init__(self, spec: SweepSpec, store: ResultStore, grid: list[PlannedTrial],
                 searches: dict[str, _PendingSearch], stream: TextIO | None, fingerprint: str,
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
        self._started_at.setdefault(trial.trial_id, _now())
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
                         started_at=self._started_at.get(tid, _now()), finished_at=_now())
        if self._host.get(tid):
            row["host"] = self._host[tid]  # the node the trial ran on, not the driver's
        self.store.write_trial(row, curve_frame(result) if result is not None else None)
        if self.log is not None:
            self.log.write(f"{_now()} recorded {planned.trial_id} ({planned.experiment}) status {row['status']} "
                           f"attempts {row['attempts']} resumed {bool(resumed)} host {row['host']}"
                           + (f" error {row['error']}" if row["error"] else "") + "\n")
        if self.resume_root is not None and result is not None:  # complete: its saved state is of no more use
            _drop_resume(self.resume_root, planned.trial_id)
        self.statuses.append(row["status"])
        self.recorded_ids.append(planned.trial_id)
        self._progress.pop(tid, None)
        if result is not None:
            self.trial_seconds += result.wall_seconds
            if setup_seconds is not None:
                self.setup_seconds.append(setup_seconds)
            self._actual_over_est.append((result.wall_seconds, planned.est_seconds))

    # -- the progress line --------------------------------------------------------------------------------------

    def _search_estimate(self, searches: dict[str, _PendingSearch]) -> float:
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
        now = time.monotonic()
        line = self._line()
        # A terminal redraws on any change; a log or pipe gets a line when a trial ends (and now and then).
        cut = " | ETA" if self._tty else " | "
        changed = line.split(cut)[0] != self._last_line.split(cut)[0]
        wait = REFRESH_TTY_S if self._tty else REFRESH_PIPE_S
        if not (changed or now - self._last_draw >= wait or (force and line != self._last_line)):
            return
        if self._tty:
            self.stream.write("\r\x1b[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last_line, self._last_draw = line, now


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


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

