"""Sweep specs: loading, defaults, path resolution, round trip, feasibility checks (more errors in test_cli.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from engram.accounting import param_counts, solve_allocation
from engram.config import TrialConfig
from sweeps.sizing import target_p_tot
from sweeps.spec import (AllocationExperiment, FailAttempts, MemoryExperiment, SearchExperiment, SpecError,
                         dump_spec, load_spec, load_trial_config, parse_spec)
from test_store import TINY_MODEL

SPEC = {
    "name": "tiny",
    "data": {"corpus": "corpus"},
    "model": TINY_MODEL,
    "train": {"batch_size": 4, "lr": 1e-3},
    "experiments": [
        {"name": "alloc", "kind": "allocation", "p_tot_ratio": 3, "rho": [0.0, 0.5, 1.0], "budgets": ["1.5e8"]},
        {"name": "mem", "kind": "memory", "slots": [200, "2e3"], "budget": 1.5e8, "seeds": [0, 1]},
        {"name": "search", "kind": "search", "p_tot": 6e4, "budget": 1.5e8, "n_trials": 3},
    ],
}


@pytest.fixture
def spec_path(tmp_path: Path) -> Path:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("text")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


def test_load_fills_defaults_and_resolves_paths_next_to_the_spec(spec_path: Path, monkeypatch) -> None:
    monkeypatch.chdir("/")  # paths are relative to the spec file, not the working directory
    spec = load_spec(spec_path)
    assert spec.data.corpus == str(spec_path.parent / "corpus")
    assert spec.results_dir == spec_path.parent / "results" and spec.store_dir == spec_path.parent / "results/tiny"
    alloc, mem, search = spec.experiments
    assert isinstance(alloc, AllocationExperiment) and alloc.budgets == (1.5e8,) and alloc.seeds == (0,)
    assert isinstance(mem, MemoryExperiment) and mem.slots == (200, 2000) and mem.memory == ("engram",)
    assert isinstance(search, SearchExperiment) and search.seed == 0 and target_p_tot(spec.model, search) == 6e4
    assert spec.resources.cpus_per_trial == 1 and spec.resources.max_retries == 2
    assert spec.testing.fail_attempts is None
    assert spec.model.memory.kind == "none" and spec.model.memory.n_heads == 2  # the shape, no kind


def test_trial_train_sets_horizon_and_seed_from_the_experiment(spec_path: Path) -> None:
    train = load_spec(spec_path).trial_train(2.5e8, seed=7)
    assert (train.steps, train.tokens, train.flops, train.seed) == (None, None, 2.5e8, 7)
    assert train.lr == 1e-3 and train.batch_size == 4


def test_p_tot_ratio_is_relative_to_the_pure_moe(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    p_tot = target_p_tot(spec.model, spec.experiments[0])
    moe = param_counts(solve_allocation(spec.model, p_tot, 1.0).config)
    assert moe.p_tot / moe.p_act == pytest.approx(3, rel=0.02)


def test_resolved_spec_round_trips(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    again = parse_spec(yaml.safe_load(dump_spec(spec)), base_dir=Path("/elsewhere"))
    assert again == spec


def test_fail_attempts_matches_experiment_or_id_prefix() -> None:
    fail = FailAttempts(match="alloc", times=2)
    assert fail.applies("alloc", "abc", 1) and fail.applies("alloc", "abc", 2)
    assert not fail.applies("alloc", "abc", 3) and not fail.applies("allocation", "abc", 1)
    assert FailAttempts(match="ab").applies("mem", "abc", 1)


def _error(spec_path: Path, change) -> str:
    raw = copy.deepcopy(SPEC)
    change(raw)
    with pytest.raises(SpecError) as err:
        parse_spec(raw, spec_path.parent)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_memory_shape_errors_name_the_model_field(spec_path: Path) -> None:
    msg = _error(spec_path, lambda s: s["model"]["memory"].update(layers=[5]))
    assert msg.startswith("model.memory.layers: expected indices below n_layers=2")
    msg = _error(spec_path, lambda s: s["model"]["memory"].update(max_ngram=1))
    assert msg.startswith("model.memory.max_ngram: expected an integer >= 2")


def test_search_target_and_budget_are_checked(spec_path: Path) -> None:
    msg = _error(spec_path, lambda s: s["experiments"][2].update(p_tot=1.5e4))
    assert msg.startswith("experiments[2].p_tot: P_tot target 1.5e+04 is below P_act")
    msg = _error(spec_path, lambda s: s["experiments"][2].update(budget=1e7))
    assert msg.startswith("experiments[2].budget: expected at least")


def test_missing_file_and_directory_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"nope.yaml: no such file"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match=r"cannot read"):
        load_spec(tmp_path)


def test_trial_config_file_resolves_corpus_and_names_fields(spec_path: Path) -> None:
    path = spec_path.parent / "trial.yaml"
    path.write_text(yaml.safe_dump({"data": {"corpus": "corpus"}, "train": {"steps": 3}}))
    config = load_trial_config(path)
    assert isinstance(config, TrialConfig) and config.data.corpus == str(spec_path.parent / "corpus")
    path.write_text(yaml.safe_dump({"train": {"steps": 3, "warmup": 1}}))
    with pytest.raises(SpecError, match=r"^train.warmup: unknown key"):
        load_trial_config(path)


def test_balance_knobs_reach_every_allocation_model(spec_path: Path) -> None:
    from sweeps.plan import allocation_model

    raw = copy.deepcopy(SPEC)
    raw["model"] = {**raw["model"], "balance_aux": 0.01, "balance_moments": 10}
    spec_path.write_text(yaml.safe_dump(raw))
    spec = load_spec(spec_path)
    alloc = spec.experiments[0]
    assert spec.model.balance_aux == 0.01
    models = [allocation_model(spec, target_p_tot(spec.model, alloc), rho) for rho in alloc.rho]
    assert {(m.balance_aux, m.balance_moments) for m in models} == {(0.01, 10.0)}
    for name in ("balance_aux", "balance_moments"):
        bad = copy.deepcopy(raw)
        bad["model"][name] = -1
        spec_path.write_text(yaml.safe_dump(bad))
        with pytest.raises(SpecError, match=rf"^model\.{name}: expected a positive number"):
            load_spec(spec_path)
