"""The plan: grid expansion through the real solver, content-addressed trial ids, horizons, ETAs, the table."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest

from engram.accounting import FAIR_TOLERANCE, AllocationError
from engram.config import trial_id
from engram.data import corpus_fingerprint
from engram.memory_layout import memory_primes
from sweeps.plan import (STARTUP_SECONDS, TIMED_ETA_OVER_RUN, Throughput, allocation_table_warnings,
                         calibrate_throughput, matmul_flops_per_second, memory_law_notes, plan_search_trial,
                         plan_sweep, plan_table, step_flops_per_second, table_training_warnings, timing_models)
from analysis.diagnostics import PLANNED_LOOKUPS_PER_ROW
from sweeps.sizing import target_p_tot
from sweeps.spec import SpecError, parse_spec
from sweeps.tiny import tiny_sweep
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
        # The horizon is the tokens the budget buys the experiment's reference model (rho = 1 / no memory).
        assert t.config.train.tokens == t.tokens and t.config.train.flops is None and t.config.train.seed == t.seed
        step_flops = t.flops_per_token * t.config.train.batch_size * t.config.model.seq_len
        assert abs(t.tokens * t.flops_per_token - t.budget) <= step_flops / 2 + 0.06 * t.budget
        assert t.est_seconds > FIXED.startup_seconds
    fingerprint = corpus_fingerprint(spec.data)
    assert all(t.trial_id == trial_id(t.config, fingerprint) for t in trials)
    assert len({t.trial_id for t in trials}) == len(trials)


def test_allocation_trials_hold_p_tot_and_move_rho(base_dir: Path) -> None:
    spec = spec_with(base_dir)
    target = target_p_tot(spec.model, spec.experiments[0])
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
    assert max(p_act) / min(p_act) - 1 <= FAIR_TOLERANCE  # P_act held: the dense FFN pays for the memory
    assert len({t.tokens for t in alloc}) == 1  # every rho trains on the same tokens


def test_memory_trials_keep_the_backbone(base_dir: Path) -> None:
    mem = [t for t in plan_sweep(spec_with(base_dir), throughput=FIXED) if t.experiment == "mem"]
    assert {(t.memory, t.slots) for t in mem} == {(k, s) for k in ("engram", "overencoding")
                                                  for s in (200, 2000, 20000)}
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
    timed = calibrate_throughput(spec, runs.iloc[:0])
    assert timed.flops_per_second > 0 and timed.source.startswith("timed")
    assert "alloc" in timed.source and "mem" in timed.source and "search" in timed.source
    assert timed.startup_seconds == STARTUP_SECONDS


def test_timing_leaves_torch_threads_and_random_state_alone(base_dir: Path) -> None:
    import torch

    threads, state = torch.get_num_threads(), torch.random.get_rng_state()
    model = timing_models(spec_with(base_dir))["alloc"]
    assert step_flops_per_second(model, spec_with(base_dir).train, threads=1) > 0
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), state)


def test_each_experiment_is_timed_on_its_most_expert_heavy_model(base_dir: Path) -> None:
    spec = spec_with(base_dir)
    models = timing_models(spec)
    trials = plan_sweep(spec, throughput=FIXED)
    alloc = [t.config.model for t in trials if t.experiment == "alloc" and t.budget == 1.5e8]
    assert models["alloc"].n_routed == max(m.n_routed for m in alloc)
    assert models["alloc"] == next(t.config.model for t in trials if t.experiment == "alloc" and t.rho == 1.0)
    mem = [t for t in trials if t.experiment == "mem"]
    assert models["mem"] == next(t.config.model for t in mem if t.slots == 20000 and t.memory == "engram")
    assert models["search"] == models["alloc"]  # same target P_tot, rho = 1


def test_a_step_too_large_to_time_falls_back_to_the_matmul_calibration(base_dir: Path, monkeypatch) -> None:
    import sweeps.plan

    monkeypatch.setattr(sweeps.plan, "MAX_TIMED_STEP_FLOPS", 0.0)
    calibrated = calibrate_throughput(spec_with(base_dir))
    assert calibrated.flops_per_second > 0 and calibrated.source.startswith("calibrated")


def _on_gpu(raw: dict) -> None:
    raw["train"]["device"] = "cuda"
    raw["resources"] = {"gpus_per_trial": 1}


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_trials_given_no_gpu_are_timed_on_the_cpu(base_dir: Path, device: str) -> None:
    def change(raw: dict) -> None:
        raw["train"]["device"] = device
    assert calibrate_throughput(spec_with(base_dir, change)).source.startswith("timed: training steps")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_gpu_trials_planned_without_a_gpu_say_their_eta_is_a_cpus_time(base_dir: Path) -> None:
    calibrated = calibrate_throughput(spec_with(base_dir, _on_gpu))
    assert calibrated.source.startswith("calibrated") and "not theirs" in calibrated.source


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_gpu_trials_are_timed_on_the_gpu(base_dir: Path) -> None:
    import torch

    state = torch.cuda.get_rng_state()
    timed = calibrate_throughput(spec_with(base_dir, _on_gpu))
    assert timed.flops_per_second > 0 and timed.source.startswith(f"timed on {torch.cuda.get_device_name()}")
    assert torch.equal(torch.cuda.get_rng_state(), state)


@pytest.mark.parametrize("cpus, gpus, gpus_per_trial, max_concurrent, expected", [
    (16, 0, 0.0, None, 16),   # CPU trials: one per core
    (16, 2, 1.0, None, 2),    # one GPU each: as many as there are GPUs
    (16, 2, 0.5, None, 4),    # half a GPU each: two per GPU
    (16, 2, 0.5, 3, 3),       # and max_concurrent still caps
    (3, 2, 0.25, None, 3),    # the CPUs can bind first
    (16, 0, 1.0, None, 1),    # no GPU here: never below one (run refuses such a spec; the plan still prints)
])
def test_trials_at_once_count_gpus_as_the_launcher_does(base_dir: Path, monkeypatch, cpus, gpus, gpus_per_trial,
                                                        max_concurrent, expected) -> None:
    import torch

    from sweeps.plan import parallel_slots

    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)

    def change(raw: dict) -> None:
        raw["resources"] = {"cpus_per_trial": 1, "gpus_per_trial": gpus_per_trial,
                            "max_concurrent": max_concurrent}
    assert parallel_slots(spec_with(base_dir, change)) == expected


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
    assert "timed ETAs have read" not in text  # a fixed or measured throughput carries no timing drift


def test_a_timed_eta_prints_how_far_timed_etas_have_been_off(base_dir: Path) -> None:
    spec = spec_with(base_dir)
    timed = Throughput(1e9, 2.0, "timed: training steps at mem 1.0 GFLOP/s x 1.0 in a sweep")
    text = plan_table(spec, plan_sweep(spec, throughput=timed), set(), timed)
    low, high = TIMED_ETA_OVER_RUN
    assert low < 1 < high
    assert f"timed ETAs have read {low:.2f}-{high:.2f} of the measured run" in text.splitlines()[-1]


def test_memory_none_is_one_memory_free_point_on_the_same_tokens(base_dir: Path) -> None:
    spec = spec_with(base_dir, lambda s: s["experiments"][1].update(memory=["none", "engram", "overencoding"]))
    mem = [t for t in plan_sweep(spec, throughput=FIXED) if t.experiment == "mem"]
    none = [t for t in mem if t.memory == "none"]
    assert len(none) == 1 and none[0].slots == 0 and none[0].lookups_per_row is None
    assert len({t.tokens for t in mem}) == 1  # memory and memory-free models see the same tokens
    # Equal table parameters at equal slots: OverEncoding rows are d_model / ((N-1) K) wide, Engram's d_head.
    for slots in (2000, 20000):
        e, o = (next(t for t in mem if t.memory == k and t.slots == slots) for k in ("engram", "overencoding"))
        assert abs(o.counts.engram_tables / e.counts.engram_tables - 1) < 0.02


def test_plan_json_rows_and_lookups_per_row(base_dir: Path, capsys) -> None:
    import json

    from sweeps.cli import main

    (base_dir / "spec.yaml").write_text(__import__("yaml").safe_dump({**SPEC, "results_dir": str(base_dir / "r")}))
    assert main(["plan", str(base_dir / "spec.yaml"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    trials = plan_sweep(spec_with(base_dir), throughput=FIXED)
    assert [r["trial_id"] for r in rows] == [t.trial_id for t in trials]
    for key in ("experiment", "memory", "rho", "slots", "seed", "P_tot", "P_act", "P_sparse", "tokens", "FLOPs",
                "lookups_per_row"):
        assert all(key in r for r in rows)
    engram = next(r for r in rows if r["memory"] == "engram" and r["experiment"] == "mem" and r["slots"] == 2000)
    # tokens x tables read per token / rows: one Engram layer of (N-1) K tables
    n_tables = 2 * 2  # TINY_MODEL's memory shape: max_ngram 3, 2 heads (test_store)
    t = next(t for t in trials if t.trial_id == engram["trial_id"])
    assert engram["lookups_per_row"] == pytest.approx(
        t.tokens * n_tables / sum(memory_primes(t.config.model.memory)))


def test_plan_warns_when_slots_outrun_the_budget(base_dir: Path) -> None:
    from analysis.diagnostics import TRAINED_LOOKUPS_PER_ROW

    spec = spec_with(base_dir)
    trials = plan_sweep(spec, throughput=FIXED)
    text = plan_table(spec, trials, set(), FIXED)
    mem = [t for t in trials if t.experiment == "mem" and t.memory == "engram"]
    under = [t for t in mem if t.lookups_per_row < TRAINED_LOOKUPS_PER_ROW]
    assert under  # the tiny budget cannot train 20000 slots
    warning = next(line for line in text.splitlines() if line.startswith("warning: mem (engram)"))
    assert all(f"{t.slots:.3g}" in warning for t in under)
    assert "fairness (tolerance 0.5%)" in text


def test_plan_warns_with_a_margin_for_the_skew_of_reads(base_dir: Path) -> None:
    """The report flags a trial whose MEDIAN read row got < TRAINED_LOOKUPS_PER_ROW reads; the plan sees only the
    mean, and measured medians fall to ~0.53 of it: a slot point with a mean between the two bounds is warned."""
    from analysis.diagnostics import PLANNED_LOOKUPS_PER_ROW, TRAINED_LOOKUPS_PER_ROW

    assert PLANNED_LOOKUPS_PER_ROW == 2 * TRAINED_LOOKUPS_PER_ROW
    def longer(s):
        s["experiments"][1]["budget"] = 3e10
    reference = next(t for t in plan_sweep(spec_with(base_dir, longer), throughput=FIXED)
                     if t.experiment == "mem" and t.memory == "engram" and t.slots == 2000)
    # Slots that give ~190 mean reads per row at this budget: above the report's 128, below the plan's 256.
    slots = int(2000 * reference.lookups_per_row / 190)

    def only_these(s):
        longer(s)
        s["experiments"][1]["slots"] = [slots]
        s["experiments"][1]["memory"] = ["engram"]
    spec = spec_with(base_dir, only_these)
    trials = plan_sweep(spec, throughput=FIXED)
    (t,) = {t.slots: t for t in trials if t.experiment == "mem"}.values()
    assert TRAINED_LOOKUPS_PER_ROW < t.lookups_per_row < PLANNED_LOOKUPS_PER_ROW
    (warning,) = table_training_warnings(spec, trials)
    assert f"{t.slots:.3g} ({t.lookups_per_row:.3g}/row)" in warning and "fewer than 256 expected" in warning

    def fewer(s):
        only_these(s)
        s["experiments"][1]["slots"] = [slots // 2]
    spec = spec_with(base_dir, fewer)
    trials = plan_sweep(spec, throughput=FIXED)
    assert next(t for t in trials if t.experiment == "mem").lookups_per_row > PLANNED_LOOKUPS_PER_ROW
    assert table_training_warnings(spec, trials) == []


def test_plan_warns_where_an_allocations_tables_get_too_few_reads(base_dir: Path) -> None:
    """An allocation's slot counts follow from P_tot and rho: the plan names the rho points whose tables the budget
    cannot train, per budget, and says nothing once the budget reads every table enough."""
    def one_budget(budget):
        return lambda s: s["experiments"][0].update(budgets=[budget], seeds=[0])
    spec = spec_with(base_dir, one_budget(1.5e8))
    trials = plan_sweep(spec, throughput=FIXED)
    engram = [t for t in trials if t.experiment == "alloc" and t.lookups_per_row is not None]
    under = sorted(t.rho for t in engram if t.lookups_per_row < PLANNED_LOOKUPS_PER_ROW)
    assert under and [t for t in trials if t.experiment == "alloc" and t.rho == 1.0][0].lookups_per_row is None
    (warning,) = allocation_table_warnings(spec, trials)
    assert warning.startswith("warning: alloc @ 1.50e+08 FLOPs: the tables at rho ")
    assert f"rho {', '.join(f'{r:g}' for r in under)} get" in warning
    least = min(t.lookups_per_row for t in engram)
    assert f"{least:.3g}-" in warning and "fewer than 256" in warning
    assert not any(w.startswith("warning: alloc") for w in table_training_warnings(spec, trials))  # memory's own

    # Expected reads grow with the tokens a budget buys: a budget past the bar for every rho < 1 gives no warning.
    spec = spec_with(base_dir, one_budget(1.5e8 * 1.2 * PLANNED_LOOKUPS_PER_ROW / least))
    trials = plan_sweep(spec, throughput=FIXED)
    assert min(t.lookups_per_row for t in trials if t.experiment == "alloc" and t.lookups_per_row) \
        > PLANNED_LOOKUPS_PER_ROW
    assert allocation_table_warnings(spec, trials) == []


def test_plan_notes_a_memory_grid_that_cannot_meet_the_laws_bar(base_dir: Path) -> None:
    """The report reads Engram's memory law against >= 3 slot counts over >= 1.5 decades: the plan says beforehand
    when a grid falls short of either, and nothing for a grid that meets both or for OverEncoding on its own."""
    assert memory_law_notes(spec_with(base_dir)) == []                 # 200 .. 20,000: 3 counts, 2 decades

    def grid(slots, memory=("engram",)):
        return lambda s: s["experiments"][1].update(slots=slots, memory=list(memory))
    (note,) = memory_law_notes(spec_with(base_dir, grid([200, 6000])))
    assert note.startswith("note: mem: 2 slot count(s), under the 3 a line needs; 1.477 decades of slots, under 1.5:")
    (note,) = memory_law_notes(spec_with(base_dir, grid([400, 2000, 12_600])))   # 1.498 decades: short, said so
    assert "1.498 decades of slots, under 1.5" in note and "slot count(s)" not in note
    assert memory_law_notes(spec_with(base_dir, grid([400, 2000, 12_650]))) == []
    assert memory_law_notes(spec_with(base_dir, grid([200, 6000], memory=("overencoding", "none")))) == []
    spec = spec_with(base_dir, grid([200, 6000]))
    assert "\nnote: mem: 2 slot count(s)" in plan_table(spec, plan_sweep(spec, throughput=FIXED), set(), FIXED)


def test_a_p_tot_that_whole_experts_cannot_meet_is_refused(base_dir: Path) -> None:
    spec = spec_with(base_dir)
    p_tot = target_p_tot(spec.model, spec.experiments[0])
    expert = 3 * TINY_MODEL["d_model"] * TINY_MODEL["d_expert"] * (TINY_MODEL["n_layers"] - 1)

    def literal(s):
        s["experiments"][0].pop("p_tot_ratio")
        s["experiments"][0]["p_tot"] = p_tot + 0.45 * expert
    with pytest.raises(SpecError, match=r"experiments\[0\]\.p_tot: .*nearest realisable P_tot"):
        spec_with(base_dir, literal)


def test_search_rho_outside_the_fairness_tolerance_is_refused_when_suggested(tmp_path: Path) -> None:
    # The Ray tests' tiny backbone at d_model 16 and P_tot / P_act = 1.2: rho = 0 misses P_tot by ~0.7% (prime
    # table sizes on a model this small); the spec is accepted (rho = 1 holds), that suggestion is not.
    raw = {"name": "s", **tiny_sweep(model={"d_model": 16}), "experiments": [
        {"name": "search", "kind": "search", "p_tot_ratio": 1.2, "budget": 2.0e9, "n_trials": 2, "seed": 0}]}
    spec = parse_spec(raw, tmp_path)
    throughput = Throughput(1e9, 0.5, "fixed")
    assert plan_search_trial(spec, "search", 1.0, 0, throughput=throughput, fingerprint="f").rho == 1.0
    with pytest.raises(AllocationError, match="misses the target"):
        plan_search_trial(spec, "search", 0.0, 0, throughput=throughput, fingerprint="f")
