"""A synthetic results store in the contract's layout (runs/, curves/, spec.yaml under results/<sweep>/), with
planted laws, for the analysis tests and benchmarks/bench_report.py. No training happens here.

Planted truth (see `PLANTED`): allocation loss L(rho, C) = E + K * C^-a + curv * (rho - rho*)^2, with
rho* = 0.75 at every budget; memory loss L(slots) = E_m + A_m * slots^-alpha_m per memory kind. Gaussian noise
per trial plus a per-seed offset. A few trials are failed, diverged, or have a NaN loss, as a real sweep has.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from analysis.contract import CURVES_DIR, RUN_SCHEMA, RUNS_DIR, SPEC_FILE

PLANTED = MappingProxyType({
    "rho_star": 0.75, "curvature": 0.08, "E": 2.0, "K": 3.0e3, "a": 0.25,
    "memory": MappingProxyType({"engram": (2.6, 4.0, 0.35), "overencoding": (2.62, 3.0, 0.3)}),   # E_m, A_m, alpha_m
    "noise": 0.004, "seed_offset": 0.003,
})
RHO_GRID = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
ALLOC_BUDGETS = (1e14, 3e14, 1e15, 3e15)
SLOT_GRID = (1e4, 3e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7)
MEMORY_BUDGETS = (1e14, 1e15)
SEEDS = (0, 1, 2)
N_SEARCH = 24
N_CURVE_POINTS = 20
FLOPS_PER_TOKEN = 6.0e6


def write_synthetic_store(root: Path, *, sweep: str = "synthetic", rng_seed: int = 0) -> Path:
    """Write a 200-trial store under `root` (created) and return it. Same rng_seed, same store."""
    root = Path(root)
    rng = np.random.default_rng(rng_seed)
    rows = []
    seed_offset = {s: rng.normal(0, PLANTED["seed_offset"]) for s in SEEDS}

    def alloc_loss(rho: float, budget: float, seed: int) -> float:
        p = PLANTED
        return (p["E"] + p["K"] * budget ** -p["a"] + p["curvature"] * (rho - p["rho_star"]) ** 2
                + seed_offset[seed] + rng.normal(0, p["noise"]))

    for budget in ALLOC_BUDGETS:
        for rho in RHO_GRID:
            for seed in SEEDS:
                rows.append(_row(sweep, "alloc", "allocation", "engram" if rho < 1 else "none", rho, seed, budget,
                                 alloc_loss(rho, budget, seed), rng))
    for kind, (e_m, a_m, alpha_m) in PLANTED["memory"].items():
        for budget in MEMORY_BUDGETS:
            for slots in SLOT_GRID:
                for seed in SEEDS:
                    loss = (e_m + a_m * slots ** -alpha_m + 0.5 * (PLANTED["K"] * budget ** -PLANTED["a"])
                            + seed_offset[seed] + rng.normal(0, PLANTED["noise"]))
                    experiment = "memory" if budget == MEMORY_BUDGETS[0] else "memory-large"
                    rows.append(_row(sweep, experiment, "memory", kind, math.nan, seed, budget, loss, rng,
                                     slots=int(slots)))
    for rho in rng.uniform(0, 1, N_SEARCH):
        rows.append(_row(sweep, "search", "search", "engram", float(rho), 0, 3e14, alloc_loss(rho, 3e14, 0), rng))
    _spoil(rows, rng)
    _write(root, rows, rng, sweep)
    return root


def _row(sweep, experiment, kind, memory, rho, seed, budget, loss, rng, *, slots: int | None = None) -> dict:
    tokens = int(budget / FLOPS_PER_TOKEN)
    rho_achieved = rho if not math.isfinite(rho) or rho in (0.0, 1.0) else rho + rng.normal(0, 0.004)
    trial_id = f"{experiment}-{rng.integers(1 << 62):016x}"
    if slots is None:
        slots = 0 if rho >= 1 else int(2e6 * (1 - rho))
    return {
        "trial_id": trial_id, "sweep": sweep, "experiment": experiment, "kind": kind, "memory": memory,
        "rho": rho, "rho_achieved": rho_achieved, "slots": slots, "n_routed": 2 + int(round(14 * rho)) if
        math.isfinite(rho) else 16, "top_k": 2, "seed": seed, "budget": budget, "P_tot": 4_000_000,
        "P_act": 1_000_000, "P_sparse": 3_000_000, "P_engram": slots * 16, "flops_per_token": FLOPS_PER_TOKEN,
        "tokens": tokens, "compute": FLOPS_PER_TOKEN * tokens, "steps": max(1, tokens // 2048),
        "final_val_loss": float(loss), "best_val_loss": float(loss) - 0.001, "train_loss": float(loss) - 0.02,
        "status": "ok", "error": None, "attempts": 1, "wall_seconds": 60.0, "tokens_per_second": tokens / 60.0,
        "device": "cpu", "host": "synthetic", "versions": json.dumps({"python": "synthetic"}),
        "git_commit": None, "started_at": "2026-11-29T00:00:00Z", "finished_at": "2026-11-29T00:01:00Z",
    }


def _spoil(rows: list[dict], rng: np.random.Generator) -> None:
    """Make the store realistic: three failed, three diverged, one non-finite loss, and one extra failed
    trial of each of the two alloc budget extremes (so 200 rows in all)."""
    picks = rng.choice(len(rows), size=7, replace=False)
    for i in picks[:3]:
        rows[i].update(status="failed", error="RuntimeError: CUDA out of memory (synthetic)", final_val_loss=None,
                       best_val_loss=None, train_loss=None, compute=None, attempts=3)
    for i in picks[3:6]:
        rows[i].update(status="diverged", error="non-finite loss at step 37", final_val_loss=math.inf,
                       best_val_loss=None)
    rows[picks[6]].update(final_val_loss=math.nan)
    while len(rows) < 200:
        extra = dict(rows[len(rows) % 72])
        extra.update(trial_id=f"extra-{len(rows)}-{rng.integers(1 << 62):016x}", status="failed",
                     error="ValueError: synthetic failure", final_val_loss=None, seed=7)
        rows.append(extra)


def _run_schema(row: dict) -> pa.Schema:
    """The store contract's types for the columns this synthetic row has (a row may leave columns out)."""
    return pa.schema([RUN_SCHEMA.field(k) for k in row])


def _write(root: Path, rows: list[dict], rng: np.random.Generator, sweep: str) -> None:
    (root / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    (root / CURVES_DIR).mkdir(parents=True, exist_ok=True)
    for row in rows:
        pq.write_table(pa.Table.from_pylist([row], schema=_run_schema(row)),
                       root / RUNS_DIR / f"{row['trial_id']}.parquet")
        if row["status"] == "failed":
            continue
        final = row["final_val_loss"] if row["final_val_loss"] is not None else math.nan
        steps = np.linspace(0, row["steps"], N_CURVE_POINTS).astype(int)
        frac = np.maximum(steps / max(row["steps"], 1), 1e-3)
        val = (final if math.isfinite(final) else 3.0) + 2.5 * (1 - frac) ** 2
        pd.DataFrame({
            "trial_id": row["trial_id"], "step": steps, "tokens": steps * 2048,
            "train_loss": val + 0.02 + rng.normal(0, 0.01, N_CURVE_POINTS), "val_loss": val,
            "lr": 3e-3 * np.cos(0.5 * np.pi * frac), "elapsed": 60.0 * frac,
        }).to_parquet(root / CURVES_DIR / f"{row['trial_id']}.parquet", index=False)
    spec = {"name": sweep, "results_dir": str(root.parent),
            "data": {"corpus": "stdlib", "format": "auto", "val_fraction": 0.05},
            "experiments": [
                {"name": "alloc", "kind": "allocation", "p_tot_ratio": 4, "rho": list(RHO_GRID),
                 "budgets": list(ALLOC_BUDGETS), "seeds": list(SEEDS)},
                {"name": "memory", "kind": "memory", "memory": list(PLANTED["memory"]), "slots": list(SLOT_GRID),
                 "budget": MEMORY_BUDGETS[0], "seeds": list(SEEDS)},
                {"name": "memory-large", "kind": "memory", "memory": list(PLANTED["memory"]),
                 "slots": list(SLOT_GRID), "budget": MEMORY_BUDGETS[1], "seeds": list(SEEDS)},
                {"name": "search", "kind": "search", "p_tot_ratio": 4, "budget": 3e14, "n_trials": N_SEARCH,
                 "seed": 0}]}
    (root / SPEC_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))


# ---------------------------------------------------------------------------------------------------------------
# Planted U-curves: the family of truths of the U-curve calibration study (docs/analysis.md)

U_CURVATURE = 0.08          # nats per rho^2: 0.02 nats between rho* = 0.5 and either edge
U_SEED_OFFSET_SD = 0.003    # per-seed additive offset (data order shared across rho)


def _lopsided(rho_star: float, left: float, right: float):
    return lambda rho: np.where(rho < rho_star, left, right) * U_CURVATURE * (rho - rho_star) ** 2


# name -> (loss over rho minus its minimum, true argmin on [0, 1], whether that argmin is interior)
U_TRUTHS = MappingProxyType({
    "symmetric": (lambda rho: U_CURVATURE * (rho - 0.6) ** 2, 0.6, True),
    "lopsided, left 2x steeper": (_lopsided(0.5, 2.0, 1.0), 0.5, True),
    "lopsided, right 2x steeper": (_lopsided(0.5, 1.0, 2.0), 0.5, True),
    "optimum near rho = 0 (0.15)": (lambda rho: U_CURVATURE * (rho - 0.15) ** 2, 0.15, True),
    "optimum near rho = 1 (0.85)": (lambda rho: U_CURVATURE * (rho - 0.85) ** 2, 0.85, True),
    "flat at rho = 1 (no interior optimum)": (lambda rho: U_CURVATURE * (1 - rho) ** 2, 1.0, False),
    "linear, best at rho = 1": (lambda rho: 0.5 * U_CURVATURE * (1 - rho), 1.0, False),
})
# (noise sd, rho points on [0, 1], seeds): the ranges, each crossed with every truth
U_CASES = tuple((noise, n_rho, n_seeds) for noise in (0.004, 0.016) for n_rho in (5, 9) for n_seeds in (2, 3))


def planted_u_curve(truth: str, *, n_rho: int, n_seeds: int, noise: float, rng: np.random.Generator,
                    seed_offset_sd: float = U_SEED_OFFSET_SD, base: float = 3.0):
    """(rho, loss, seed) of one draw: every seed at every rho of an even grid on [0, 1]."""
    shape, _, _ = U_TRUTHS[truth]
    rho = np.repeat(np.linspace(0.0, 1.0, n_rho), n_seeds)
    seed = np.tile(np.arange(n_seeds), n_rho)
    offsets = rng.normal(0.0, seed_offset_sd, n_seeds)
    return rho, base + shape(rho) + offsets[seed] + rng.normal(0.0, noise, len(rho)), seed


def u_curve_calibration(*, truths=tuple(U_TRUTHS), cases=U_CASES, n_draws: int = 108, n_resamples: int = 1000,
                        rng_seed: int = 0, levels=(0.9, 0.95), **fit_kwargs) -> pd.DataFrame:
    """One row per (truth, case, draw): the verdict and whether the argmin / gain intervals at each level cover
    the truth. Pure: draws from planted truths, fits with `fit_u_curve(**fit_kwargs)`."""
    from analysis.fits import FitError, fit_u_curve   # late: synthetic.py is imported by tests that do not fit

    rng = np.random.default_rng(rng_seed)
    rows = []
    for truth in truths:
        shape, true_argmin, _ = U_TRUTHS[truth]
        true_gain = float(shape(np.array([1.0]))[0] - shape(np.array([true_argmin]))[0])
        for noise, n_rho, n_seeds in cases:
            for draw in range(n_draws):
                rho, loss, seed = planted_u_curve(truth, n_rho=n_rho, n_seeds=n_seeds, noise=noise, rng=rng)
                row = {"truth": truth, "noise": noise, "n_rho": n_rho, "n_seeds": n_seeds, "draw": draw}
                try:
                    fit = fit_u_curve(rho, loss, seed, n_resamples=n_resamples, rng=rng, **fit_kwargs)
                except FitError as err:
                    rows.append({**row, "verdict": f"FitError: {err}"})
                    continue
                row["verdict"] = fit.verdict
                row["argmin"] = fit.argmin.value
                row["rho_star_at_edge"] = bool(fit.rho_star_edges)
                for level in levels:
                    tail = 100 * (1 - level) / 2
                    lo, hi = np.percentile(fit.boot_argmin, [tail, 100 - tail])
                    row[f"cover_rho_{level:g}"] = bool(lo - 1e-9 <= true_argmin <= hi + 1e-9)
                    if len(fit.boot_gain):
                        glo, ghi = np.percentile(fit.boot_gain, [tail, 100 - tail])
                        row[f"cover_gain_{level:g}"] = bool(glo - 1e-9 <= true_gain <= ghi + 1e-9)
                row["dropped_share"] = fit.bootstrap.failed_share
                rows.append(row)
    return pd.DataFrame(rows)


def detectability_calibration(*, truth: str = "linear, best at rho = 1", cases=U_CASES, n_draws: int = 120,
                              n_resamples: int = 300, rng_seed: int = 0,
                              seed_offset_sd: float = U_SEED_OFFSET_SD) -> pd.DataFrame:
    """Per case: the standard error behind the report's "detectable gain" (detectable / (z_0.95 + z_0.8)) against
    the sampling sd, over draws, of the contrast it stands for: loss at rho = 1 minus loss at mid-range on the
    fitted curve (the report's contrast when the fitted minimum is at an edge, as it is for this truth in most
    draws; se is taken from those draws only). A ratio near 1 means the detectable gain and the seeds it asks for
    are what the design can resolve; above 1 they overstate it, below 1 understate it."""
    from scipy import stats

    from analysis.fits import DETECT_POWER, VERDICT_LEVEL, fit_u_curve

    z = float(stats.norm.ppf(VERDICT_LEVEL) + stats.norm.ppf(DETECT_POWER))
    rng = np.random.default_rng(rng_seed)
    out = []
    for noise, n_rho, n_seeds in cases:
        contrast, se = [], []
        for _ in range(n_draws):
            rho, loss, seed = planted_u_curve(truth, n_rho=n_rho, n_seeds=n_seeds, noise=noise, rng=rng,
                                              seed_offset_sd=seed_offset_sd)
            fit = fit_u_curve(rho, loss, seed, n_resamples=n_resamples, rng=rng)
            contrast.append(fit.curve[-1] - fit.curve[len(fit.curve) // 2])
            if int(np.argmin(fit.curve)) in (0, len(fit.curve) - 1):
                se.append(fit.detectable_gain / z)
        sampling_sd = float(np.std(contrast, ddof=1))
        out.append({"noise": noise, "n_rho": n_rho, "n_seeds": n_seeds, "draws": n_draws, "edge draws": len(se),
                    "sampling sd": sampling_sd, "median se": float(np.median(se)),
                    "ratio": float(np.median(se)) / sampling_sd})
    return pd.DataFrame(out)


def null_calibration(*, cases=U_CASES, offset_sds=(U_SEED_OFFSET_SD, 0.03), n_draws: int = 250,
                     n_resamples: int = 1000, rng_seed: int = 5) -> pd.DataFrame:
    """The verdict rule on a truth where rho does nothing (loss = base + seed offset + noise): per (offset sd, case)
    the share of each verdict over `n_draws` draws. Every "interior", "boundary" or "concave" is a false claim; the
    rule tests each edge slope one-sided at VERDICT_LEVEL, so up to ~2 x (1 - VERDICT_LEVEL) of draws may claim a
    boundary at one edge or the other. Fits as the report does (`fit_u_curve` defaults, `n_resamples`)."""
    from analysis.fits import fit_u_curve

    rng = np.random.default_rng(rng_seed)
    rows = []
    for sd in offset_sds:
        for noise, n_rho, n_seeds in cases:
            verdicts, strong = [], 0
            for _ in range(n_draws):
                rho = np.repeat(np.linspace(0.0, 1.0, n_rho), n_seeds)
                seed = np.tile(np.arange(n_seeds), n_rho)
                loss = 3.0 + rng.normal(0.0, sd, n_seeds)[seed] + rng.normal(0.0, noise, len(rho))
                fit = fit_u_curve(rho, loss, seed, n_resamples=n_resamples, rng=rng)
                verdicts.append(fit.verdict)
                strong += fit.verdict == "boundary" and min(fit.p_falls_at_lo, fit.p_rises_at_hi) <= 0.01
            v = pd.Series(verdicts)
            rec = {"offset sd": sd, "noise": noise, "n_rho": n_rho, "n_seeds": n_seeds, "draws": n_draws}
            rec.update({k: float((v == k).mean()) for k in ("interior", "boundary", "concave", "flat", "too noisy")})
            rec["false claim"] = rec["interior"] + rec["boundary"] + rec["concave"]
            rec["boundary at 99%"] = strong / n_draws   # the loss falls toward the edge in >= 99% of resamples
            rows.append(rec)
    return pd.DataFrame(rows)


def level_coverage_study(*, u_seeds=(2, 3, 6, 10), law_seeds=(2, 3), n_draws: int = 150, n_law_draws: int = 120,
                         n_resamples: int = 300, level: float = 0.9, rng_seed: int = 4) -> pd.DataFrame:
    """How often a `level` interval of an absolute loss (a level, set by the sweep's seeds) covers the planted one:
    the U-curve's loss at the minimum (symmetric truth, 9 rho, noise 0.004, seed offsets sd 0.03) and the power
    law's E and extrapolated loss (2.6 + 4 x^-0.35 over 8 slot counts 1e4..3e7, offsets sd 0.01, noise 0.001,
    extrapolated to 3e8), against the seed count. The power law's alpha, a difference, is shown for contrast."""
    from analysis.fits import fit_power_law, fit_u_curve

    rng = np.random.default_rng(rng_seed)
    out = []
    for n_seeds in u_seeds:
        hits = []
        for draw in range(n_draws):
            rho, loss, seed = planted_u_curve("symmetric", n_rho=9, n_seeds=n_seeds, noise=0.004, rng=rng,
                                              seed_offset_sd=0.03)
            est = fit_u_curve(rho, loss, seed, n_resamples=n_resamples, rng=draw, level=level).loss_at_optimum
            hits.append(est.lo <= 3.0 <= est.hi)
        out.append({"fit": "U-curve", "quantity": "loss at the minimum", "seeds": n_seeds, "draws": n_draws,
                    "coverage": float(np.mean(hits))})
    slots = np.array([1e4, 3e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7])
    far, truth = 3e8, lambda x: 2.6 + 4.0 * x ** -0.35
    for n_seeds in law_seeds:
        hits = np.zeros(3)
        for draw in range(n_law_draws):
            x, seed = np.repeat(slots, n_seeds), np.tile(np.arange(n_seeds), len(slots))
            y = truth(x) + rng.normal(0, 0.01, n_seeds)[seed] + rng.normal(0, 0.001, len(x))
            fit = fit_power_law(x, y, seed, n_resamples=n_resamples, level=level, rng=draw)
            ext = fit.extrapolate(far, level)
            hits += [fit.E.lo <= 2.6 <= fit.E.hi, ext.lo <= truth(far) <= ext.hi,
                     fit.alpha.lo <= 0.35 <= fit.alpha.hi]
        for quantity, hit in zip(("E", f"loss at {far:g} slots", "alpha (a difference)"), hits):
            out.append({"fit": "power law", "quantity": quantity, "seeds": n_seeds, "draws": n_law_draws,
                        "coverage": float(hit / n_law_draws)})
    return pd.DataFrame(out)


def summarise_calibration(draws: pd.DataFrame, levels=(0.9, 0.95)) -> pd.DataFrame:
    """Per truth: coverage of the rho* (argmin) and gain intervals at each level, and the share of each verdict.
    'false claim' is the share of 'interior' for a truth without an interior optimum, and of 'boundary' or
    'concave' for a truth with one."""
    out = []
    for truth, rows in draws.groupby("truth", sort=False):
        interior_truth = U_TRUTHS[truth][2]
        rec = {"truth": truth, "draws": len(rows)}
        for level in levels:
            rec[f"rho* cover {level:.0%}"] = rows[f"cover_rho_{level:g}"].mean()
        for level in levels:
            rec[f"gain cover {level:.0%}"] = rows[f"cover_gain_{level:g}"].mean()
        for verdict in ("interior", "boundary", "concave", "flat", "too noisy"):
            rec[verdict] = float(np.mean(rows["verdict"] == verdict))
        rec["false claim"] = (rec["boundary"] + rec["concave"]) if interior_truth else rec["interior"]
        interior = rows["verdict"] == "interior"
        rec["interior, rho* reaches an edge"] = (float(rows.loc[interior, "rho_star_at_edge"].astype(bool).mean())
                                                 if interior.any() else float("nan"))
        out.append(rec)
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------------------------
# Power of the verdict rule on a measured shape: "if these seed means were the truth, how often would N seeds
# get each verdict?" (benchmarks/u_curve_power.py reads the shape off a results store)


def measured_shape(rho: np.ndarray, loss: np.ndarray, seed: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(rho values, mean loss at each minus the lowest mean, residual sd, seed-offset sd) of a complete rho x seed
    table, read as an additive model loss = shape(rho) + offset(seed) + noise; the residual sd has
    (n_rho - 1)(n_seeds - 1) degrees of freedom. Every seed must cover every rho once."""
    table = pd.DataFrame({"rho": rho, "seed": seed, "loss": loss}).pivot_table(
        index="rho", columns="seed", values="loss", aggfunc="count")
    if table.isna().any().any() or (table != 1).any().any():
        raise ValueError("measured_shape needs every seed at every rho exactly once")
    grid = pd.DataFrame({"rho": rho, "seed": seed, "loss": loss}).pivot(index="rho", columns="seed", values="loss")
    if grid.shape[0] < 2 or grid.shape[1] < 2:
        raise ValueError("measured_shape needs at least 2 rho values and 2 seeds")
    centred = grid.sub(grid.mean(axis=1), axis=0)
    offsets = centred.mean(axis=0)
    resid = centred.sub(offsets, axis=1).to_numpy()
    dof = (grid.shape[0] - 1) * (grid.shape[1] - 1)
    means = grid.mean(axis=1).to_numpy()
    return (grid.index.to_numpy(dtype=float), means - means.min(), float(np.sqrt((resid ** 2).sum() / dof)),
            float(offsets.std(ddof=1)))


def shape_power(rho_points, shape, *, noise: float, offset_sd: float, seeds=(4, 8, 16), n_draws: int = 100,
                n_resamples: int = 1000, methods=("cubic",), rng_seed: int = 0) -> pd.DataFrame:
    """Per (method, seed count): the share of draws given each verdict when `shape` (loss above its minimum at
    `rho_points`) is the truth, every seed trains every rho point, seeds differ by offsets of sd `offset_sd` and
    trials by Gaussian noise of sd `noise`; and the median shares of resamples turning inward at each edge. The
    report's fit (`fit_u_curve` defaults but `method` and `n_resamples`)."""
    from analysis.fits import FitError, fit_u_curve

    rho_points, shape = np.asarray(rho_points, dtype=float), np.asarray(shape, dtype=float)
    rng = np.random.default_rng(rng_seed)
    rows = []
    for n_seeds in seeds:
        for method in methods:
            verdicts, p_lo, p_hi = [], [], []
            for _ in range(n_draws):
                rho = np.repeat(rho_points, n_seeds)
                seed = np.tile(np.arange(n_seeds), len(rho_points))
                loss = (3.0 + np.repeat(shape, n_seeds) + rng.normal(0.0, offset_sd, n_seeds)[seed]
                        + rng.normal(0.0, noise, len(rho)))
                try:
                    fit = fit_u_curve(rho, loss, seed, method=method, n_resamples=n_resamples, rng=rng)
                except FitError as err:
                    verdicts.append(f"FitError: {err}")
                    continue
                verdicts.append(fit.verdict)
                p_lo.append(fit.p_falls_at_lo)
                p_hi.append(fit.p_rises_at_hi)
            v = pd.Series(verdicts)
            rec = {"method": method, "seeds": n_seeds, "draws": n_draws}
            rec.update({k: float((v == k).mean()) for k in ("interior", "boundary", "concave", "flat", "too noisy")})
            rec["fit errors"] = float(v.str.startswith("FitError").mean())
            rec["median P(inward, low edge)"] = float(np.median(p_lo)) if p_lo else float("nan")
            rec["median P(inward, high edge)"] = float(np.median(p_hi)) if p_hi else float("nan")
            rows.append(rec)
    return pd.DataFrame(rows)
