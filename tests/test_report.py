"""analysis.report: a results store in, report.md + self-contained report.html + fits.json + PNG/SVG plots out,
stating verdicts, fitted laws with intervals and the excluded trials with their reasons."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.report import analyse, split_usable, write_report
from analysis.synthetic import PLANTED, write_synthetic_store
from sweeps.store import ResultStore


@pytest.fixture(scope="module")
def synthetic_report(tmp_path_factory):
    root = write_synthetic_store(tmp_path_factory.mktemp("results") / "synthetic")
    return root, write_report(root, n_resamples=200)


@pytest.mark.slow
def test_report_files_exist_and_html_is_self_contained(synthetic_report):
    root, md_path = synthetic_report
    out = root / "report"
    assert md_path == out / "report.md"
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5
    assert 'src="plots/' not in html                    # nothing to fetch beside the file
    pngs = sorted(p.stem for p in (out / "plots").glob("*.png"))
    assert pngs == sorted(p.stem for p in (out / "plots").glob("*.svg"))
    assert {"u_curves_alloc", "trend_alloc", "memory", "compute_alloc", "curves_alloc"} <= set(pngs)


@pytest.mark.slow
def test_fits_json_holds_every_fit_with_intervals(synthetic_report):
    root, _ = synthetic_report
    doc = json.loads((root / "report" / "fits.json").read_text())   # strict JSON: no NaN
    alloc = [u for u in doc["u_curves"] if u["experiment"] == "alloc"]
    assert len(alloc) == 4 and all(u["default"] == "cubic" for u in alloc)
    covered = [u["cubic"]["argmin"]["lo"] <= PLANTED["rho_star"] <= u["cubic"]["argmin"]["hi"] for u in alloc]
    assert sum(covered) >= 3
    # planted rho* = 0.75 with 0.004 nats of noise: never a wrong claim, an interior optimum at most budgets
    verdicts = [u["cubic"]["verdict"] for u in alloc]
    assert set(verdicts) <= {"interior", "too noisy"} and "interior" in verdicts, verdicts
    for u in alloc:     # an unresolved group says what would resolve it
        assert u["cubic"]["detectable_gain"] > 0 and u["cubic"]["seeds_for_reference_gain"] >= 1
    assert all(u["cubic"]["seed_offsets"] and "cubic, no seed offsets" in u for u in alloc)
    search = [u for u in doc["u_curves"] if u["experiment"] == "search"][0]
    assert search["cubic"]["n_seeds"] == 1 and search["cubic"]["bootstrap"]["scheme"] == "points"
    assert search["cubic"]["gain_vs_rho_1"] is None      # rho = 1 not sampled by the search
    assert "cubic, no seed offsets" not in search           # one seed: no offsets to compare
    kinds = {(p["experiment"], p["memory"]) for p in doc["power_laws"]}
    assert kinds == {(e, m) for e in ("memory", "memory-large") for m in ("engram", "overencoding")}
    engram = [p for p in doc["power_laws"] if p["experiment"] == "memory" and p["memory"] == "engram"][0]
    assert engram["alpha"]["lo"] <= PLANTED["memory"]["engram"][2] <= engram["alpha"]["hi"]
    assert engram["loglinear"]["b"]["value"] > 0
    assert 0 < engram["loglinear"]["noise_r2"] <= 1  # replicated slot points: the R^2 seed noise leaves
    assert engram["extrapolation"]["power_law"]["lo"] <= engram["extrapolation"]["power_law"]["value"]
    assert doc["budget_trends"][0]["experiment"] == "alloc"
    assert doc["not_fitted"] == []


@pytest.mark.slow
def test_excluded_trials_are_listed_with_reasons(synthetic_report):
    root, md_path = synthetic_report
    runs = pd.read_parquet(root / "runs")
    bad = runs[(runs["status"] != "ok") | ~np.isfinite(runs["final_val_loss"].astype(float))]
    doc = json.loads((root / "report" / "fits.json").read_text())
    assert {e["trial_id"] for e in doc["excluded"]} == set(bad["trial_id"])
    reasons = {e["reason"] for e in doc["excluded"]}
    assert "diverged: non-finite loss at step 37" in reasons
    assert "status ok but final_val_loss is not finite" in reasons
    md = md_path.read_text()
    assert "## Excluded trials" in md and all(t in md for t in bad["trial_id"])
    assert doc["n_usable"] + len(doc["excluded"]) == len(runs) == 200


def _row(trial_id, experiment, rho, seed, loss, *, kind="allocation", status="ok", error=None, slots=0,
         memory="engram", budget=1e14):
    return {"trial_id": trial_id, "sweep": "tiny", "experiment": experiment, "kind": kind, "memory": memory,
            "rho": rho, "rho_achieved": rho, "slots": slots, "n_routed": 4, "top_k": 2, "seed": seed,
            "budget": budget, "P_tot": 4000, "P_act": 1000, "P_sparse": 3000, "P_engram": slots, "flops_per_token": 6e3,
            "tokens": int(budget / 6e3), "compute": budget, "steps": 10, "final_val_loss": loss,
            "best_val_loss": loss, "train_loss": loss, "status": status, "error": error, "attempts": 1,
            "wall_seconds": 1.0, "tokens_per_second": 1.0, "device": "cpu", "host": "h", "versions": "{}",
            "git_commit": None, "started_at": "2026-11-29T00:00:00Z", "finished_at": "2026-11-29T00:00:01Z"}


@pytest.mark.parametrize("corpus", ["stdlib", "mix"])
def test_data_line_shows_the_mix_fields_only_for_the_mix_corpus(tmp_path, corpus):
    store = ResultStore(tmp_path / "s")
    store.write_spec(yaml.safe_dump({"name": "s", "data": {"corpus": corpus, "split": "folders",
                                                          "knowledge_share": 0.5, "mix_entities": 2000,
                                                          "mix_seed": 0}}))
    curve = pd.DataFrame({"step": [0, 10], "tokens": [0, 1000], "train_loss": [5.0, 3.0],
                          "val_loss": [math.nan, 3.0], "lr": [1e-3, 1e-4], "elapsed": [0.0, 1.0]})
    store.write_trial(_row("one", "edge", 0.5, 0, 3.0), curve)
    md = write_report(tmp_path / "s", tmp_path / "out", n_resamples=10).read_text()
    (line,) = [ln for ln in md.splitlines() if ln.startswith("Data: ")]
    assert f"corpus = `{corpus}`" in line and "split = `folders`" in line
    assert ("knowledge_share" in line) == ("mix_entities" in line) == (corpus == "mix")


@pytest.mark.slow
def test_report_over_the_real_store_states_boundary_and_unfitted_groups(tmp_path):
    store = ResultStore(tmp_path / "tiny")
    curve = pd.DataFrame({"step": [0, 10], "tokens": [0, 1000], "train_loss": [5.0, 3.0],
                          "val_loss": [math.nan, 3.0], "lr": [1e-3, 1e-4], "elapsed": [0.0, 1.0]})
    for i, rho in enumerate([0.0, 0.25, 0.5, 0.75, 1.0]):        # best at rho = 1: no interior optimum
        store.write_trial(_row(f"edge{i}", "edge", rho, 0, 3.0 - 0.04 * rho), curve)
    for i, rho in enumerate([0.0, 1.0]):                           # two rho values: too few for a U-curve
        store.write_trial(_row(f"few{i}", "few", rho, 0, 3.0), curve)
    store.write_trial(_row("boom", "edge", 0.5, 1, None, status="failed", error="RuntimeError: boom"), None)
    for i, slots in enumerate([10_000, 100_000]):                 # two slot counts: log-linear form only
        store.write_trial(_row(f"oe{i}", "oe", float("nan"), 0, 3.0 - 0.01 * i, kind="memory",
                               memory="overencoding", slots=slots), curve)
    md = write_report(tmp_path / "tiny", tmp_path / "out", n_resamples=100).read_text()
    assert "log-linear only" in md and "the log-linear form alone was fitted" in md
    assert "boundary: the loss still falls toward the edge rho = 1" in md and "no rho* is claimed" in md
    assert "few" in md and "at least 4 distinct rho values" in md
    assert "failed: RuntimeError: boom" in md
    assert "single seed" in md
    doc = json.loads((tmp_path / "out" / "fits.json").read_text())
    edge_group = [u for u in doc["u_curves"] if u["experiment"] == "edge"][0]
    assert edge_group["default"] == "quadratic"      # 5 rho values of one seed: too few for the cubic's resamples
    assert "the parabola stands in" in md
    edge = edge_group["quadratic"]
    assert edge["verdict"] == "boundary" and edge["rho_star"] is None and edge["edge"] == pytest.approx(1.0)
    assert edge["argmin"]["value"] == pytest.approx(1.0)
    oe = doc["power_laws"][0]
    assert oe["memory"] == "overencoding" and oe["extrapolation"]["power_law"] is None
    assert oe["loglinear"]["b"]["value"] == pytest.approx(0.01 / np.log(10))


def test_split_usable_and_missing_store(tmp_path):
    runs = pd.DataFrame([_row("a", "x", 0.5, 0, 3.0), _row("b", "x", 0.5, 1, float("nan")),
                         _row("c", "x", 0.5, 2, 3.0, status="diverged", error="non-finite loss at step 3")])
    usable, excluded = split_usable(runs)
    assert list(usable["trial_id"]) == ["a"]
    assert dict(zip(excluded["trial_id"], excluded["reason"])) == {
        "b": "status ok but final_val_loss is not finite", "c": "diverged: non-finite loss at step 3"}
    assert analyse(runs, n_resamples=10).not_fitted        # one usable point: the U-curve is reported unfitted
    with pytest.raises(ValueError, match="no runs/ folder"):
        write_report(tmp_path / "nothing")


def test_chinchilla_form_is_fitted_when_the_sweep_varies_size_and_tokens():
    rows = []
    rng = np.random.default_rng(0)
    for i, (p_act, tokens) in enumerate((p, d) for p in np.geomspace(1e6, 3e7, 5) for d in np.geomspace(1e8, 3e9, 5)):
        loss = (1.8 + 400 * p_act ** -0.34 + 400 * tokens ** -0.28) * np.exp(rng.normal(0, 0.002))
        row = _row(f"n{i}", "scale", 1.0, 0, float(loss))
        row.update(P_act=int(p_act), tokens=int(tokens), compute=6.0 * p_act * tokens)
        rows.append(row)
    result = analyse(pd.DataFrame(rows), n_resamples=50)
    assert result.chinchilla is not None
    assert result.chinchilla.alpha.value == pytest.approx(0.34, abs=0.06)
    assert result.chinchilla.beta.value == pytest.approx(0.28, abs=0.06)


def test_unidentified_law_and_dropped_resamples_are_stated(tmp_path):
    """A memory group whose loss does not fall with slots gets no power-law numbers (log-linear used instead);
    a 4-point group drops resamples that keep fewer than 3 slot counts, and the report says how many and why."""
    store = ResultStore(tmp_path / "laws")
    rng = np.random.default_rng(3)
    for i, slots in enumerate(np.repeat([1e4, 3e4, 1e5, 3e5, 1e6, 3e6], 2)):
        store.write_trial(_row(f"flat{i}", "memflat", float("nan"), i % 2, 3.0 + rng.normal(0, 0.01),
                               kind="memory", slots=int(slots)), None)
    for i, slots in enumerate([1e4, 1e5, 1e6, 1e7]):
        store.write_trial(_row(f"four{i}", "memfour", float("nan"), 0, 2.5 + 4.0 * slots ** -0.3 + 1e-3 * (i % 2),
                               kind="memory", slots=int(slots)), None)
    md = write_report(tmp_path / "laws", tmp_path / "out", n_resamples=200).read_text()
    doc = json.loads((tmp_path / "out" / "fits.json").read_text())
    flat = [p for p in doc["power_laws"] if p["experiment"] == "memflat"][0]
    assert flat["identified"] is False and flat["form_used"] == "log-linear (power law not identified)"
    assert flat["alpha"]["value"] is None and flat["extrapolation"]["power_law"] is None
    assert "not identified (" in md and "log-linear (power law not identified)" in md
    # a flat law under seed noise: little R^2 to expect; single trials per slot count: nothing to say
    assert "log-linear R² from seed noise" in md and flat["loglinear"]["noise_r2"] < 0.5
    assert [p for p in doc["power_laws"] if p["experiment"] == "memfour"][0]["loglinear"]["noise_r2"] is None
    assert "## Dropped bootstrap resamples" in md
    four = [d for d in doc["dropped_resamples"] if "memfour" in d["fit"]][0]
    assert four["n_failed"] > 0.05 * four["n_resamples"] and four["warning"]
    assert "too few distinct x values" in md and "WARNING:" in md
    assert "Levels (E, L at 10x max slots) are absolute losses, and with 1/2 seeds their intervals are too narrow" \
        in md


def test_two_slot_counts_print_no_loglinear_r2(tmp_path):
    """Two slot counts fit a line through both means whatever the law: the report prints neither log-linear R²
    for them (fits.json keeps the numbers), while a three-count group still gets both."""
    store = ResultStore(tmp_path / "two")
    rng = np.random.default_rng(5)
    for seed in (0, 1, 2):
        for slots in (1e3, 1e5):
            store.write_trial(_row(f"two{seed}-{int(slots)}", "memtwo", float("nan"), seed,
                                   3.0 - 0.01 * np.log(slots) + rng.normal(0, 0.005), kind="memory",
                                   slots=int(slots)), None)
        for slots in (1e3, 1e4, 1e5):
            store.write_trial(_row(f"three{seed}-{int(slots)}", "memthree", float("nan"), seed,
                                   3.0 - 0.01 * np.log(slots) + rng.normal(0, 0.005), kind="memory",
                                   slots=int(slots)), None)
    md = write_report(tmp_path / "two", tmp_path / "out", n_resamples=100).read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| mem")}
    assert rows["memtwo"].count("- (2 slot counts)") == 2
    assert "slot counts)" not in rows["memthree"].replace("too few slot counts", "")
    doc = json.loads((tmp_path / "out" / "fits.json").read_text())
    two = [p for p in doc["power_laws"] if p["experiment"] == "memtwo"][0]
    assert 0.9 < two["loglinear"]["r2"] <= 1.0 and two["loglinear"]["noise_r2"] is not None


def test_u_curve_verdict_carries_the_fairness_of_its_trials():
    """Under an allocation verdict, the report names the rho points whose tables did not train and the trials
    whose experts trained on uneven loads; nothing when every table trained and every router balanced."""
    from analysis.report import _u_curve_fairness, untrained_rhos
    rows = pd.DataFrame([_row(f"t{i}", "alloc", rho, 0, 3.0) for i, rho in enumerate([0.0, 0.5, 0.75, 1.0])])
    rows["lookups_median"] = [40.0, 90.0, 300.0, np.nan]              # the pure MoE has no tables
    rows["expert_train_load_max"] = [1.1, 1.2, 1.1, 1.7]
    rows["expert_train_load_min"] = [0.9, 0.9, 0.9, 0.5]
    text = _u_curve_fairness(rows, "alloc", 1e14)
    assert text.startswith("Fairness: 2 of 3 trials with tables have them untrained (rho 0, 0.5; median read row "
                           "40-90, under 128)")
    assert "1 of 4 MoE trials trained their experts on uneven loads" in text
    assert _u_curve_fairness(rows, "alloc", 2e14) == ""               # another budget: no trials, nothing said
    assert untrained_rhos(rows, "alloc", 1e14) == [0.0, 0.5] and untrained_rhos(rows, "alloc", 2e14) == []
    rows["lookups_median"] = [400.0, 300.0, 200.0, np.nan]
    rows["expert_train_load_max"] = [1.1, 1.2, 1.1, 1.3]
    assert _u_curve_fairness(rows, "alloc", 1e14) == ""


def test_a_too_noisy_u_curve_says_what_holds_it_back():
    """When the sweep already detects a gain the size of the fitted one, the report must not ask for more seeds
    for the gain ("about 1 seeds"): it names the edge that holds the verdict back and which way that edge leans.
    Losses: the default sweep's D11 run (two seeds, the pure MoE far behind, rho = 0 the lowest point)."""
    from analysis.fits import fit_u_curve
    from analysis.report import _verdict_text
    rho, seed = np.repeat([0.0, 0.25, 0.5, 0.75, 1.0], 2), np.tile([0, 1], 5)
    loss = np.array([3.755, 3.786, 3.809, 3.854, 3.765, 3.800, 3.778, 3.811, 3.922, 3.965])
    fit = fit_u_curve(rho, loss, seed, n_resamples=300)
    assert fit.verdict == "too noisy" and fit.seeds_for_fitted_gain <= fit.n_seeds
    text = _verdict_text(fit)
    assert "would take about" not in text.split("No rho* is claimed")[1]
    assert "already above the smallest this sweep detects" in text
    assert "at the low edge (rho = 0) the loss falls toward the edge in" in text and "high edge (rho" not in text
    assert "benchmarks/u_curve_power.py" not in text      # no command given, none named
    command = "python benchmarks/u_curve_power.py results/d11 --experiment allocation --budget 2e+12"
    assert f"`{command}` estimates them from draws planted on this sweep's seed means" in _verdict_text(fit, command)
    noisy = 3.0 + 0.01 * (rho - 0.6) ** 2 + np.random.default_rng(3).normal(0, 0.02, 10)
    fit = fit_u_curve(rho, noisy, seed, n_resamples=300)     # a small fitted gain: seeds are what it lacks
    assert fit.verdict == "too noisy" and fit.seeds_for_fitted_gain > fit.n_seeds
    assert f"would take about {fit.seeds_for_fitted_gain} seeds." in _verdict_text(fit)
    assert "u_curve_power" not in _verdict_text(fit, "python benchmarks/u_curve_power.py x")  # the gain's count


def test_the_power_command_pastes_as_printed_for_any_store_path(tmp_path: Path):
    """The report prints this command for the reader to paste: a store path with a space or a quote must come back
    as one argument, and the command must name the experiment and budget as u_curve_power.py reads them."""
    import shlex
    from analysis.report import _power_command
    store = tmp_path / "my results" / "it's here"
    command = _power_command(store, "allocation", 9.6e12)
    assert shlex.split(command) == ["python", "benchmarks/u_curve_power.py", str(store), "--experiment", "allocation",
                                    "--budget", "9.6e+12"]
    assert _power_command("results/d11", "allocation", 2e12) == ("python benchmarks/u_curve_power.py results/d11 "
                                                                  "--experiment allocation --budget 2e+12")


def test_an_interior_rho_star_whose_interval_reaches_an_edge_says_so():
    """The verdict tests the two edge slopes one at a time, so an "interior" rho*'s interval can still reach an
    edge of the sampled range (planted symmetric U, rho* = 0.6, 5 rho x 2 seeds): the report must say that the
    minimum is not placed away from that edge, and must not say it of an interval clear of both edges."""
    from analysis.fits import fit_u_curve
    from analysis.report import _verdict_text
    from analysis.synthetic import planted_u_curve

    def fit(k):
        rho, loss, seed = planted_u_curve("symmetric", n_rho=5, n_seeds=2, noise=0.004, rng=np.random.default_rng(k))
        return fit_u_curve(rho, loss, seed, n_resamples=300)

    reaching, clear = fit(9), fit(1)
    assert reaching.verdict == clear.verdict == "interior"
    assert reaching.rho_star.hi == 1.0 and reaching.rho_star_edges == (1.0,)
    assert "its interval reaches the edge rho = 1: the curve turns, but its minimum is not placed" in \
        _verdict_text(reaching)
    assert reaching.to_dict()["rho_star_reaches_edges"] == [1.0]
    assert 0 < clear.rho_star.lo and clear.rho_star.hi < 1 and clear.rho_star_edges == ()
    assert "reaches the edge" not in _verdict_text(clear)


def test_a_boundary_whose_curve_dips_lower_inside_says_so():
    """The boundary rule reads the edge slopes only. D12's allocation (the default on an Intel machine, 2 seeds)
    rises from rho = 0 to 0.25 and falls again toward 0.5-0.75: "boundary at rho = 0", while the fitted cubic is
    lowest at 0.63. The report must say that the edge is not shown to be the minimum; a monotone boundary must
    not get that sentence."""
    from analysis.fits import fit_u_curve
    from analysis.report import _verdict_text
    rho, seed = np.repeat([0.0, 0.258102, 0.499923, 0.741941, 1.0], 2), np.tile([0, 1], 5)
    loss = np.array([3.773380, 3.784232, 3.819257, 3.841616, 3.763376, 3.811744, 3.774841, 3.810514, 3.937150,
                     4.002972])
    fit = fit_u_curve(rho, loss, seed)          # the report's 1,000 resamples: 96% at the low edge
    assert fit.verdict == "boundary" and fit.edge == 0.0 and 0 < fit.argmin.value < 1
    assert "But the fitted curve's lowest point is inside, at rho = 0.63" in _verdict_text(fit)
    assert "the curve dips twice" in _verdict_text(fit)
    falling = 3.8 + 0.1 * rho + np.random.default_rng(0).normal(0, 0.002, 10)
    monotone = fit_u_curve(rho, falling, seed, n_resamples=300)
    assert monotone.verdict == "boundary" and "dips twice" not in _verdict_text(monotone)


def test_level_intervals_from_few_seeds_are_flagged():
    """Intervals of absolute losses (loss at the minimum, E, an extrapolated loss) under-cover with few seeds (a
    seed's luck moves all its points alike): the report says so under the tables whose fits have under
    LEVEL_SEEDS seeds, and says nothing when every fit has enough."""
    from analysis.fits import fit_u_curve
    from analysis.report import LEVEL_SEEDS, _levels_note
    rng = np.random.default_rng(0)
    rho = np.repeat([0.0, 0.25, 0.5, 0.75, 1.0], LEVEL_SEEDS)
    loss = 3.0 + 0.05 * (rho - 0.6) ** 2 + rng.normal(0, 0.01, len(rho))
    many = fit_u_curve(rho, loss, np.tile(np.arange(LEVEL_SEEDS), 5), n_resamples=100)
    few = fit_u_curve(rho, loss, np.tile(np.arange(LEVEL_SEEDS), 5) % 2, n_resamples=100)
    assert _levels_note([many], "the loss at the minimum") == ""
    note = _levels_note([many, few], "the loss at the minimum")
    assert note.startswith("Levels (the loss at the minimum) are absolute losses, and with 2 seeds their intervals "
                           "are too narrow")
    assert "differences within this sweep (rho*, the gain, slopes) are not affected" in note


def test_a_memory_law_is_read_against_the_bar_part_by_part():
    """Under the power-law table the report says, per memory law, the slope's sign as its interval resolves it,
    R² and the decades of slots, the untrained points, and which parts of the bar (slope above 0, R² >= 0.9,
    >= 1.5 decades, every point trained) hold; nothing for a law with only two slot counts."""
    from analysis.report import _law_reading
    rng = np.random.default_rng(0)
    slots = [1_000, 5_000, 20_000, 100_000]                                           # 2 decades
    rows = [_row(f"m{s}-{seed}", "mem", math.nan, seed, 3.0 - 0.02 * math.log(s) + rng.normal(0, 0.002),
                 kind="memory", slots=s) for s in slots for seed in (0, 1)]
    runs = pd.DataFrame(rows)
    runs["lookups_median"] = 500.0
    result = analyse(runs, n_resamples=200)
    key = next(k for k in result.power_laws if k[:2] == ("mem", "engram"))
    text = _law_reading(result.power_laws[key], result.usable, *key)
    assert text.startswith("loss falls with slots, b = 0.019") and "over 2.00 decades (4 slot counts, 8 trials)" in text
    assert text.endswith("Log-linear in slots by the bar (slope above 0, R² >= 0.9, >= 1.5 decades, every point "
                         "trained).")
    runs["lookups_median"] = [40.0, 40.0] + [500.0] * 6                               # the smallest point untrained
    runs["final_val_loss"] = 3.0 + rng.normal(0, 0.01, len(runs))                     # and no slot effect
    result = analyse(runs, n_resamples=200)
    text = _law_reading(result.power_laws[key], result.usable, *key)
    assert "no slot effect resolved" in text and "2 of 8 trials with untrained tables" in text
    assert "Not log-linear by the bar: the slope's interval is not above 0; R² " in text
    assert text.endswith("; some slot points untrained.") and "decades <" not in text
    two = analyse(runs[runs["slots"] <= 5_000], n_resamples=50)
    assert _law_reading(two.power_laws[key], two.usable, *key) == ""
