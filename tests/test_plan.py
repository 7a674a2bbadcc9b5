"""The plan: grid expansion through the real solver, content-addressed trial ids, horizons, ETAs, the table."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest

from engram.data import corpus_fingerprint
from engram.trial import trial_id
from sweeps.plan import (STARTUP_SECONDS, Throughput, calibrate_throughput, matmul_flops_per_second, plan_search_trial,
                         plan_sweep, plan_table)
from sweeps.spec import parse_spec, target_p_tot
from test_store import TINY_MODEL

FIXED = Throughput(1e9, 2.0, "fixed for tests")
SPEC = {
    "name": "tiny",
    "data": {"corpus": "corpus"},
    "model": TINY_MODEL,
    "train": {"batch_size": 4, "eval_interval": 5, "eval_tokens": 512},
    "experiments": [
        {"name": "alloc", "kind": "allocation", "p_tot_ratio": 3, "rho": [0.0, 0.5, 0.75, 1.0],
         "budgets": [1.5e8, 3e8], "seeds": [0, 1]},
        {"name": "mem", "kind": "memory", "memory": ["engram", "overencoding"], "slots": [200, 2000, 20000],
         "budget": 1.5e8},
        {"name": "search", "kind": "search", "p_tot_ratio": 3, "budget": 1.5e8, "n_trials": 3, "seed": 4},
    ],
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plan")
    (root / "corpus").mkdir()
    for i in range(3):
        (root / "corpus" / f"{i}.txt").write_text(f"document {i} " * 50)
    return root


def spec_with(base_dir: Path, change=lambda s: None):
    raw = copy.deepcopy(SPEC)
    change(raw)
    return parse_spec(raw, base_dir)


def test_grid_is_expanded_with_concrete_configs(base_dir: Path) -> None:
    spec = spec_with(base_dir)
    trials = plan_sweep(spec, throughput=FIXED)
    alloc = [t for t in trials if t.experiment == "alloc"]
    mem = [t for t in trials if t.experiment == "mem"]
    assert len(alloc) == 2 * 4 * 2 and len(mem) == 2 * 3 and len(trials) == len(alloc) + len(mem)
    assert all(t.kind == "allocation" for t in alloc) and all(t.rho is None and t.kind == "memory" for t in mem)
    for t in trials:
        assert t.config.train.flops == t.budget and t.config.train.seed == t.seed
        step_flops = t.flops_per_token * t.config.train.batch_size * t.config.model.seq_len
        assert abs(t.tokens * t.flops_per_token - t.budget) <= step_flops / 2 + 1e-6  # horizon = round(steps)
        assert t.est_seconds > FIXED.startup_seconds
    fingerprint = corpus_fingerprint(spec.data)
    assert all(t.trial_id == trial_id(t.config, fingerprint) for t in trials)
    assert len({t.trial_id for t in trials}) == len(trials)


def test_allocation_trials_hold_p_tot_and_move_rho(base_dir: Path) -> None:
    spec = spec_with(base_dir)
    target = target_p_tot(spec, spec.experiments[0])
    alloc = [t for t in plan_sweep(spec, throughput=FIXED) if t.experiment == "alloc" and t.seed == 0
             and t.budget == 1.5e8]
    assert [t.rho for t in alloc] == [0.0, 0.5, 0.75, 1.0]
    for t in alloc:
        assert abs(t.counts.p_tot / target - 1) < 0.02
        assert abs(t.counts.rho - t.rho) < 0.1
    n_routed = [t.config.model.n_routed for t in alloc]
    assert n_routed == sorted(n_routed) and n_routed[0] == TINY_MODEL["top_k"]
    assert alloc[-1].slots == 0 and alloc[-1].memory == "none" and alloc[0].memory == "engram"
    p_act = [t.counts.p_act for t in alloc]
    assert max(p_act) / min(p_act) < 1.1  # P_act (nearly) fixed: only memory projections and router change


def test_memory_trials_keep_the_backbone(base_dir: Path) -> None:
    mem = [t for t in plan_sweep(spec_with(base_dir), throughput=FIXED) if t.experiment == "mem"]
    assert {(t.memory, t.slots) for t in mem} == {(k, s) for k in ("engram", "overencoding") for s in (200, 2000, 20000)}
    assert all(t.config.model.n_routed == TINY_MODEL["n_routed"] for t in mem)
    engram = sorted((t for t in mem if t.memory == "engram"), key=lambda t: t.slots)
    assert engram[0].counts.p_engram < engram[1].counts.p_engram < engram[2].counts.p_engram


def test_ids_are_stable_and_extending_the_grid_only_adds(base_dir: Path) -> None:
    spec = spec_with(base_dir)
    ids = [t.trial_id for t in plan_sweep(spec, throughput=FIXED)]
    assert ids == [t.trial_id for t in plan_sweep(spec, throughput=Throughput(5e9, 0.0, "other"))]
    wider = spec_with(base_dir, lambda s: (s["experiments"][0].update(rho=[0.0, 0.25, 0.5, 0.75, 1.0],
                                                                       seeds=[0, 1, 2])))
    wider_ids = {t.trial_id for t in plan_sweep(wider, throughput=FIXED)}
    assert set(ids) < wider_ids and len(wider_ids - set(ids)) == 2 * 5 * 3 - 2 * 4 * 2
    # What does not change the trained model does not change ids.
    renamed = spec_with(base_dir, lambda s: (s.update(name="other", resources={"max_retries": 0}),
                                             s["experiments"][0].update(name="alloc2")))
    assert {t.trial_id for t in plan_sweep(renamed, throughput=FIXED)} == set(ids)
    # What does, does.
    lr = spec_with(base_dir, lambda s: s["train"].update(lr=1e-3))
    assert not {t.trial_id for t in plan_sweep(lr, throughput=FIXED)} & set(ids)


def test_equal_configs_are_one_trial(base_dir: Path) -> None:
    spec = spec_with(base_dir, lambda s: s["experiments"][0].update(rho=[0.999, 1.0], budgets=[1.5e8], seeds=[0]))
    trials = [t for t in plan_sweep(spec, throughput=FIXED) if t.experiment == "alloc"]
    assert len(trials) == 1 and trials[0].rho == 0.999 and trials[0].memory == "none"


def test_search_trials_resolve_a_suggested_rho(base_dir: Path) -> None:
    spec = spec_with(base_dir)
    t = plan_search_trial(spec, "search", 0.5, 4, throughput=FIXED)
    assert t.kind == "search" and t.rho == 0.5 and t.seed == 4 and t.budget == 1.5e8
    grid_twin = next(g for g in plan_sweep(spec, throughput=FIXED)
                     if g.experiment == "alloc" and g.rho == 0.5 and g.budget == 1.5e8 and g.seed == 0)
    assert t.config.model == grid_twin.config.model  # same solver, same target P_tot
    with pytest.raises(ValueError, match="rho: expected a number in"):
        plan_search_trial(spec, "search", 1.2, 0)
    with pytest.raises(ValueError, match="not a search"):
        plan_search_trial(spec, "alloc", 0.5, 0)


def test_throughput_comes_from_stored_trials_when_there_are_any(base_dir: Path) -> None:
    spec = spec_with(base_dir)
    runs = pd.DataFrame({"status": ["ok", "ok", "ok", "failed"], "compute": [4e9, 9e9, 2e9, None],
                         "wall_seconds": [2.0, 3.0, 2.0, None]})
    measured = calibrate_throughput(spec, runs)
    assert measured.flops_per_second == 2e9 and "3 finished trials" in measured.source
    calibrated = calibrate_throughput(spec, runs.iloc[:0])
    assert calibrated.flops_per_second > 0 and calibrated.source.startswith("calibrated")
    assert calibrated.startup_seconds == STARTUP_SECONDS


def test_trial_seconds_grow_with_the_budget(base_dir: Path) -> None:
    trials = plan_sweep(spec_with(base_dir), throughput=FIXED)
    small = next(t for t in trials if t.experiment == "alloc" and t.budget == 1.5e8)
    large = next(t for t in trials if t.experiment == "alloc" and t.budget == 3e8 and t.rho == small.rho)
    assert large.est_seconds - FIXED.startup_seconds == pytest.approx(
        2 * (small.est_seconds - FIXED.startup_seconds), rel=0.25)


def test_calibration_restores_torch_threads() -> None:
    import torch

    before = torch.get_num_threads()
    assert matmul_flops_per_second(32, 64, threads=1) > 0
    assert torch.get_num_threads() == before


def test_table_has_a_row_per_trial_and_the_totals(base_dir: Path) -> None:
    spec = spec_with(base_dir)
    trials = plan_sweep(spec, throughput=FIXED)
    text = plan_table(spec, trials, {trials[0].trial_id}, FIXED)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["experiment", "memory", "rho", "rho_ach"]
    rows = lines[1:1 + len(trials)]
    assert [r.split()[-1] for r in rows] == ["yes"] + ["no"] * (len(trials) - 1)
    assert f"{len(trials)} grid trials: 1 stored, {len(trials) - 1} to run" in text
    assert "search: search, 3 Optuna trials" in text and "ETA:" in text
