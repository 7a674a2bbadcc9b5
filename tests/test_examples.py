"""The shipped specs: every `examples/*.yaml` and `sweep.yaml` passes `engram-sweep plan` and says what its header
claims; a tiny run of the default spec's shape goes end to end through the report.

The plan checks go through the CLI (exit status, printed warnings) and through the functions it uses
(`load_spec`, `plan_sweep`, `table_training_warnings`, `trial_footprint`) for what the text does not show.
The end-to-end test keeps sweep.yaml's experiments as they are (names, kinds, rho grid, memory kinds, seeds, the
slot grid's shape) and shrinks only the backbone, the budgets and the slot scale, so that it follows the default
wherever the default goes.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import yaml

from analysis.fits import N_RESAMPLES
from analysis.report import MIN_COMPUTE_BUDGETS, write_report
from sweeps.cli import main
from sweeps.footprint import FIT_MARGIN, trial_footprint
from sweeps.launcher import launch
from sweeps.plan import Throughput, plan_sweep, table_training_warnings
from sweeps.spec import AllocationExperiment, MemoryExperiment, load_spec, parse_spec
from sweeps.store import ResultStore
from sweeps.tiny import tiny_sweep

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
SPECS = [ROOT / "sweep.yaml", *EXAMPLES]
# A fixed throughput: these checks need trial ids, counts and tokens, not a calibrated ETA.
FIXED = Throughput(1e11, 5.0, "fixed (tests)")
# Every spec with a memory experiment says here whether its header claims all its slot points train (>= the
# trained-regime threshold of reads per row, `plan`'s warning). A new example with a memory experiment must be
# added, so that no claim goes unchecked.
# memory-scaling.yaml records a run whose 1e5-slot tables trained (measured median 146 reads) but whose mean reads
# fall under the plan's margin for skew (206 < 256): its header says so.
CLAIMS_TRAINED_SLOTS = {"sweep.yaml": True, "smoke.yaml": True, "paper-protocol-gpu.yaml": True,
                        "memory-scaling.yaml": False, "memory-untied.yaml": True,
                        "data-rich.yaml": True, "memory-law.yaml": True}
TRAINED_WARNING = "outside the trained regime"
# The GPU the paper-protocol example is sized for (its comments): one trial's peak must fit it with run's margin.
GPU_BYTES = 80e9


def test_examples_are_there() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"smoke.yaml", "multi-budget.yaml", "search.yaml", "paper-protocol-gpu.yaml",
            "knowledge-mix.yaml"} <= names
    assert not (ROOT / "examples" / "default.yaml").exists()  # the default is ../sweep.yaml, never a copy
    assert "../sweep.yaml" in (ROOT / "examples" / "README.md").read_text()


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_spec_passes_plan_and_keeps_its_trained_slots_claim(path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(f"sweep {load_spec(path).name}:")
    spec = load_spec(path)
    trials = plan_sweep(spec, throughput=FIXED)
    assert trials
    has_memory = any(isinstance(e, MemoryExperiment) for e in spec.experiments)
    if has_memory:
        assert path.name in CLAIMS_TRAINED_SLOTS, f"{path.name}: say whether its slots claim the trained regime"
    if CLAIMS_TRAINED_SLOTS.get(path.name):
        assert table_training_warnings(spec, trials) == []
        assert TRAINED_WARNING not in out


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_opens_with_its_question_time_and_command(path: Path) -> None:
    lines = path.read_text().splitlines()
    header = "\n".join(lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))])
    assert header, f"{path.name}: no comment block at the top"
    if path.name != "knowledge-mix.yaml":  # issue 12's example, kept as it was written
        for what in ("Question:", "What it runs:", "How long:", "How to run"):
            assert what in header, f"{path.name}: header lacks {what!r}"
    assert f"engram-sweep plan examples/{path.name}" in header


def test_smoke_runs_every_experiment_kind_once() -> None:
    spec = load_spec(ROOT / "examples" / "smoke.yaml")
    kinds = [e.kind for e in spec.experiments]
    assert sorted(set(kinds)) == ["allocation", "memory", "search"]
    memory_kinds = {m for e in spec.experiments if isinstance(e, MemoryExperiment) for m in e.memory}
    assert memory_kinds == {"none", "engram", "overencoding"}
    assert spec.train.device == "cpu"


def test_multi_budget_has_enough_budgets_for_the_compute_laws() -> None:
    spec = load_spec(ROOT / "examples" / "multi-budget.yaml")
    alloc = [e for e in spec.experiments if e.kind == "allocation"]
    assert alloc and all(len(set(e.budgets)) >= MIN_COMPUTE_BUDGETS for e in alloc)
    trials = plan_sweep(spec, throughput=FIXED)
    assert len({t.budget for t in trials}) >= MIN_COMPUTE_BUDGETS


def test_search_example_searches() -> None:
    spec = load_spec(ROOT / "examples" / "search.yaml")
    assert any(e.kind == "search" for e in spec.experiments)


def test_paper_protocol_example_has_the_papers_shape_and_fits_one_gpu() -> None:
    spec = load_spec(ROOT / "examples" / "paper-protocol-gpu.yaml")
    assert spec.train.device == "cuda" and spec.resources.gpus_per_trial == 1
    trials = plan_sweep(spec, throughput=FIXED)
    flops = [t.flops_per_token * t.tokens for t in trials]
    assert 1e19 * 0.99 <= min(flops) and max(flops) <= 1e20
    alloc = next(e for e in spec.experiments if e.kind == "allocation")
    assert 9 <= alloc.p_tot_ratio <= 11
    pure = [t for t in trials if t.experiment == alloc.name and t.rho == 1.0]
    assert pure and all(9 <= t.counts.p_tot / t.counts.p_act <= 11 for t in pure)
    assert min(alloc.rho) == 0.0 and max(alloc.rho) == 1.0 and {0.75, 0.8} <= set(alloc.rho)
    slots = [s for e in spec.experiments if isinstance(e, MemoryExperiment) and "engram" in e.memory
             for s in e.slots]
    assert min(slots) <= 2.6e5 and max(slots) >= 1e7
    for t in trials:
        assert trial_footprint(t.config, t.counts).total * FIT_MARGIN <= GPU_BYTES, t.trial_id


def test_docs_show_the_paper_protocol_plan() -> None:
    doc = (ROOT / "docs" / "examples.md").read_text()
    assert "engram-sweep plan examples/paper-protocol-gpu.yaml" in doc
    spec = load_spec(ROOT / "examples" / "paper-protocol-gpu.yaml")
    # The plan in the doc is the example's as it stands (the trial count plan prints), not an older one's.
    assert f"\n{len(plan_sweep(spec, throughput=FIXED))} grid trials: " in doc
    for name in (p.name for p in EXAMPLES):
        assert name in doc, f"docs/examples.md does not describe {name}"


# ---------------------------------------------------------------------------------------------------------------
# The default spec's shape, end to end


TINY = tiny_sweep()
TINY_BUDGET = 3.0e9  # ~45 optimiser steps of the tiny backbone


def tiny_default(results_dir: Path) -> tuple[dict, dict]:
    """sweep.yaml with its experiments kept (budgets shrunk) on the tests' tiny backbone; slots scaled by one
    factor so the smallest point is the tiny shape's table floor (16 rows per table): the grid keeps its
    decades. Returns (raw spec, the default's raw experiments)."""
    default = yaml.safe_load((ROOT / "sweep.yaml").read_text())
    experiments = copy.deepcopy(default["experiments"])
    memory = TINY["model"]["memory"]
    floor = 16 * (memory["max_ngram"] - 1) * memory["n_heads"]
    all_slots = [float(s) for e in experiments if e["kind"] == "memory" for s in e["slots"]]
    scale = floor / min(all_slots) if all_slots else 1.0
    for e in experiments:
        if "budgets" in e:
            e["budgets"] = [TINY_BUDGET * (i + 1) for i in range(len(e["budgets"]))]
        if "budget" in e:
            e["budget"] = TINY_BUDGET
        if e["kind"] == "memory":
            e["slots"] = [max(floor, round(float(s) * scale)) for s in e["slots"]]
        if e["kind"] == "search":
            e["n_trials"] = min(int(e["n_trials"]), 2)
    raw = {"name": "tiny-default", "results_dir": str(results_dir), **TINY, "experiments": experiments}
    return raw, default["experiments"]


def test_tiny_default_keeps_the_default_shape(tmp_path: Path) -> None:
    raw, original = tiny_default(tmp_path)
    assert [(e["name"], e["kind"]) for e in raw["experiments"]] == [(e["name"], e["kind"]) for e in original]
    for tiny, default in zip(raw["experiments"], original):
        for key in ("rho", "seeds", "memory", "p_tot_ratio", "p_tot"):
            assert tiny.get(key) == default.get(key), key
        if default["kind"] == "memory":
            ratios = [float(s) / float(default["slots"][0]) for s in default["slots"]]
            tiny_ratios = [s / tiny["slots"][0] for s in tiny["slots"]]
            assert tiny_ratios == pytest.approx(ratios, rel=0.02)
    parse_spec(yaml.safe_load(yaml.safe_dump(raw)), base_dir=tmp_path)  # a valid spec


@pytest.mark.slow
def test_tiny_default_runs_end_to_end_through_the_report(ray_env, cache_dir: Path, tmp_path: Path) -> None:
    raw, _ = tiny_default(tmp_path)
    spec = parse_spec(yaml.safe_load(yaml.safe_dump(raw)), base_dir=tmp_path)
    trials = plan_sweep(spec)
    store = ResultStore(spec.store_dir)
    summary = launch(spec, trials, store, address=None, log_path=spec.store_dir / "ray.log", cache_dir=cache_dir,
                     stream=io.StringIO())
    assert (summary.n_failed, summary.n_unrecorded) == (0, 0)
    runs = store.runs()
    assert set(runs["status"]) <= {"ok", "diverged"}
    assert {t.trial_id for t in trials} <= set(runs["trial_id"])

    report = write_report(spec.store_dir, n_resamples=N_RESAMPLES // 5)
    out = report.parent
    fits = json.loads((out / "fits.json").read_text())
    text = report.read_text()
    plots = {p.name for p in (out / "plots").iterdir()}
    verdicts = {"interior", "boundary", "concave", "flat", "too noisy"}
    for e in spec.experiments:
        if e.kind in ("allocation", "search"):
            groups = [u for u in fits["u_curves"] if u["experiment"] == e.name]
            assert len(groups) == len(e.budgets if isinstance(e, AllocationExperiment) else (e.budget,)), e.name
            assert all(u[u["default"]]["verdict"] in verdicts for u in groups)
            assert f"**{e.name} @ " in text
            assert f"u_curves_{e.name}.png" in plots
        else:
            kinds = [m for m in e.memory if m != "none"]
            laws = [p for p in fits["power_laws"] if p["experiment"] == e.name]
            unfitted = [n for n in fits["not_fitted"] if n["what"].startswith(f"power law {e.name} /")]
            assert sorted(p["memory"] for p in laws) == sorted(kinds) or (laws == [] and unfitted), e.name
            assert all(p["form_used"] for p in laws)  # the form the report states (power law or log-linear)
    if any(p["memory"] == "engram" for p in fits["power_laws"]):
        assert "memory.png" in plots
    if any(isinstance(e, MemoryExperiment) and "none" in e.memory for e in spec.experiments):
        assert "memory_comparison.png" in plots
    assert fits["n_trials"] == len(runs)
