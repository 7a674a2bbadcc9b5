"""The report of one sweep: read its results store, fit every group, draw the plots, and write report.md, a
self-contained report.html (plots embedded) and fits.json (every fitted parameter with its interval).

Groups (docs/paper.md, "Allocation"): U-curves per (experiment, budget) for the allocation and search
experiments (with a verdict that holds its error rates, docs/analysis.md), their trend over budgets per
experiment, power laws over slots per (experiment, memory kind, budget) for the memory experiments, and the
Chinchilla form when the sweep varies both active parameters and tokens.
Trials that failed, diverged or have a non-finite loss are excluded from every fit and listed with the reason.
Entry point: `write_report(store_dir, out_dir=None) -> Path` (`engram-sweep report results/<sweep>`).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.contract import CURVES_DIR, RUNS_DIR, read_folder, read_spec
from analysis.fits import (DROP_WARN_SHARE, LEVEL, N_RESAMPLES, REFERENCE_GAIN, VERDICT_LEVEL, Bootstrap, BudgetTrend,
                           ChinchillaFit, FitError, LogLinearFit, PowerLawFit, UCurveFit, fit_budget_trend,
                           fit_chinchilla, fit_loglinear, fit_power_law, fit_u_curve, single_threaded_blas)
from analysis.diagnostics import (BALANCED_MAX_LOAD, LAW_MIN_DECADES, LAW_R2_BAR, MIN_LINE_TEST_COUNTS,
                                  TRAINED_LOOKUPS_PER_ROW, diagnostics_summary, diagnostics_table, law_grid)
from analysis.plots import (plot_budget_trend, plot_kind_losses, plot_memory_comparison, plot_power_laws,
                            plot_rho_star_vs_share, plot_training_curves, plot_u_curve)

U_KINDS = ("allocation", "search")
MEMORY_KIND = "memory"
LOSS_COL = "final_val_loss"
EXTRAPOLATION_FACTOR = 10.0     # power laws are extrapolated to 10x the largest slot count sampled
LEVEL_SEEDS = 10                # below this many seeds a level's interval under-covers (docs/analysis.md): say so
MIN_COMPUTE_BUDGETS = 3         # loss-vs-compute power laws per rho need 3 distinct budgets (3 parameters)
CHINCHILLA_MIN_RATIO = 2.0      # fit the N-D form only when P_act and tokens each vary by at least this factor
PANEL_SIZE = (6.4, 4.6)
MAX_COLUMNS = 2
FIG_DPI = 110
# U-curve fits per group: the default (whose verdict the report states), then the checks beside it
DEFAULT_U = "cubic"
NO_OFFSETS_U = "cubic, no seed offsets"
U_FITS = MappingProxyType({DEFAULT_U: {"method": "cubic", "seed_offsets": True},
                           "quadratic": {"method": "quadratic", "seed_offsets": True},
                           NO_OFFSETS_U: {"method": "cubic", "seed_offsets": False}})


@dataclass(frozen=True)
class SweepAnalysis:
    """Everything the report states, computed from the runs table; no files touched."""

    runs: pd.DataFrame = field(repr=False)
    usable: pd.DataFrame = field(repr=False)
    excluded: pd.DataFrame = field(repr=False)          # trial_id, experiment, status, reason
    budgets: pd.DataFrame = field(repr=False)           # achieved compute per (experiment, budget)
    u_curves: dict[tuple[str, float], dict[str, UCurveFit]] = field(repr=False)   # -> {U_FITS key: fit}
    trends: dict[str, BudgetTrend] = field(repr=False)                           # experiment -> trend
    power_laws: dict[tuple[str, str, float], PowerLawFit | LogLinearFit] = field(repr=False)   # log-linear only
                                                        # when too few slot counts for the power law
    compute_laws: dict[tuple[str, float], PowerLawFit] = field(repr=False)      # (experiment, target rho)
    chinchilla: ChinchillaFit | None = None
    not_fitted: tuple = ()                              # (what, reason)
    mix: KnowledgeMix | None = None                     # the mix corpus's read-outs, when the sweep has them


# ---------------------------------------------------------------------------------------------------------------
# Reading and selecting


def read_store(store_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """runs, curves (empty when absent) and the parsed spec.yaml (empty when absent) of a results folder
    (layout: analysis.contract)."""
    store_dir = Path(store_dir)
    if not (store_dir / RUNS_DIR).is_dir():
        raise ValueError(f"store_dir: {store_dir} has no {RUNS_DIR}/ folder (not a results folder)")
    runs = _read_folder(store_dir / RUNS_DIR)
    if runs.empty:
        raise ValueError(f"store_dir: {store_dir / RUNS_DIR} holds no finished trials")
    curves = _read_folder(store_dir / CURVES_DIR) if (store_dir / CURVES_DIR).is_dir() else pd.DataFrame()
    spec, _ = read_spec(store_dir)   # an unreadable spec.yaml costs the report its definitions only (the CLI warns)
    return runs, curves, spec


def _read_folder(folder: Path) -> pd.DataFrame:
    # Damaged files are skipped (the CLI names them); files with drifting types (an all-null column) still read.
    return read_folder(folder).table


def split_usable(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(usable, excluded): usable rows have status ok and a finite loss; excluded rows carry a `reason`."""
    missing = [c for c in ("trial_id", "experiment", "status", LOSS_COL) if c not in runs.columns]
    if missing:
        raise ValueError(f"runs: missing columns {missing}")
    loss = pd.to_numeric(runs[LOSS_COL], errors="coerce").to_numpy(dtype=float)
    finite = np.isfinite(loss)
    ok = (runs["status"] == "ok").to_numpy()
    errors = runs["error"] if "error" in runs.columns else pd.Series([None] * len(runs), index=runs.index)
    reasons = []
    for status, err, fin in zip(runs["status"], errors, finite):
        if status != "ok":
            reasons.append(f"{status}: {err}" if isinstance(err, str) and err else str(status))
        elif not fin:
            reasons.append(f"status ok but {LOSS_COL} is not finite")
        else:
            reasons.append("")
    usable = runs[ok & finite].copy()
    excluded = runs[~(ok & finite)].assign(reason=[r for r, u in zip(reasons, ok & finite) if not u])
    return usable, excluded


def _x_rho(group: pd.DataFrame) -> np.ndarray:
    """The achieved rho when recorded (what was trained), else the target grid value."""
    target = group["rho"].to_numpy(dtype=float)
    if "rho_achieved" not in group.columns:
        return target
    achieved = group["rho_achieved"].to_numpy(dtype=float)
    return np.where(np.isfinite(achieved), achieved, target)


# ---------------------------------------------------------------------------------------------------------------
# Fitting every group


def analyse(runs: pd.DataFrame, *, n_resamples: int = N_RESAMPLES, level: float = LEVEL) -> SweepAnalysis:
    usable, excluded = split_usable(runs)
    not_fitted: list[tuple[str, str]] = []
    kind = usable["kind"] if "kind" in usable.columns else pd.Series("allocation", index=usable.index)

    u_curves: dict = {}
    u_rows = usable[kind.isin(U_KINDS)]
    u_rows = u_rows[~_on_share_axis(u_rows)]   # a knowledge_share axis: one U-curve per share (KnowledgeMix)
    for (experiment, budget), group in u_rows.groupby(["experiment", "budget"], sort=True, dropna=False):
        what = f"U-curve {experiment} @ {budget:.3g} FLOPs"
        rho = _x_rho(group)
        keep = np.isfinite(rho)
        fits = {}
        seeds = group["seed"].to_numpy()[keep]
        for name, options in U_FITS.items():
            if not options["seed_offsets"] and len(np.unique(seeds)) < 2:
                continue            # one seed: nothing to compare the offsets against
            try:
                fits[name] = fit_u_curve(rho[keep], group[LOSS_COL].to_numpy(float)[keep], seeds,
                                         n_resamples=n_resamples, level=level, rng=0, **options)
            except (ValueError, FitError) as err:
                not_fitted.append((f"{what} ({name})", str(err)))
        if DEFAULT_U not in fits and "quadratic" in fits:
            not_fitted.append((f"{what} ({DEFAULT_U})", "the parabola stands in as the default for this group"))
        if fits:
            u_curves[(experiment, float(budget))] = fits

    trends: dict = {}
    for experiment in sorted({e for e, _ in u_curves}):
        keys = sorted(k for k in u_curves if k[0] == experiment)
        if len(keys) < 2:
            continue
        try:
            trends[experiment] = fit_budget_trend([b for _, b in keys], [default_u(u_curves[k])[1] for k in keys],
                                                  level=level)
        except (ValueError, FitError) as err:
            not_fitted.append((f"trend over budgets of {experiment}", str(err)))

    power_laws: dict = {}
    mem_rows = usable[(kind == MEMORY_KIND) & (usable["memory"] != "none")]  # none: one point, no slots
    for (experiment, memory, budget), group in mem_rows.groupby(["experiment", "memory", "budget"], sort=True):
        what = f"power law {experiment} / {memory} @ {budget:.3g} FLOPs"
        group = group[group["slots"] > 0]
        args = (group["slots"].to_numpy(float), group[LOSS_COL].to_numpy(float), group["seed"].to_numpy())
        try:
            power_laws[(experiment, memory, float(budget))] = fit_power_law(*args, n_resamples=n_resamples,
                                                                            level=level)
            continue
        except (ValueError, FitError) as err:
            reason = str(err)
        try:   # too few slot counts for three parameters may still give the paper's two-parameter form
            power_laws[(experiment, memory, float(budget))] = fit_loglinear(*args, n_resamples=n_resamples,
                                                                            level=level)
            not_fitted.append((what, f"{reason}; the log-linear form alone was fitted"))
        except (ValueError, FitError) as err:
            not_fitted.append((what, f"{reason}; log-linear form: {err}"))

    compute_laws: dict = {}
    alloc_rows = usable[kind == "allocation"]
    for experiment, rows in alloc_rows.groupby("experiment", sort=True):
        if rows["budget"].nunique() < MIN_COMPUTE_BUDGETS:
            continue
        for rho_target, group in rows.groupby("rho", sort=True):
            compute = pd.to_numeric(group["compute"], errors="coerce").to_numpy(float) \
                if "compute" in group.columns else np.full(len(group), np.nan)
            compute = np.where(np.isfinite(compute), compute, group["budget"].to_numpy(float))
            try:
                compute_laws[(experiment, float(rho_target))] = fit_power_law(
                    compute, group[LOSS_COL].to_numpy(float), group["seed"].to_numpy(),
                    n_resamples=n_resamples, level=level)
            except (ValueError, FitError) as err:
                not_fitted.append((f"power law over compute {experiment} / rho = {rho_target:g}", str(err)))

    chinchilla = None
    if {"P_act", "tokens"} <= set(usable.columns) and len(usable) >= 6:
        n, d = usable["P_act"].to_numpy(float), usable["tokens"].to_numpy(float)
        if n.min() > 0 and d.min() > 0 and n.max() / n.min() >= CHINCHILLA_MIN_RATIO \
                and d.max() / d.min() >= CHINCHILLA_MIN_RATIO:
            try:
                chinchilla = fit_chinchilla(n, d, usable[LOSS_COL].to_numpy(float), usable["seed"].to_numpy(),
                                            n_resamples=n_resamples, level=level)
            except (ValueError, FitError) as err:
                not_fitted.append(("Chinchilla form over P_act and tokens", str(err)))

    mix = analyse_knowledge_mix(usable, n_resamples=n_resamples, level=level)
    if mix is not None:
        not_fitted.extend(mix.not_fitted)
    return SweepAnalysis(runs=runs, usable=usable, excluded=excluded, budgets=_budget_table(runs, usable),
                         u_curves=u_curves, trends=trends, power_laws=power_laws, compute_laws=compute_laws,
                         chinchilla=chinchilla,
                         not_fitted=tuple(not_fitted), mix=mix)


def _budget_table(runs: pd.DataFrame, usable: pd.DataFrame) -> pd.DataFrame:
    rows = []
    if "budget" not in runs.columns:
        return pd.DataFrame()
    for (experiment, budget), group in runs.groupby(["experiment", "budget"], sort=True, dropna=False):
        ok = usable[(usable["experiment"] == experiment) & (usable["budget"] == budget)]
        compute = pd.to_numeric(ok.get("compute", pd.Series(dtype=float)), errors="coerce").dropna()
        rows.append({
            "experiment": experiment, "budget (FLOPs)": _g(budget), "trials": len(group), "usable": len(ok),
            "achieved compute min": _g(compute.min()) if len(compute) else "-",
            "median": _g(compute.median()) if len(compute) else "-",
            "max": _g(compute.max()) if len(compute) else "-",
            "median / budget": f"{compute.median() / budget:.3f}" if len(compute) and budget else "-",
            "tokens (median)": _g(ok["tokens"].median()) if "tokens" in ok and len(ok) else "-",
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------
# The mix corpus (engram.mixcorpus): a U-curve per knowledge share, rho* against the share, per-kind losses

SHARE_COL = "knowledge_share"
MIX_ONLY_DATA = ("knowledge_share", "mix_entities", "mix_seed")  # engram.config.MIX_FIELDS (analysis imports no engram)
KIND_LOSS_COLS = {"knowledge": "final_val_loss_knowledge", "computation": "final_val_loss_computation"}


@dataclass(frozen=True)
class ShareOptimum:
    """The U-curve of one (experiment, budget, knowledge share); `fit` None when it could not be fitted."""

    experiment: str
    budget: float
    share: float
    fit: UCurveFit | None


@dataclass(frozen=True)
class KnowledgeMix:
    """What a sweep over the mix corpus says: rho* per share and the per-kind losses against rho.

    `kind_losses`: one row per (trial, kind): experiment, budget, share, rho, seed, kind, loss.
    `kind_gains`: per (experiment, budget, share, kind): the mean loss at rho = 1 minus the lowest mean loss at
    a sampled rho < 1 (positive: memory lowers that kind's loss), and the rho where that lowest loss sits.
    """

    optima: tuple[ShareOptimum, ...]
    kind_losses: pd.DataFrame = field(repr=False)
    kind_gains: pd.DataFrame = field(repr=False)
    not_fitted: tuple = ()

    def to_dict(self) -> dict:
        return {"u_curves": [{"experiment": o.experiment, "budget": o.budget, "knowledge_share": o.share,
                              "quadratic": None if o.fit is None else o.fit.to_dict()} for o in self.optima],
                "kind_gains": self.kind_gains.to_dict(orient="records")}


def _on_share_axis(rows: pd.DataFrame) -> np.ndarray:
    """Rows of experiments that sweep the knowledge share (more than one share): fitted per share instead."""
    if SHARE_COL not in rows.columns or rows.empty:
        return np.zeros(len(rows), dtype=bool)
    n_shares = rows.groupby("experiment")[SHARE_COL].transform(lambda s: s.dropna().nunique())
    return (n_shares > 1).to_numpy()


def _share_u_curve(rho: np.ndarray, loss: np.ndarray, seed: np.ndarray, *, n_resamples: int,
                   level: float) -> UCurveFit:
    """The one call into the U-curve fitting API for the mix read-outs: the parabola (the report's fallback
    curve), since a share usually has one seed, where most resamples of the cubic keep too few rho values."""
    return fit_u_curve(rho, loss, seed, method="quadratic", n_resamples=n_resamples, level=level)


def analyse_knowledge_mix(usable: pd.DataFrame, *, n_resamples: int = N_RESAMPLES,
                          level: float = LEVEL) -> KnowledgeMix | None:
    """Per (experiment, budget, knowledge share) of the allocation rows on the mix corpus: the U-curve and the
    per-kind losses. None when no usable allocation row has a knowledge share."""
    if SHARE_COL not in usable.columns:
        return None
    kind = usable["kind"] if "kind" in usable.columns else pd.Series("allocation", index=usable.index)
    share = pd.to_numeric(usable[SHARE_COL], errors="coerce")
    rows = usable[(kind == "allocation").to_numpy() & np.isfinite(share.to_numpy(dtype=float))]
    if rows.empty:
        return None
    optima, not_fitted, long_rows = [], [], []
    for (experiment, budget, s), group in rows.groupby(["experiment", "budget", SHARE_COL], sort=True):
        rho = _x_rho(group)
        keep = np.isfinite(rho)
        fit = None
        try:
            fit = _share_u_curve(rho[keep], group[LOSS_COL].to_numpy(float)[keep], group["seed"].to_numpy()[keep],
                                 n_resamples=n_resamples, level=level)
        except (ValueError, FitError) as err:
            not_fitted.append((f"U-curve {experiment} @ {budget:.3g} FLOPs, knowledge share {s:g}", str(err)))
        optima.append(ShareOptimum(str(experiment), float(budget), float(s), fit))
        for name, col in (("total", LOSS_COL), *KIND_LOSS_COLS.items()):
            if col not in group.columns:
                continue
            losses = pd.to_numeric(group[col], errors="coerce").to_numpy(dtype=float)
            long_rows.extend({"experiment": experiment, "budget": float(budget), "share": float(s), "rho": r,
                              "seed": int(sd), "kind": name, "loss": v}
                             for r, sd, v in zip(group["rho"].to_numpy(float), group["seed"], losses)
                             if np.isfinite(v))
    kind_losses = pd.DataFrame(long_rows, columns=["experiment", "budget", "share", "rho", "seed", "kind", "loss"])
    return KnowledgeMix(optima=tuple(optima), kind_losses=kind_losses, kind_gains=_kind_gains(kind_losses),
                        not_fitted=tuple(not_fitted))


def _kind_gains(kind_losses: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (experiment, budget, share, kind), group in kind_losses.groupby(["experiment", "budget", "share", "kind"],
                                                                         sort=True):
        mean = group.groupby("rho", sort=True)["loss"].mean()
        at_moe = mean[np.isclose(mean.index, 1.0)]
        below = mean[mean.index < 1.0 - 1e-9]
        if at_moe.empty or below.empty:
            continue
        rows.append({"experiment": experiment, "budget": budget, "share": share, "kind": kind,
                     "loss at rho=1": float(at_moe.iloc[0]), "best rho<1": float(below.idxmin()),
                     "loss there": float(below.min()), "gain": float(at_moe.iloc[0] - below.min())})
    return pd.DataFrame(rows, columns=["experiment", "budget", "share", "kind", "loss at rho=1", "best rho<1",
                                       "loss there", "gain"])


def draw_knowledge_mix(mix: KnowledgeMix, plot_dir: Path) -> dict[str, Path]:
    """rho* against the share (one panel per experiment and budget) and the per-kind losses against rho (one
    panel per share)."""
    out: dict[str, Path] = {}
    groups = sorted({(o.experiment, o.budget) for o in mix.optima})
    fitted = [(e, b) for e, b in groups if any(o.fit is not None for o in mix.optima if (o.experiment, o.budget)
                                                == (e, b))]
    if fitted:
        fig = _figure(len(fitted))
        for ax, (experiment, budget) in zip(fig.axes, fitted):
            fits = {o.share: o.fit for o in mix.optima
                    if (o.experiment, o.budget) == (experiment, budget) and o.fit is not None}
            plot_rho_star_vs_share(ax, fits, title=f"{experiment}: rho* vs knowledge share at C = {budget:.3g} FLOPs")
        fig.suptitle("Allocation optimum against the knowledge share of the mix corpus")
        out["mix_rho_star"] = _save(fig, plot_dir, "mix_rho_star")
    for experiment, rows in mix.kind_losses.groupby("experiment", sort=True):
        panels = sorted({(b, s) for b, s in zip(rows["budget"], rows["share"])})
        fig = _figure(len(panels))
        for ax, (budget, share) in zip(fig.axes, panels):
            sel = rows[(rows["budget"] == budget) & (rows["share"] == share)]
            plot_kind_losses(ax, sel[["rho", "kind", "loss"]],
                             title=f"{experiment}: share {share:g}, C = {budget:.3g} FLOPs")
        fig.suptitle(f"{experiment}: validation loss per token kind vs rho")
        out[f"mix_kind_losses_{experiment}"] = _save(fig, plot_dir, f"mix_kind_losses_{experiment}")
    return out


def knowledge_mix_blocks(mix: KnowledgeMix, figures: dict[str, Path]) -> list:
    b: list = [("h2", "Knowledge mix: rho* against the knowledge share")]
    b.append(("p", "The built-in mix corpus (engram.mixcorpus): one U-curve per knowledge share (the parabola, the "
                   "report's fallback curve: a share's few points rarely carry the cubic's resamples). Per-kind "
                   "losses are the final validation loss over the tokens of a fact's value (knowledge) or of a "
                   "rule's result (computation); the total is over every token. Hypothesis the sweep tests: "
                   "rho* falls as the share rises, and memory (rho < 1) lowers the knowledge loss more than the "
                   "computation loss."))
    rows = []
    for o in mix.optima:
        fit = o.fit
        rows.append({"experiment": o.experiment, "budget": _g(o.budget), "knowledge share": _g(o.share),
                     "points": "-" if fit is None else fit.n_points,
                     "verdict": "not fitted" if fit is None else fit.verdict,
                     "rho*": "-" if fit is None else (str(fit.rho_star) if fit.rho_star
                                                      else f"none (edge {fit.argmin.value:.3g})"),
                     "gain vs rho=1": "-" if fit is None or fit.gain is None else str(fit.gain),
                     "R²": "-" if fit is None else f"{fit.r2:.3f}"})
    b.append(("table", pd.DataFrame(rows)))
    if "mix_rho_star" in figures:
        b.append(("img", figures["mix_rho_star"], "rho* against the knowledge share"))
    if not mix.kind_gains.empty:
        b.append(("h3", "Per-kind losses: what memory buys each kind"))
        b.append(("p", "Gain = mean loss at rho = 1 (pure MoE) minus the lowest mean loss at a sampled rho < 1 "
                       "(positive: memory helps that kind); no interval: read it against the seed spread."))
        b.append(("table", mix.kind_gains.assign(budget=mix.kind_gains["budget"].map(_g))))
    for name, path in figures.items():
        if name.startswith("mix_kind_losses_"):
            b.append(("img", path, f"validation loss per token kind vs rho, {name[len('mix_kind_losses_'):]}"))
    return b


# ---------------------------------------------------------------------------------------------------------------
# Figures


def draw_figures(result: SweepAnalysis, curves: pd.DataFrame, plot_dir: Path) -> dict[str, Path]:
    """Write every figure as PNG and SVG under plot_dir; returns name -> PNG path."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for experiment in sorted({e for e, _ in result.u_curves}):
        keys = sorted(k for k in result.u_curves if k[0] == experiment)
        fig = _figure(len(keys))
        for ax, key in zip(fig.axes, keys):
            fit = default_u(result.u_curves[key])[1]
            plot_u_curve(ax, fit, title=f"{experiment}: loss vs rho at C = {key[1]:.3g} FLOPs "
                                        f"({_seed_note(fit)})",
                         untrained_rho=untrained_rhos(result.usable, *key), untrained_label=UNTRAINED_RHO_LABEL)
        fig.suptitle(f"{experiment}: validation loss vs allocation ratio rho, per compute budget")
        out[f"u_curves_{experiment}"] = _save(fig, plot_dir, f"u_curves_{experiment}")
    for experiment, trend in result.trends.items():
        fig = _figure(2)
        plot_budget_trend(fig.axes[0], fig.axes[1], trend, title=f"{experiment}: ")
        fig.suptitle(f"{experiment}: the optimum across compute budgets")
        out[f"trend_{experiment}"] = _save(fig, plot_dir, f"trend_{experiment}")
    # Memory: one panel per budget holding every memory experiment at that budget, so that OverEncoding sits
    # beside Engram even when the sweep puts them in separate experiments.
    mem_budgets = sorted({b for _, _, b in result.power_laws}, key=lambda b: (math.isnan(b), b))
    if mem_budgets:
        fig = _figure(len(mem_budgets))
        for ax, budget in zip(fig.axes, mem_budgets):
            group = {(e, m): f for (e, m, b), f in result.power_laws.items() if _same(b, budget)}
            kinds = [m for _, m in group]
            fits = {(m if kinds.count(m) == 1 else f"{e}/{m}"): f for (e, m), f in sorted(group.items())}
            plot_power_laws(ax, fits, title=f"Loss vs memory slots at C = {budget:.3g} FLOPs")
        fig.suptitle("Validation loss vs memory slots (power law solid, log-linear dashed)")
        out["memory"] = _save(fig, plot_dir, "memory")
    out.update(draw_memory_comparison(result, plot_dir))
    for experiment in sorted({e for e, _ in result.compute_laws}):
        fits = {f"rho = {r:g}": f for (e, r), f in sorted(result.compute_laws.items()) if e == experiment}
        fig = _figure(1)
        plot_power_laws(fig.axes[0], fits, title=f"{experiment}: loss vs compute, one power law per rho",
                        xlabel="compute C (FLOPs, log scale)", symbol="C", loglinear=False)
        out[f"compute_{experiment}"] = _save(fig, plot_dir, f"compute_{experiment}")
    if result.mix is not None:
        out.update(draw_knowledge_mix(result.mix, plot_dir))
    if not curves.empty and {"trial_id", "tokens", "val_loss"} <= set(curves.columns):
        usable = result.usable
        for experiment, rows in usable.groupby("experiment", sort=True):
            is_memory = "kind" in rows.columns and (rows["kind"] == MEMORY_KIND).all()
            budgets = sorted(rows["budget"].dropna().unique()) if "budget" in rows.columns else [None]
            budgets = budgets or [None]
            fig = _figure(len(budgets))
            for ax, budget in zip(fig.axes, budgets):
                sel = rows if budget is None else rows[rows["budget"] == budget]
                color = dict(zip(sel["trial_id"], sel["slots"].astype(float) if is_memory else _x_rho(sel)))
                plot_training_curves(ax, curves[curves["trial_id"].isin(color)], color,
                                     label="memory slots" if is_memory else "rho", log_color=is_memory,
                                     title=f"{experiment}: validation loss during training"
                                           + ("" if budget is None else f" at C = {budget:.3g} FLOPs"))
            fig.suptitle(f"{experiment}: training curves (usable trials)")
            out[f"curves_{experiment}"] = _save(fig, plot_dir, f"curves_{experiment}")
    return out


def memory_comparison_points(usable: pd.DataFrame) -> dict[float, pd.DataFrame]:
    """Per budget, every usable memory-experiment trial as (experiment, memory, table_params, seed, loss,
    untrained): the points of the none / Engram / OverEncoding figure. Table parameters are the stored
    `table_params` (P_engram for stores written before that column); untrained from analysis.diagnostics."""
    if "kind" not in usable.columns or "memory" not in usable.columns:
        return {}
    rows = usable[usable["kind"] == MEMORY_KIND]
    if rows.empty:
        return {}
    diag = diagnostics_table(rows)
    params = rows["table_params"] if "table_params" in rows.columns else rows.get("P_engram")
    frame = pd.DataFrame({"experiment": rows["experiment"].to_numpy(), "memory": rows["memory"].to_numpy(),
                          "table_params": pd.to_numeric(params, errors="coerce").to_numpy(float),
                          "seed": rows["seed"].to_numpy(), "loss": rows[LOSS_COL].to_numpy(float),
                          "untrained": diag["untrained"].to_numpy(bool),
                          "budget": rows["budget"].to_numpy(float)})
    frame.loc[frame["memory"] == "none", "table_params"] = 0.0
    return {float(b): g.drop(columns="budget").reset_index(drop=True)
            for b, g in frame.groupby("budget", sort=True)}


def draw_memory_comparison(result: SweepAnalysis, plot_dir: Path) -> dict[str, Path]:
    """The none / Engram / OverEncoding figure (one panel per budget) when a budget has a memory-free point or
    two kinds of memory."""
    groups = {b: g for b, g in memory_comparison_points(result.usable).items() if g["memory"].nunique() >= 2}
    if not groups:
        return {}
    fig = _figure(len(groups))
    for ax, (budget, points) in zip(fig.axes, groups.items()):
        plot_memory_comparison(ax, points, title=f"No memory, Engram and OverEncoding at C = {budget:.3g} FLOPs")
    fig.suptitle("Validation loss vs memory table parameters (memory experiments)")
    return {"memory_comparison": _save(fig, plot_dir, "memory_comparison")}


def _diagnostics_blocks(result: SweepAnalysis, figures: dict[str, Path]) -> list:
    """The report's trial-diagnostics section: did the tables train, did the routers balance."""
    table = diagnostics_table(result.usable)
    order = [c for c in ("experiment", "memory", "rho", "slots", "seed") if c in table.columns]
    table = table.sort_values(order, kind="stable", na_position="first").reset_index(drop=True)
    has_any = table[["lookups_median", "expert_load_max"]].notna().any(axis=None)
    b: list = []
    if "memory_comparison" in figures:
        b.append(("h2", "Memory: none, Engram and OverEncoding"))
        b.append(("p", "Every memory-experiment trial over its table parameters (equal table parameters put "
                       "Engram and OverEncoding at the same x); the memory-free model is the dashed level with "
                       "its seed range. Hollow points: tables outside the trained regime (below)."))
        b.append(("img", figures["memory_comparison"], "loss vs table parameters, no memory / Engram / OverEncoding"))
    if not has_any:
        return b
    n = diagnostics_summary(table)
    b.append(("h2", "Trial diagnostics: trained tables, balanced routers"))
    b.append(("p", f"Tables: reads per row over the training tokens (expected = tokens x tables / rows; measured: "
                   f"share of rows read at least once, median and 10th percentile of reads per read row) and how "
                   f"far a read row moved from its init (mean RMS update / mean RMS at init). A trial whose median "
                   f"read row was read fewer than {TRAINED_LOOKUPS_PER_ROW:g} times is marked **untrained**: its "
                   f"tables stay near their random init, so its slot count says little (threshold measured, "
                   f"docs/fairness.md). Routers, worst MoE layer, two loads: of the validation windows under the "
                   f"final router (**unbalanced** when max / mean > {BALANCED_MAX_LOAD:g} or an expert gets under 10% "
                   f"of the mean) and of the training tokens over the last 10% of the steps, what the experts "
                   f"trained on (**unbalanced in training**, same bounds). The comparison's fairness rests on the "
                   f"second: no token is dropped, so a busy expert at evaluation costs nothing, an expert starved "
                   f"of training tokens does (docs/fairness.md, \"Two loads\"). "
                   f"{n['untrained']} of {n['with_tables']} trials with tables untrained; {n['unbalanced']} of "
                   f"{n['with_router']} MoE trials unbalanced in the validation pass, "
                   f"{n['unbalanced_in_training']} of {n['with_trained_load']} in training."))
    shown = pd.DataFrame({
        "experiment": table["experiment"], "memory": table.get("memory", "-"),
        "rho": [_cell(v) for v in table.get("rho", pd.Series(np.nan, index=table.index))],
        "slots": table.get("slots", "-"), "seed": table.get("seed", "-"),
        "lookups/row (expected)": [_cell(v) for v in table["lookups_per_row"]],
        "rows read": [f"{v:.0%}" if np.isfinite(v) else "-" for v in table["rows_read_share"]],
        "median reads": [_cell(v) for v in table["lookups_median"]],
        "p10 reads": [_cell(v) for v in table["lookups_p10"]],
        "update / init": [f"{v:.3f}" if np.isfinite(v) else "-" for v in table["update_rel"]],
        "load max/mean": [f"{v:.2f}" if np.isfinite(v) else "-" for v in table["expert_load_max"]],
        "load min/mean": [f"{v:.2f}" if np.isfinite(v) else "-" for v in table["expert_load_min"]],
        "starved": [_cell(v) for v in table["experts_starved"]],
        "trained-on max/mean": [f"{v:.2f}" if np.isfinite(v) else "-" for v in table["expert_train_load_max"]],
        "trained-on min/mean": [f"{v:.2f}" if np.isfinite(v) else "-" for v in table["expert_train_load_min"]],
        "flags": [", ".join(f for f, on in (("untrained", u), ("unbalanced", ub), ("unbalanced in training", ubt))
                            if on)
                  for u, ub, ubt in zip(table["untrained"], table["unbalanced"], table["unbalanced_in_training"])],
    })
    b.append(("table", shown))
    return b


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _figure(n_panels: int) -> Figure:
    n_cols = min(n_panels, MAX_COLUMNS)
    n_rows = math.ceil(n_panels / n_cols)
    fig = Figure(figsize=(PANEL_SIZE[0] * n_cols, PANEL_SIZE[1] * n_rows + 0.5), layout="constrained")
    fig.subplots(n_rows, n_cols, squeeze=False)
    for ax in fig.axes[n_panels:]:
        ax.remove()
    return fig


def _save(fig: Figure, plot_dir: Path, name: str) -> Path:
    png = plot_dir / f"{name}.png"
    fig.savefig(png, dpi=FIG_DPI)
    fig.set_layout_engine("none")   # keep the layout just computed: the SVG needs no second layout pass
    fig.savefig(plot_dir / f"{name}.svg")
    return png


def _seed_note(fit: UCurveFit | PowerLawFit) -> str:
    return "single seed: bootstrap over points only" if fit.single_seed else f"{fit.n_seeds} seeds"


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_report(store_dir: Path, out_dir: Path | None = None, *, n_resamples: int = N_RESAMPLES) -> Path:
    """Fit, plot and write report.md, report.html and fits.json for results/<sweep>/; returns report.md's path.

    out_dir defaults to store_dir / "report"; plots go to out_dir / "plots" as PNG and SVG.
    """
    store_dir = Path(store_dir)
    out_dir = Path(out_dir) if out_dir is not None else store_dir / "report"
    runs, curves, spec = read_store(store_dir)
    with single_threaded_blas():   # hundreds of tiny solves: BLAS threads only add wake-ups
        result = analyse(runs, n_resamples=n_resamples)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(result, curves, out_dir / "plots")
    blocks = _blocks(store_dir, spec, result, figures, out_dir)
    md_path = out_dir / "report.md"
    _atomic_text(md_path, _markdown(blocks))
    _atomic_text(out_dir / "report.html", _html(blocks, title=f"Sweep report: {_sweep_name(runs, spec)}"))
    _atomic_text(out_dir / "fits.json", json.dumps(_json_safe(fits_document(store_dir, spec, result)), indent=1,
                                                    allow_nan=False))
    return md_path


def fits_document(store_dir: Path, spec: dict, result: SweepAnalysis) -> dict:
    """fits.json: every fitted parameter with its interval, the verdicts, exclusions and unfitted groups."""
    power_laws = []
    for (experiment, memory, budget), fit in result.power_laws.items():
        x_far = EXTRAPOLATION_FACTOR * float(fit.x.max())
        if isinstance(fit, LogLinearFit):
            extrapolation = {"slots": x_far, "power_law": None, "loglinear": fit.extrapolate(x_far).to_dict()}
            entry = {"form": "L = a - b ln x (log-linear only)", "form_used": "log-linear (too few slot counts)",
                     "loglinear": fit.to_dict()}
        else:
            extrapolation = {"slots": x_far,
                             "power_law": fit.extrapolate(x_far).to_dict() if fit.identified else None,
                             "loglinear": fit.loglinear.extrapolate(x_far).to_dict()}
            entry = fit.to_dict()
        power_laws.append({"experiment": experiment, "memory": memory, "budget": budget, **entry,
                           "extrapolation": extrapolation})
    return {
        "sweep": _sweep_name(result.runs, spec), "store": str(store_dir),
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "n_trials": len(result.runs), "n_usable": len(result.usable),
        "excluded": [{"trial_id": r.trial_id, "experiment": r.experiment, "status": r.status, "reason": r.reason}
                     for r in result.excluded.itertuples()],
        "u_curves": [{"experiment": e, "budget": b, "default": default_u(fits)[0],
                      **{m: f.to_dict() for m, f in fits.items()}} for (e, b), fits in result.u_curves.items()],
        "budget_trends": [{"experiment": e, **t.to_dict()} for e, t in result.trends.items()],
        "power_laws": power_laws,
        "compute_power_laws": [{"experiment": e, "rho": r, **f.to_dict()}
                               for (e, r), f in sorted(result.compute_laws.items())],
        "chinchilla": None if result.chinchilla is None else result.chinchilla.to_dict(),
        "not_fitted": [{"what": w, "reason": r} for w, r in result.not_fitted],
        "dropped_resamples": [{"fit": what, **boot.to_dict()} for what, boot in dropped_resamples(result)],
        "knowledge_mix": None if result.mix is None else result.mix.to_dict(),
    }


def dropped_resamples(result: SweepAnalysis) -> list[tuple[str, Bootstrap]]:
    """(fit, bootstrap) for every fit that dropped any bootstrap resample, in report order."""
    out = []
    for (experiment, budget), fits in result.u_curves.items():
        for name, fit in fits.items():
            out.append((f"U-curve {experiment} @ {_g(budget)} ({name})", fit.bootstrap))
    for (experiment, memory, budget), fit in result.power_laws.items():
        out.append((f"power law {experiment} / {memory} @ {_g(budget)}", fit.bootstrap))
    for (experiment, rho), fit in sorted(result.compute_laws.items()):
        out.append((f"power law over compute {experiment} / rho = {rho:g}", fit.bootstrap))
    if result.chinchilla is not None:
        out.append(("Chinchilla form", result.chinchilla.bootstrap))
    return [(what, boot) for what, boot in out if boot is not None and boot.n_failed]


def _blocks(store_dir: Path, spec: dict, result: SweepAnalysis, figures: dict[str, Path], out_dir: Path) -> list:
    runs, usable = result.runs, result.usable
    level = f"{round(100 * LEVEL)}%"
    b: list = [("h1", f"Sweep report: {_sweep_name(runs, spec)}")]
    data = spec.get("data") or {}
    b.append(("p", f"Results store `{store_dir}`; generated "
                   f"{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. "
                   f"{len(runs)} trials recorded, {len(usable)} usable, {len(result.excluded)} excluded. "
                   f"Loss: `{LOSS_COL}` (nats/token on the held-out split). Intervals: {level} bootstrap "
                   "percentile intervals (seeds resampled, then points; points only for a single seed)."))
    if data:  # the generated corpus's own fields only where it is that corpus (they enter no other trial's id)
        b.append(("p", "Data: " + ", ".join(f"{k} = `{v}`" for k, v in data.items()
                                            if k not in MIX_ONLY_DATA or data.get("corpus") == "mix")))
    if "experiments" in spec:
        b.append(("table", pd.DataFrame([{"experiment": e.get("name"), "kind": e.get("kind"),
                                          "definition": ", ".join(f"{k}={v}" for k, v in e.items()
                                                                  if k not in ("name", "kind"))}
                                         for e in spec["experiments"]])))
    b.append(("h2", "Achieved compute budgets"))
    b.append(("p", "Each trial's horizon comes from its budget; compute = FLOPs per token x tokens trained."))
    b.append(("table", result.budgets))

    if result.u_curves:
        b.append(("h2", "Allocation: loss vs rho (U-curves)"))
        b.append(("p", "Default curve: a cubic in rho (it follows a lopsided U, where a parabola's vertex is "
                       "biased) with one additive offset per seed: trials sharing a seed share their data order "
                       "across rho, so their level differences are taken out before the shape is judged. Checks "
                       "beside it: a parabola, and the cubic without seed offsets. Verdict (rule fixed before "
                       "any real sweep, calibrated on planted truths: docs/analysis.md): 'interior' only when "
                       "the curve falls away from both edges of the sampled range in at least 95% of resamples; "
                       "'boundary' when the loss still falls at an edge in 95%; 'concave' when the curve bends "
                       "down in 95%; 'flat' when its whole range is surely below 0.005 nats; otherwise 'too "
                       "noisy', with the smallest gain the sweep could detect (80% power) and the seeds that "
                       f"would resolve the paper's {REFERENCE_GAIN} nats. Gain = loss(rho=1) - loss at the "
                       "minimum (positive: moving sparse parameters into Engram memory helps)."))
        rows = []
        for (experiment, budget), fits in result.u_curves.items():
            for name, fit in fits.items():
                rows.append({
                    "experiment": experiment, "budget": _g(budget),
                    "curve": name + (" (default)" if name == default_u(fits)[0] else ""),
                    "points": fit.n_points, "seeds": fit.n_seeds, "verdict": fit.verdict,
                    "rho*": str(fit.rho_star) if fit.rho_star else "none claimed",
                    "curve minimum": str(fit.argmin),
                    "loss at minimum": str(fit.loss_at_optimum),
                    "gain vs rho=1": str(fit.gain) if fit.gain else "rho=1 not sampled",
                    "detectable gain": f"{fit.detectable_gain:.3g}" if math.isfinite(fit.detectable_gain) else "-",
                    f"seeds for {REFERENCE_GAIN}": _seeds_text(fit.seeds_for_reference_gain),
                    "P(falls at low edge)": f"{fit.p_falls_at_lo:.2f}", "P(rises at high edge)":
                        f"{fit.p_rises_at_hi:.2f}", "R²": f"{fit.r2:.3f}",
                    "bootstrap": fit.bootstrap.scheme + ("" if fit.n_seeds > 1 else " (single seed)")
                    + (f", {fit.bootstrap.failed_share:.0%} dropped" if fit.bootstrap.n_failed else ""),
                })
        b.append(("table", pd.DataFrame(rows)))
        note = _levels_note([default_u(fits)[1] for fits in result.u_curves.values()], "the loss at the minimum")
        if note:
            b.append(("p", note))
        for (experiment, budget), fits in result.u_curves.items():
            name, fit = default_u(fits)
            fallback = "" if name == DEFAULT_U else f" (the {DEFAULT_U} could not be fitted; the {name} stands in)"
            power = _power_command(store_dir, experiment, budget)
            b.append(("p", f"**{experiment} @ {_g(budget)} FLOPs**{fallback}: {_verdict_text(fit, power)}"))
            caveat = _u_curve_fairness(result.usable, experiment, budget)
            if caveat:
                b.append(("p", caveat))
        blocks_rows = [_offsets_row(e, bud, fits) for (e, bud), fits in result.u_curves.items()
                       if NO_OFFSETS_U in fits and DEFAULT_U in fits]
        if blocks_rows:
            b.append(("h3", "Seeds as blocks"))
            b.append(("p", "Interval widths of the default cubic with per-seed offsets divided by those of the same "
                           "cubic without them (below 1: the offsets tighten the interval), and both verdicts."))
            b.append(("table", pd.DataFrame(blocks_rows)))
        for name, path in figures.items():
            if name.startswith("u_curves_"):
                b.append(("img", path, f"U-curves of {name[len('u_curves_'):]} (a curve is drawn only for an "
                                       "interior or boundary verdict)"))

    if result.trends:
        b.append(("h2", "Across budgets"))
        b.append(("p", "Per budget the U-curve's optimum, then optimum = coefficient x C^exponent by least squares "
                       "in log-log (Chinchilla Approach 2's second stage); intervals redo the regression on the "
                       "per-budget bootstrap draws."))
        for experiment, trend in result.trends.items():
            lines = [f"**{experiment}**:"]
            for label, s in (("rho*", trend.rho_star_scaling), ("best loss", trend.loss_scaling)):
                if s is not None:
                    lines.append(f"{label} = {s.coefficient.value:.4g} x C^{s.exponent.value:.4f} "
                                 f"(exponent {level} interval [{s.exponent.lo:.4f}, {s.exponent.hi:.4f}])."
                                 + (f" WARNING: {s.warning}." if s.warning else ""))
            lines.extend(trend.notes)
            b.append(("p", " ".join(lines)))
            if f"trend_{experiment}" in figures:
                b.append(("img", figures[f"trend_{experiment}"], f"optimum vs compute, {experiment}"))

    if result.compute_laws:
        b.append(("h3", "Loss vs compute at each rho"))
        b.append(("p", "L = E + A C^-alpha over the achieved compute of every trial at one target rho "
                       "(same Huber / L-BFGS recipe as the memory power laws)."))
        b.append(("table", pd.DataFrame([
            {"experiment": e, "rho": _g(r), "points": f.n_points, "seeds": f.n_seeds,
             **_law_cells(f), "R²": f"{f.r2:.4f}"} for (e, r), f in sorted(result.compute_laws.items())])))
        for name, path in figures.items():
            if name.startswith("compute_"):
                b.append(("img", path, f"loss vs compute per rho, {name[len('compute_'):]}"))

    if result.power_laws:
        b.append(("h2", "Memory: loss vs slots (power laws)"))
        b.append(("p", "L = E + A x^-alpha fitted with a Huber loss (delta 1e-3) on log L by multi-start L-BFGS "
                       "(Chinchilla Approach 3 as replicated by Epoch AI); the paper's log-linear L = a - b ln x "
                       f"alongside; extrapolation to {EXTRAPOLATION_FACTOR:g}x the largest slot count sampled. A "
                       "parameter whose interval spans more than a decade (or reaches 0), or every parameter when "
                       "R² < 0, gets no number ('not identified'); the log-linear form is then the one used, for "
                       "the extrapolation too. R² is over single trials, so seed noise caps it: 'log-linear R² from "
                       "seed noise' is what an exact log-linear law would score given how far trials at the same "
                       "slot count scatter (var(fit) / (var(fit) + pooled seed variance)); more seeds do not "
                       "raise it. With two slot counts the line meets both means whatever the law, so neither R² is "
                       "printed (fits.json keeps them)."))
        rows = []
        for (experiment, memory, budget), fit in result.power_laws.items():
            x_far = EXTRAPOLATION_FACTOR * float(fit.x.max())
            only_loglinear = isinstance(fit, LogLinearFit)
            ll = fit if only_loglinear else fit.loglinear
            # With two slot counts a line always passes through the two means: an R² (measured or expected from
            # seed noise) then compares the gap with the seed scatter, not whether loss is linear in ln(slots).
            n_counts = len(np.unique(ll.x))
            untested = f"- ({n_counts} slot counts)" if n_counts < MIN_LINE_TEST_COUNTS else None
            rows.append({"experiment": experiment, "memory": memory, "budget": _g(budget),
                         "points": fit.n_points, "seeds": fit.n_seeds,
                         **({"E": "-", "A": "-", "alpha": "log-linear only"} if only_loglinear
                            else _law_cells(fit)),
                         "form used": "log-linear (too few slot counts)" if only_loglinear
                         else "power law" if fit.identified else "log-linear (power law not identified)",
                         "R²": "-" if only_loglinear else f"{fit.r2:.4f}",
                         "max |residual|": f"{np.max(np.abs(fit.residuals)):.4f}",
                         "log-linear b": str(ll.b), "log-linear R²": untested or f"{ll.r2:.4f}",
                         "log-linear R² from seed noise": untested or ("-" if not np.isfinite(ll.noise_r2)
                                                                       else f"{ll.noise_r2:.2f}"),
                         f"L at {EXTRAPOLATION_FACTOR:g}x max slots":
                             f"{_g(x_far)}: " + str(fit.extrapolate(x_far) if only_loglinear or fit.identified
                                                    else fit.loglinear.extrapolate(x_far)),
                         "bootstrap": (fit.bootstrap.scheme if fit.bootstrap else "-")
                         + ("" if fit.n_seeds > 1 else " (single seed)")})
        b.append(("table", pd.DataFrame(rows)))
        note = _levels_note(result.power_laws.values(), f"E, L at {EXTRAPOLATION_FACTOR:g}x max slots")
        if note:
            b.append(("p", note))
        for (experiment, memory, budget), fit in result.power_laws.items():
            reading = _law_reading(fit, result.usable, experiment, memory, budget)
            if reading:
                b.append(("p", f"**{experiment} / {memory} @ {_g(budget)} FLOPs**: {reading}"))
        if "memory" in figures:
            b.append(("img", figures["memory"], "loss vs memory slots, every memory experiment"))

    if result.chinchilla is not None:
        c = result.chinchilla
        b.append(("h2", "Chinchilla form over active parameters and tokens"))
        cells = _law_cells(c, ("E", "A", "alpha", "B", "beta"))
        text = (f"L = E + A N^-alpha + B D^-beta with " + ", ".join(f"{k} = {v}" for k, v in cells.items())
                + f"; R² {c.r2:.4f}; {c.n_points} points, {c.n_seeds} seeds.")
        if c.identified:
            text += f" Compute-optimal exponents: N* ~ C^{c.n_exponent}, D* ~ C^{c.d_exponent}."
        else:
            text += " Not every parameter is identified, so no compute-optimal exponents are quoted."
        b.append(("p", text))

    if result.mix is not None:
        b.extend(knowledge_mix_blocks(result.mix, figures))

    curve_figs = {n: p for n, p in figures.items() if n.startswith("curves_")}
    if curve_figs:
        b.append(("h2", "Training curves"))
        for name, path in curve_figs.items():
            b.append(("img", path, f"training curves, {name[len('curves_'):]}"))

    b.extend(_diagnostics_blocks(result, figures))
    b.append(("h2", "Excluded trials"))
    if result.excluded.empty:
        b.append(("p", "None: every recorded trial finished with a finite loss."))
    else:
        cols = [c for c in ("trial_id", "experiment", "rho", "slots", "seed", "budget", "status", "attempts")
                if c in result.excluded.columns]
        b.append(("table", result.excluded[cols + ["reason"]].reset_index(drop=True)))
    b.append(("h2", "Dropped bootstrap resamples"))
    dropped = dropped_resamples(result)
    if dropped:
        b.append(("p", f"A resample is dropped when its fit cannot be made; the intervals then describe the kept "
                       f"resamples only. Above {DROP_WARN_SHARE:.0%} dropped, a warning."))
        b.append(("table", pd.DataFrame([
            {"fit": what, "dropped": f"{boot.n_failed} of {boot.n_resamples} ({boot.failed_share:.1%})",
             "reasons": "; ".join(f"{n}: {r}" for r, n in boot.dropped),
             "warning": f"WARNING: {boot.warning}" if boot.warning else "-"} for what, boot in dropped])))
    else:
        b.append(("p", "None: every bootstrap resample of every fit was kept."))
    b.append(("h2", "Groups not fitted"))
    if result.not_fitted:
        b.append(("table", pd.DataFrame(result.not_fitted, columns=["group", "reason"])))
    else:
        b.append(("p", "None."))
    return [(kind, *rest) if kind != "img" else ("img", rest[0].relative_to(out_dir), rest[1], rest[0])
            for kind, *rest in b]


def default_u(fits: dict[str, UCurveFit]) -> tuple[str, UCurveFit]:
    """(name, fit) whose verdict the report states: the cubic, or the parabola where the cubic failed (e.g. 5 rho
    values of one seed, where most resamples keep fewer than the 4 distinct values a cubic needs)."""
    return (DEFAULT_U, fits[DEFAULT_U]) if DEFAULT_U in fits else next(iter(fits.items()))


def _u_curve_rows(usable: pd.DataFrame, experiment: str, budget: float) -> pd.DataFrame:
    return usable[(usable["experiment"] == experiment) & (usable["budget"] == budget)]


def untrained_rhos(usable: pd.DataFrame, experiment: str, budget: float) -> list[float]:
    """The rho points (as the fit places them: achieved where recorded) of one U-curve's trials whose tables
    stayed untrained (median read row under TRAINED_LOOKUPS_PER_ROW); the figures shade them. Empty for a store
    that predates the diagnostics."""
    rows = _u_curve_rows(usable, experiment, budget)
    untrained = diagnostics_table(rows)["untrained"].to_numpy(dtype=bool)
    return sorted({float(r) for r in _x_rho(rows)[untrained]})


UNTRAINED_RHO_LABEL = f"tables untrained (median read row < {TRAINED_LOOKUPS_PER_ROW:g})"


def _u_curve_fairness(usable: pd.DataFrame, experiment: str, budget: float) -> str:
    """One line under a U-curve's verdict when its trials break the fairness standard on tables or routers: the
    rho points whose tables are untrained (median read row under TRAINED_LOOKUPS_PER_ROW) and the trials whose
    experts trained on uneven loads. Empty when there is nothing to say (or the store predates the diagnostics)."""
    table = diagnostics_table(_u_curve_rows(usable, experiment, budget))
    with_tables = table[table["lookups_median"].notna()]
    untrained = with_tables[with_tables["untrained"]]
    uneven = table[table["unbalanced_in_training"]]
    parts = []
    if len(untrained):
        rhos = ", ".join(f"{r:g}" for r in sorted(untrained["rho"].unique()))
        parts.append(f"{len(untrained)} of {len(with_tables)} trials with tables have them untrained (rho {rhos}; "
                     f"median read row {untrained['lookups_median'].min():g}-{untrained['lookups_median'].max():g}, "
                     f"under {TRAINED_LOOKUPS_PER_ROW:g}), so those points set thinly read tables against experts")
    if len(uneven):
        parts.append(f"{len(uneven)} of {int(table['expert_train_load_max'].notna().sum())} MoE trials trained "
                     f"their experts on uneven loads")
    return ("Fairness: " + "; ".join(parts) + " (trial diagnostics below).") if parts else ""


def _levels_note(fits, quantities: str) -> str:
    """A warning under a table of fits whose level intervals (absolute losses) rest on fewer than LEVEL_SEEDS
    seeds; empty otherwise."""
    n_seeds = sorted({f.n_seeds for f in fits if f.n_seeds < LEVEL_SEEDS})
    if not n_seeds:
        return ""
    counts = "/".join(str(n) for n in n_seeds) + (" seed" if n_seeds == [1] else " seeds")
    return (f"Levels ({quantities}) are absolute losses, and with {counts} their intervals are too narrow: a "
            "seed's luck moves every point of it alike, and resampling a few seeds understates that (planted "
            "truths, nominal 90%: the U-curve's loss at the minimum covered 51% / 60% / 83% / 87% of draws with "
            "2 / 3 / 6 / 10 seeds, a power law's extrapolated loss 53% / 83% with 2 / 3; docs/analysis.md). "
            "Compare levels across sweeps only with that in mind; differences within this sweep (rho*, the "
            "gain, slopes) are not affected.")


def _power_command(store_dir: Path | str, experiment: str, budget: float) -> str:
    """The shell command that runs the seed-power study on one experiment and budget of a store, quoted so that it
    can be pasted as printed (a store path with spaces or quotes in it)."""
    args = ["python", "benchmarks/u_curve_power.py", str(store_dir), "--experiment", experiment, "--budget", _g(budget)]
    return shlex.join(args)


def _verdict_text(fit: UCurveFit, power_command: str = "") -> str:
    """The verdict in words. `power_command`: the command that estimates, on this sweep's shape, how many seeds an
    edge-limited too-noisy verdict needs (named only then)."""
    seeds = " Single seed: the interval resamples points only." if fit.single_seed else ""
    text = f"{fit.verdict}: {fit.reason}."
    if fit.verdict == "interior":
        text += f" rho* = {fit.rho_star}"
        if fit.rho_star_edges:
            edges = " and ".join(f"rho = {e:g}" for e in fit.rho_star_edges)
            text += (f" (its interval reaches the edge {edges}: the curve turns, but its minimum is not placed "
                     f"away from that edge)")
        if fit.gain is not None:
            text += (f"; gain over pure MoE (rho = 1) {fit.gain} nats"
                     + (", its interval excludes zero." if fit.gain.lo > 0 else ", its interval includes zero."))
        else:
            text += "."
    elif fit.verdict == "boundary":
        text += " No interior optimum, so no rho* is claimed."
        at_edge = float(fit.curve[0] if fit.edge == float(fit.grid[0]) else fit.curve[-1])
        inside = float(fit.grid[0]) < fit.argmin.value < float(fit.grid[-1])
        if inside and float(fit.curve.min()) < at_edge:
            text += (f" But the fitted curve's lowest point is inside, at rho = {fit.argmin.value:.3g} "
                     f"({float(fit.curve.min()):.4g} nats, against {at_edge:.4g} at rho = {fit.edge:.3g}): the "
                     f"curve dips twice, and the edge slope alone does not make rho = {fit.edge:.3g} its minimum.")
    else:
        text += f" No rho* is claimed (the curve's minimum, {fit.argmin}, is not an estimate of one)."
        if fit.verdict == "too noisy" and fit.seeds_for_fitted_gain is not None and fit.gain is not None:
            text += " " + _what_is_unresolved(fit, power_command)
    if fit.bootstrap.warning:
        text += f" WARNING: {fit.bootstrap.warning}."
    return text + seeds


def _law_reading(fit: PowerLawFit | LogLinearFit, usable: pd.DataFrame, experiment: str, memory: str,
                 budget: float) -> str:
    """One paragraph on a memory law against the bar (LAW_R2_BAR, LAW_MIN_DECADES, every point trained): the
    slope's sign as its interval resolves it, R² against what seed noise allows, the decades of slots, the
    untrained points, and which parts of the bar hold. Empty with fewer than MIN_LINE_TEST_COUNTS slot counts."""
    ll = fit if isinstance(fit, LogLinearFit) else fit.loglinear
    n_counts, decades, enough_counts, enough_decades = law_grid(ll.x)
    if not enough_counts:
        return ""
    if not np.isfinite([ll.b.lo, ll.b.hi]).all():
        slope = f"slope b = {ll.b.value:.3g} per e-fold of slots, no interval"
    elif ll.b.lo > 0:
        slope = f"loss falls with slots, b = {ll.b} per e-fold (interval above 0)"
    elif ll.b.hi < 0:
        slope = f"loss rises with slots, b = {ll.b} per e-fold (interval below 0)"
    else:
        slope = f"no slot effect resolved, b = {ll.b} per e-fold (interval includes 0)"
    noise = (f"; an exact line would score ~{ll.noise_r2:.2f} given the seed scatter" if np.isfinite(ll.noise_r2)
             else "")
    rows = usable[(usable["experiment"] == experiment) & (usable["memory"] == memory)
                  & np.isclose(usable["budget"].astype(float), budget, equal_nan=True)]
    table = diagnostics_table(rows)
    recorded = table[table["lookups_median"].notna()]
    n_untrained = int(recorded["untrained"].sum())
    tables = (f"{n_untrained} of {len(recorded)} trials with untrained tables" if len(recorded)
              else "tables not diagnosed (a store from before the diagnostics)")
    failing = [part for part, holds in (
        ("the slope's interval is not above 0", np.isfinite(ll.b.lo) and ll.b.lo > 0),
        (f"R² {ll.r2:.2f} < {LAW_R2_BAR:g}", ll.r2 >= LAW_R2_BAR),
        (f"{decades:.3f} decades < {LAW_MIN_DECADES:g}", enough_decades),
        ("some slot points untrained" if len(recorded) else "the tables' training not recorded",
         len(recorded) > 0 and n_untrained == 0)) if not holds]
    verdict = (f"Log-linear in slots by the bar (slope above 0, R² >= {LAW_R2_BAR:g}, >= {LAW_MIN_DECADES:g} "
               "decades, every point trained)." if not failing else "Not log-linear by the bar: "
               + "; ".join(failing) + ".")
    return (f"{slope}; log-linear R² {ll.r2:.2f} over {decades:.2f} decades ({n_counts} slot counts, "
            f"{ll.n_points} trials){noise}; {tables}. {verdict}")


def _what_is_unresolved(fit: UCurveFit, power_command: str = "") -> str:
    """For a too-noisy U-curve with a fitted gain: the seeds that gain needs or, when the sweep already detects
    a gain that size, which edge holds the verdict back, which way that edge leans and (with `power_command`) the
    command that estimates the seeds the edges need by simulation on this shape."""
    if fit.seeds_for_fitted_gain > fit.n_seeds:
        return (f"Resolving the fitted gain of {fit.gain.value:.3g} nats would take about "
                f"{_seeds_text(fit.seeds_for_fitted_gain)} seeds.")
    lo, hi = float(fit.rho.min()), float(fit.rho.max())
    edges = []
    for name, rho, p_inward in (("low", lo, fit.p_falls_at_lo), ("high", hi, fit.p_rises_at_hi)):
        if p_inward >= VERDICT_LEVEL:
            continue
        if p_inward >= 0.5:
            edges.append(f"at the {name} edge (rho = {rho:g}) the curve turns inward in only {p_inward:.0%} of "
                         f"resamples")
        else:
            edges.append(f"at the {name} edge (rho = {rho:g}) the loss falls toward the edge in {1 - p_inward:.0%} "
                         f"of resamples, leaning to a minimum there rather than inside")
    return (f"The fitted gain of {fit.gain.value:.3g} nats is already above the smallest this sweep detects "
            f"({fit.detectable_gain:.3g}), so more seeds for the gain are not what it lacks: "
            + "; ".join(edges) + f" (rule: {VERDICT_LEVEL:.0%} inward at both edges)."
            + (f" The seeds the edges need depend on the curve's shape, not only on the gain: `{power_command}` "
               "estimates them from draws planted on this sweep's seed means (seconds to minutes)."
               if power_command else ""))


def _seeds_text(n: int | None) -> str:
    return "-" if n is None else f"{n}+" if n >= 10_000 else str(n)


def _offsets_row(experiment: str, budget: float, fits: dict[str, UCurveFit]) -> dict:
    with_, without = fits[DEFAULT_U], fits[NO_OFFSETS_U]

    def ratio(a, b) -> str:
        wa, wb = a.hi - a.lo, b.hi - b.lo
        return f"{wa / wb:.2f}" if math.isfinite(wa) and math.isfinite(wb) and wb > 0 else "-"

    return {"experiment": experiment, "budget": _g(budget), "seeds": with_.n_seeds,
            "rho interval width ratio": ratio(with_.argmin, without.argmin),
            "gain interval width ratio": ratio(with_.gain, without.gain) if with_.gain and without.gain else "-",
            "detectable gain with / without": f"{with_.detectable_gain:.3g} / {without.detectable_gain:.3g}",
            "verdict with / without": f"{with_.verdict} / {without.verdict}"}


def _law_cells(fit, names=("E", "A", "alpha")) -> dict[str, str]:
    """Each parameter as 'value [lo, hi]', or 'not identified (reason)' with no number."""
    reasons = dict(fit.unidentified)
    return {n: f"not identified ({reasons[n]})" if n in reasons else str(getattr(fit, n)) for n in names}


def _markdown(blocks: list) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "table":
            out.append(_md_table(rest[0]))
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0].as_posix()})  (SVG: `{rest[0].with_suffix('.svg').as_posix()}`)")
    return "\n\n".join(out) + "\n"


def _md_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)"
    cells = [[str(c) for c in frame.columns]] + [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    lines.insert(1, "|" + "---|" * len(frame.columns))
    return "\n".join(lines)


def _html(blocks: list, *, title: str) -> str:
    body = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "p":
            text = html.escape(rest[0])
            for marker, tag in (("**", "b"), ("`", "code")):   # the two inline marks the paragraphs use
                parts = text.split(marker)
                text = "".join(p if i % 2 == 0 else f"<{tag}>{p}</{tag}>" for i, p in enumerate(parts))
            body.append(f"<p>{text}</p>")
        elif kind == "table":
            body.append(rest[0].map(_cell).to_html(index=False, escape=True, border=0) if not rest[0].empty
                        else "<p>(none)</p>")
        elif kind == "img":
            data = base64.b64encode(rest[2].read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(rest[1])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(rest[1])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:3px 6px}"
             "img{max-width:100%}code{background:#f3f3f3}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def _sweep_name(runs: pd.DataFrame, spec: dict) -> str:
    if spec.get("name"):
        return str(spec["name"])
    names = runs["sweep"].dropna().unique() if "sweep" in runs.columns else []
    return ", ".join(map(str, names)) or "unnamed"


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else _g(value)
    return "-" if value is None else str(value)


def _g(value) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
