"""The trial worker: the Tune trainable that runs one trial in a Ray worker, and its resume protocol.

Folders (all under the store root's `.tune/`, git-ignored with results/):
- a reported checkpoint holds `state/` (run_trial's checkpoint_dir) and `launcher.json` (attempt, trial_id);
- `resume/<trial_id>.<n>`: the latest state of each unfinished trial, published atomically (copy to a temporary
  name, rename) for a re-run after the driver died; dropped once the trial's row is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from engram.config import TrialConfig, from_dict
from sweeps.spec import FailAttempts, SweepSpec

TUNE_DIR = ".tune"  # under the store root; git-ignored with results/
RESUME_DIR = "resume"  # under TUNE_DIR: the latest checkpoint of each unfinished trial, for driver-kill resume
STATE_DIR = "state"  # inside a reported checkpoint: run_trial's checkpoint_dir
META_FILE = "launcher.json"  # inside a reported checkpoint: attempt number, trial_id
METRIC = "val_loss"  # what a trial reports and the search minimises (final validation loss)


@dataclass(frozen=True)
class Payload:
    """Everything the trainable needs, shipped once through the object store (tune.with_parameters)."""

    spec: SweepSpec
    configs: dict[str, tuple[str, dict]]  # grid trials: trial_id -> (experiment, TrialConfig as a mapping)
    cache_dir: str | None
    resume_root: str | None
    fail: FailAttempts | None


def hide_gpus_not_given() -> None:
    """A trial sees only the GPUs Ray gave it. Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone in a worker that asked
    for no GPU (older Rays emptied it), so with `resources.gpus_per_trial: 0` every trial with `train.device: auto`
    on a GPU node would find the node's GPUs and train on cuda:0, all of them at once. Emptying it before torch
    touches CUDA keeps them on the CPUs Ray counted for them. A worker given GPUs is left as Ray set it."""
    if not ray.get_gpu_ids():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def trainable(tune_config: dict[str, Any], payload: Payload) -> None:
    hide_gpus_not_given()  # first: before anything in this worker can initialise CUDA
    import torch

    from engram.trial import keep_large_buffers_in_heap, run_trial
    from engram.util import cpu_model

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
    where = {"engram_trial_id": trial_id, "host": f"{socket.gethostname()}/node-{node_id[:8]}", "cpu": cpu_model()}
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
        published = latest_resume(Path(payload.resume_root), trial_id)
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
                publish_resume(Path(payload.resume_root), trial_id, work)

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


def publish_resume(root: Path, trial_id: str, work: Path) -> None:
    """Copy the trial's checkpoint to <root>/<trial_id>.<n> atomically (copy to a temp name, then rename)."""
    root.mkdir(parents=True, exist_ok=True)
    n = 1 + max((_resume_index(p) for p in root.glob(f"{trial_id}.*")), default=0)
    tmp = root / f".{trial_id}.{n}.{os.getpid()}.tmp"
    shutil.copytree(work / STATE_DIR, tmp / STATE_DIR)
    os.replace(tmp, root / f"{trial_id}.{n}")
    for old in root.glob(f"{trial_id}.*"):
        if _resume_index(old) < n:
            shutil.rmtree(old, ignore_errors=True)


def latest_resume(root: Path, trial_id: str) -> Path | None:
    found = [p for p in root.glob(f"{trial_id}.*") if _resume_index(p) > 0]
    return max(found, key=_resume_index) if found else None


def clean_tune_dir(tune_root: Path, keep: set[str]) -> None:
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


def drop_resume(root: Path, trial_id: str) -> None:
    for p in root.glob(f"{trial_id}.*"):
        shutil.rmtree(p, ignore_errors=True)


def _resume_index(path: Path) -> int:
    suffix = path.name.rsplit(".", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0
