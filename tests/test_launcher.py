"""sweeps.launcher on an embedded local Ray: every trial recorded once, retries, failures, divergence, search.

Real trials (tiny models, a few dozen steps) through the real spec, plan, store and Ray Tune. Ray runs with a
short private temp folder (Unix socket paths must be short), usage stats off and token auth off (tests only).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from engram.trial import run_trial
from engram.util import cpu_model
from sweeps.launcher import RESUME_DIR, STATE_DIR, TUNE_DIR, launch
from sweeps.plan import plan_sweep
from sweeps.spec import SpecError, parse_spec
from sweeps.store import ResultStore
from sweeps.tiny import tiny_sweep

BASE = tiny_sweep()
BUDGET = 2.0e9  # ~30 optimiser steps of the tiny model
pytestmark = pytest.mark.slow  # every test starts an embedded Ray and trains real (tiny) trials


def make_spec(tmp: Path, name: str, experiments: list[dict], **sections):
    raw = {"name": name, "results_dir": str(tmp), **BASE, **sections, "experiments": experiments}
    return parse_spec(yaml.safe_load(yaml.safe_dump(raw)), base_dir=tmp)


def run(spec, cache_dir: Path):
    store = ResultStore(spec.store_dir)
    progress = io.StringIO()
    summary = launch(spec, plan_sweep(spec), store, address=None, log_path=spec.store_dir / "ray.log",
                     cache_dir=cache_dir, stream=progress)
    return summary, store, progress.getvalue()


def stored_files(store: ResultStore) -> list[str]:
    return sorted(p.name for d in (store.runs_dir, store.curves_dir) for p in d.iterdir())


def test_sweep_runs_every_trial_once_with_retry_and_search(ray_env, cache_dir, tmp_path):
    experiments = [
        {"name": "alloc", "kind": "allocation", "p_tot_ratio": 3, "rho": [0.5, 1.0], "budgets": [BUDGET],
         "seeds": [0]},
        {"name": "mem", "kind": "memory", "memory": ["engram"], "slots": [4096], "budget": BUDGET, "seeds": [0]},
        {"name": "search", "kind": "search", "p_tot_ratio": 3, "budget": BUDGET, "n_trials": 2, "seed": 0},
    ]
    # The memory trial raises at start in its first attempt: Tune retries it (max_retries 1).
    spec = make_spec(tmp_path, "s1", experiments, testing={"fail_attempts": {"match": "mem", "times": 1}})
    summary, store, progress = run(spec, cache_dir)

    assert (summary.n_requested, summary.n_ok, summary.n_failed, summary.n_unrecorded) == (5, 5, 0, 0)
    runs = store.runs()
    assert len(runs) == 5 and runs["trial_id"].is_unique
    assert set(runs["status"]) == {"ok"}
    assert dict(zip(runs["experiment"], runs["attempts"]))["mem"] == 2
    assert sorted(runs.loc[runs["experiment"] != "mem", "attempts"]) == [1, 1, 1, 1]
    planned = {t.trial_id for t in plan_sweep(spec)}
    assert planned <= set(runs["trial_id"])
    search = runs[runs["experiment"] == "search"]
    assert len(search) == 2 and search["rho"].between(0, 1).all() and search["rho"].nunique() == 2
    assert (search["kind"] == "search").all()
    # Every row has its curve; the row's host is the node the trial ran on.
    curves = store.curves()
    assert set(curves["trial_id"]) == set(runs["trial_id"])
    assert runs["host"].str.contains("/node-").all()
    assert all(json.loads(v)["cpu"] == cpu_model() for v in runs["versions"])  # the node's CPU
    assert runs["final_val_loss"].notna().all() and (runs["steps"] > 0).all()
    assert "5/5 done" in progress.splitlines()[-1]
    assert summary.trial_seconds > 0 and len(summary.setup_seconds) == 5
    assert not store.temp_files()

    # Re-running launches nothing and rewrites nothing.
    before = {p: p.stat().st_mtime_ns for p in store.runs_dir.iterdir()}
    summary2, store, _ = run(spec, cache_dir)
    assert (summary2.n_requested, summary2.n_skipped) == (0, 5)  # 3 grid + 2 search trials stored
    assert {p: p.stat().st_mtime_ns for p in store.runs_dir.iterdir()} == before

    # Extending the grid (one more rho, one more search trial) runs only the new points.
    experiments[0]["rho"] = [0.5, 0.8, 1.0]
    experiments[2]["n_trials"] = 3
    summary3, store, _ = run(make_spec(tmp_path, "s1", experiments), cache_dir)
    assert (summary3.n_requested, summary3.n_skipped, summary3.n_ok) == (2, 5, 2)
    runs = store.runs()
    assert len(runs) == 7 and runs["trial_id"].is_unique
    assert sorted(runs.loc[runs["experiment"] == "alloc", "rho"]) == [0.5, 0.8, 1.0]
    assert len(stored_files(store)) == 14


def test_failing_and_diverging_trials_are_recorded_not_retried_forever(ray_env, cache_dir, tmp_path):
    experiments = [
        {"name": "alloc", "kind": "allocation", "p_tot_ratio": 3, "rho": [1.0], "budgets": [BUDGET], "seeds": [0]},
        {"name": "boom", "kind": "memory", "memory": ["engram"], "slots": [4096], "budget": BUDGET, "seeds": [0]},
    ]
    train = {**BASE["train"], "lr": 1.0e4}  # diverges within a few steps
    spec = make_spec(tmp_path, "s2", experiments, train=train,
                     testing={"fail_attempts": {"match": "boom", "times": 10}})
    summary, store, progress = run(spec, cache_dir)

    assert (summary.n_ok, summary.n_diverged, summary.n_failed) == (0, 1, 1)
    runs = store.runs().set_index("experiment")
    assert runs.loc["alloc", "status"] == "diverged" and runs.loc["alloc", "attempts"] == 1
    assert "non-finite" in runs.loc["alloc", "error"]
    boom = runs.loc["boom"]
    assert boom["status"] == "failed" and boom["attempts"] == 2  # first try + max_retries
    assert boom["error"].startswith("RuntimeError: injected fault") and "\n" not in boom["error"]
    assert pd.isna(boom["final_val_loss"])
    assert "1 failed" in progress and "1 diverged" in progress

    # A re-run retries the failed trial only (the diverged one is complete).
    summary2, store, _ = run(spec, cache_dir)
    assert (summary2.n_requested, summary2.n_skipped, summary2.n_failed) == (1, 1, 1)
    assert len(store.runs()) == 2


def test_a_trial_bigger_than_the_machine_is_refused(ray_env, cache_dir, tmp_path):
    experiments = [{"name": "alloc", "kind": "allocation", "p_tot_ratio": 3, "rho": [1.0], "budgets": [BUDGET]}]
    spec = make_spec(tmp_path, "s3", experiments, resources={"cpus_per_trial": 512})
    with pytest.raises(SpecError, match=r"^resources\.cpus_per_trial: 512 per trial, but this machine's Ray has"):
        run(spec, cache_dir)
    assert not ResultStore(spec.store_dir).runs_dir.exists()


class Interrupt(Exception):
    pass


def test_a_rerun_resumes_a_trial_cut_short_from_its_published_state(ray_env, cache_dir, tmp_path):
    experiments = [{"name": "alloc", "kind": "allocation", "p_tot_ratio": 3, "rho": [1.0], "budgets": [BUDGET]}]
    spec = make_spec(tmp_path, "s4", experiments)
    (planned,) = plan_sweep(spec)
    # What a killed driver leaves: the state a trial published at its first checkpoint (step 10 of ~30).
    state = spec.store_dir / TUNE_DIR / RESUME_DIR / f"{planned.trial_id}.1" / STATE_DIR

    def stop(path: Path) -> None:
        raise Interrupt

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the trial's worker (cpus_per_trial 1): same arithmetic, same losses
    try:
        with pytest.raises(Interrupt):
            run_trial(planned.config, cache_dir=cache_dir, checkpoint_dir=state, on_checkpoint=stop)
        reference = run_trial(planned.config, cache_dir=cache_dir)
    finally:
        torch.set_num_threads(threads)

    summary, store, _ = run(spec, cache_dir)
    assert (summary.n_ok, summary.n_resumed) == (1, 1)
    row = store.runs().iloc[0]
    assert row["final_val_loss"] == reference.final_val_loss and row["steps"] == reference.steps
    curve = store.curves().sort_values("step")
    assert list(curve["train_loss"]) == [p.train_loss for p in reference.curve]
    assert not any((spec.store_dir / TUNE_DIR / RESUME_DIR).iterdir())  # dropped once the row is written


def test_search_never_retrains_a_model_the_sweep_already_has(ray_env, cache_dir, tmp_path):
    # At P_tot / P_act = 1.5 this backbone has only 7 distinct models over rho in [0, 1] (whole experts: 2..8
    # routed). The grid takes 4 of them (same budget and seed as the search), so the search's 4 trials can find
    # only the 3 models left: each is trained once, the grid's rows keep their experiment, and the fourth search
    # trial is given up rather than repeated.
    experiments = [
        {"name": "alloc", "kind": "allocation", "p_tot_ratio": 1.5, "rho": [0.0, 0.25, 0.584, 1.0],
         "budgets": [BUDGET], "seeds": [0]},
        {"name": "search", "kind": "search", "p_tot_ratio": 1.5, "budget": BUDGET, "n_trials": 4, "seed": 0},
    ]
    spec = make_spec(tmp_path, "s4", experiments)
    summary, store, _ = run(spec, cache_dir)

    assert (summary.n_ok, summary.n_failed, summary.n_unrecorded) == (7, 0, 0)
    runs = store.runs()
    assert len(runs) == 7 and runs["n_routed"].nunique() == 7
    assert (runs["experiment"] == "alloc").sum() == 4 and (runs["experiment"] == "search").sum() == 3


def test_a_trial_sees_only_the_gpus_ray_gave_it(ray_env):
    # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone in a worker that asked for no GPU; the trainable empties it, so a
    # `train.device: auto` trial with gpus_per_trial 0 stays on its CPUs. A Ray told it has one (fake) GPU shows
    # both sides on a machine without any.
    import os

    import ray

    from sweeps.launcher.worker import hide_gpus_not_given

    def visible() -> str | None:
        hide_gpus_not_given()
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert ray.get(ray.remote(num_gpus=0)(visible).remote()) == ""
        assert ray.get(ray.remote(num_gpus=1)(visible).remote()) == "0"
        assert ray.get(ray.remote(num_gpus=0)(visible).remote()) == ""  # a worker reused after a GPU task too
    finally:
        ray.shutdown()
