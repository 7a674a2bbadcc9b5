"""The Ray driver: `launch` runs a sweep's trials in one Tune run and returns a `LaunchSummary`.

The one place Ray is started or joined (`_ray_session`), Ray's output is sent to a log, the trials are checked
against the cluster, and the Tune run is configured. See the package docstring for how a sweep runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

import ray
from ray import tune
from ray.exceptions import AuthenticationError
from ray.tune.search.optuna import OptunaSearch

from engram.config import to_dict
from engram.data import corpus_fingerprint
from sweeps.footprint import check_trials_fit
from sweeps.launcher.recorder import Recorder, now
from sweeps.launcher.search import (PendingSearch, SearchTrials, SweepSearcher, n_search_done,
                                    pending_searches)
from sweeps.launcher.worker import METRIC, RESUME_DIR, TUNE_DIR, Payload, clean_tune_dir, trainable
from sweeps.plan import PlannedTrial, calibrate_throughput
from sweeps.spec import SpecError, SweepSpec
from sweeps.store import COMPLETE_STATUSES, ResultStore

LAUNCH_MARK = "=== launch"  # opens each launch's part of Ray's log
AUTH_HINT = ("With token auth, every node and the driver need RAY_AUTH_MODE=token and the cluster's token "
             "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); see docs/cluster.md")


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
    interrupted: bool = False  # Ctrl-C (SIGINT) ended the Tune run: the trials still running were left unrecorded

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
    searches = pending_searches(spec, store)
    n_skipped = len({t.trial_id for t in trials if t.kind != "search"} & done_ids) + n_search_done(spec, store)
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
    search_trials = SearchTrials(spec, fingerprint, throughput)
    recorder = Recorder(spec, store, grid, searches, stream, search_trials, resume_root)
    clean_tune_dir(tune_root, keep={t.trial_id for t in grid})
    tune_seconds, interrupted = 0.0, False
    # The corpus is read and tokenized first, in this process: one that cannot be read fails before Ray starts
    # or anything is written to the store (the tokenizer cache lives outside it).
    _prepare_data(spec, grid, searches, cache_dir)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecError(f"results_dir: cannot create {log_path.parent} ({err.strerror or err})") from None
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
            # Only now, with the data ready and the trials known to fit, does the store take the spec.
            if spec_text is not None:
                store.write_spec(spec_text)
            recorder.attach(out, log, _n_slots(spec))
            payload = Payload(spec=spec, configs={t.trial_id: (t.experiment, to_dict(t.config)) for t in grid},
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
            searcher = SweepSearcher([t.trial_id for t in grid], optuna, n_left, search_trials.resolve,
                                      dict(zip(stored["trial_id"], stored["final_val_loss"].astype(float))))
            t_tune = time.perf_counter()
            interrupted = _run_tune(spec, payload, storage, recorder, searcher, num_samples=n_requested)
            tune_seconds = time.perf_counter() - t_tune
            recorder.close()

    st = recorder.statuses
    return LaunchSummary(
        n_requested=n_requested, n_skipped=n_skipped, n_ok=st.count("ok"), n_diverged=st.count("diverged"),
        n_failed=st.count("failed"), n_unrecorded=max(0, n_requested - searcher.n_abandoned - len(st)),
        n_resumed=recorder.n_resumed, n_slots=recorder.n_slots,
        wall_seconds=time.perf_counter() - t_start, tune_seconds=tune_seconds,
        trial_seconds=recorder.trial_seconds, setup_seconds=tuple(recorder.setup_seconds), log_path=log_path,
        interrupted=interrupted)


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
    except (ValueError, RuntimeError) as err:   # an address Ray cannot parse, a ray:// client it cannot make
        raise ClusterError(f"cannot use Ray address {address!r} ({_first_sentence(err)})") from None
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
        log.write(f"\n{LAUNCH_MARK} at {now()} (pid {os.getpid()}) ===\n")
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


class _Interrupt(tune.Stopper):
    """Ends the whole Tune run once `requested` is set; stops no trial on its own."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.requested


@contextlib.contextmanager
def _stop_on_sigint() -> Iterator[_Interrupt]:
    """While the Tune run lasts, the first SIGINT (Ctrl-C) ends it through the yielded stopper, so that `launch` can
    say the sweep was cut short; the handler it replaced is back at once, so a second Ctrl-C raises
    KeyboardInterrupt. Tune's own SIGINT handler, which ends the run alike but tells only its log, is turned off
    (TUNE_DISABLE_SIGINT_HANDLER, read when the run starts). Signals reach only the main thread."""
    stop = _Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.getsignal(signal.SIGINT)
    saved_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")

    def on_sigint(signum, frame) -> None:
        stop.requested = True
        signal.signal(signal.SIGINT, previous)

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
        if saved_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = saved_env


def _run_tune(spec: SweepSpec, payload: Payload, storage: str, recorder: Recorder, searcher: SweepSearcher,
              num_samples: int) -> bool:
    """One Tune run over the searcher's trials; True when Ctrl-C cut it short."""
    res = spec.resources
    resourced = tune.with_resources(tune.with_parameters(trainable, payload=payload),
                                    {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})
    run_name = f"sweep-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    with _stop_on_sigint() as interrupt:
        tuner = tune.Tuner(
            resourced, param_space={},
            tune_config=tune.TuneConfig(
                search_alg=searcher, metric=METRIC, mode="min", num_samples=num_samples,
                max_concurrent_trials=res.max_concurrent,
                # A worker process keeps torch and the token cache imported between trials (start-up overhead).
                reuse_actors=True,
                trial_dirname_creator=lambda t: f"{t.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=run_name, storage_path=storage, verbose=0, callbacks=[recorder], stop=interrupt,
                failure_config=tune.FailureConfig(max_failures=res.max_retries),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            ),
        )
        tuner.fit()
    # Finished trials are in the store; Tune's copies of their checkpoints are no longer needed.
    if "://" not in storage:
        shutil.rmtree(Path(storage) / run_name, ignore_errors=True)
    return interrupt.requested


def _prepare_data(spec: SweepSpec, grid: list[PlannedTrial], searches: dict[str, PendingSearch],
                  cache_dir: Path | None) -> None:
    """Tokenize the corpus once in the driver so that concurrent trials read the cache, not race to build it."""
    from engram.data import prepare_data

    wanted = {(t.config.data, t.config.model.vocab_size) for t in grid}
    if searches:
        wanted.add((spec.data, spec.model.vocab_size))
    for data, vocab_size in wanted:
        prepare_data(data, vocab_size, cache_dir)
