"""Matplotlib drawings of fitted results, each onto an `Axes` the caller owns; nothing here fits or estimates.

- `plot_u_curve`: loss over rho with the points of each seed, the fit, its band and rho* with its interval
  (the Engram paper's Figure 3, left); for a concave, flat or too-noisy verdict the points and the reason only,
  so that no figure shows a U the verdict does not claim; rho points with untrained tables shaded.
- `plot_power_laws`: loss over memory slots on a log axis, one power law (and its band) per memory kind, so
  OverEncoding sits beside Engram (Figure 3, right); a power law that is not identified is not drawn, its
  log-linear form is.
- `plot_training_curves`: validation (or training) loss over tokens, one line per trial, coloured by a value.
- `plot_budget_trend`: rho* and the best loss over compute with their intervals and fitted scaling.
- `plot_isoflop`: Approach 2 parabolas and their vertices, one colour per budget.
- `plot_memory_comparison`: no memory, Engram and OverEncoding on one axis of table parameters.
- `plot_rho_star_vs_share` / `plot_kind_losses`: the mix corpus's read-outs, rho* against the knowledge share
  and the per-kind validation losses against rho.
Figures are built with `matplotlib.figure.Figure` (no pyplot state), so this is safe in any process.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.ticker import NullFormatter

from analysis.fits import BudgetTrend, IsoFlopFit, LogLinearFit, PowerLawFit, UCurveFit

SEED_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
KIND_COLORS = MappingProxyType({"engram": "tab:blue", "overencoding": "tab:orange"})
BAND_ALPHA = 0.2


def plot_u_curve(ax: Axes, fit: UCurveFit, *, title: str | None = None, color: str = "tab:blue",
                 untrained_rho: Sequence[float] = (), untrained_label: str = "tables untrained") -> None:
    """Points per seed; then, only when the verdict claims a shape (interior or boundary), the fitted curve with
    its bootstrap band and rho* with its interval (or the edge). Otherwise the verdict and its reason as text.
    `untrained_rho`: rho points whose memory tables stayed outside the trained regime, shaded grey (one legend
    entry, `untrained_label`), so that a reader sees which points set thinly read tables against experts."""
    half = 0.25 * float(np.min(np.diff(np.unique(fit.rho)))) if len(np.unique(fit.rho)) > 1 else 0.02
    for i, r in enumerate(sorted(untrained_rho)):
        ax.axvspan(r - half, r + half, color="0.5", alpha=0.18, lw=0, zorder=0,
                   label=untrained_label if i == 0 else None)
    for i, s in enumerate(np.unique(fit.seed)):
        sel = fit.seed == s
        ax.scatter(fit.rho[sel], fit.loss[sel], marker=SEED_MARKERS[i % len(SEED_MARKERS)], s=22,
                   facecolors="none", edgecolors="0.3", linewidths=0.9, label=f"seed {s}", zorder=3)
    level = int(round(100 * fit.bootstrap.level))
    if fit.draws_curve:
        offsets = ", seed offsets" if fit.seed_offsets else ""
        ax.plot(fit.grid, fit.curve, color=color, lw=1.8, label=f"{fit.method} fit{offsets}")
        ax.fill_between(fit.grid, fit.curve_lo, fit.curve_hi, color=color, alpha=BAND_ALPHA, lw=0,
                        label=f"{level}% band")
    if fit.rho_star is not None:
        ax.axvline(fit.rho_star.value, color="tab:red", lw=1.2, ls="--",
                   label=f"rho* = {fit.rho_star.value:.2f} [{fit.rho_star.lo:.2f}, {fit.rho_star.hi:.2f}]")
        ax.axvspan(fit.rho_star.lo, fit.rho_star.hi, color="tab:red", alpha=0.08, lw=0)
    elif fit.verdict == "boundary":
        i_edge = 0 if fit.edge == fit.grid[0] else -1
        ax.plot([fit.edge], [fit.curve[i_edge]], marker="x", color="tab:red", ms=9, ls="none",
                label=f"boundary: minimum at or beyond rho = {fit.edge:.2f} (no rho* claimed)")
    else:   # the reason sits in headroom above the points, so it hides none of them
        lo, hi = float(fit.loss.min()), float(fit.loss.max())
        span = max(hi - lo, 1e-3 * max(abs(hi), 1.0))
        ax.set_ylim(lo - 0.08 * span, hi + 0.9 * span)     # the text keeps to the left, the legend the right
        ax.text(0.02, 0.98, f"{fit.verdict}: no curve drawn\n" + textwrap.fill(fit.reason, 56),
                transform=ax.transAxes, va="top", ha="left", fontsize=7,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.7"})
    ax.set_xlabel("allocation ratio rho (share of sparse params in experts; 1 = pure MoE)")
    ax.set_ylabel("validation loss (nats/token)")
    seeds_note = "single seed: points-only bootstrap" if fit.single_seed else f"{fit.n_seeds} seeds"
    ax.set_title(title or f"Loss vs rho ({seeds_note}): {fit.verdict}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right" if not fit.draws_curve else "best")   # no curve: the headroom


def plot_power_laws(ax: Axes, fits: Mapping[str, PowerLawFit | LogLinearFit], *,
                    title: str = "Loss vs memory slots", xlabel: str = "memory slots (table rows, log scale)",
                    symbol: str = "x", loglinear: bool = True) -> None:
    """One law per label (e.g. memory kind) with its points: the power law solid with its band and (optionally)
    the log-linear form dashed; a group fitted only in the log-linear form gets the dashed line and its band.
    `symbol` names the variable in the legend's formulas."""
    for i, (label, fit) in enumerate(fits.items()):
        color = KIND_COLORS.get(label, f"C{i + 2}")
        ax.scatter(fit.x, fit.loss, s=16, color=color, alpha=0.7, zorder=3)
        xs = np.geomspace(fit.x.min(), fit.x.max(), 200)
        lo, hi = fit.predict_band(xs)
        if isinstance(fit, LogLinearFit):
            ax.fill_between(xs, lo, hi, color=color, alpha=BAND_ALPHA, lw=0)
            ax.plot(xs, fit.predict(xs), color=color, lw=1.4, ls="--",
                    label=f"{label}: L = {fit.a.value:.3g} - {fit.b.value:.3g} ln {symbol} (log-linear only)")
            continue
        if not fit.identified:   # no number, no curve: the log-linear form stands in, with its own band
            ll = fit.loglinear
            ax.fill_between(xs, *ll.predict_band(xs), color=color, alpha=BAND_ALPHA, lw=0)
            ax.plot(xs, ll.predict(xs), color=color, lw=1.4, ls="--",
                    label=f"{label}: L = {ll.a.value:.3g} - {ll.b.value:.3g} ln {symbol} "
                          f"(power law not identified: {', '.join(n for n, _ in fit.unidentified)})")
            continue
        ax.fill_between(xs, lo, hi, color=color, alpha=BAND_ALPHA, lw=0)
        ax.plot(xs, fit.predict(xs), color=color, lw=1.8,
                label=f"{label}: L = {fit.E.value:.3g} + {fit.A.value:.3g} {symbol}^-{fit.alpha.value:.3g} "
                      f"(R² {fit.r2:.3f})")
        if loglinear:
            ax.plot(xs, fit.loglinear.predict(xs), color=color, lw=1.0, ls="--",
                    label=f"{label}: L = {fit.loglinear.a.value:.3g} - {fit.loglinear.b.value:.3g} ln {symbol}")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")


def plot_training_curves(ax: Axes, curves: pd.DataFrame, color_by: Mapping[str, float], *, label: str,
                         loss_col: str = "val_loss", log_color: bool = False, title: str = "Training curves") -> None:
    """One line per trial_id in `curves` (columns trial_id, tokens, `loss_col`), coloured by color_by[trial_id]."""
    values = np.array([v for v in color_by.values() if np.isfinite(v)], dtype=float)
    if len(values) and log_color and np.all(values > 0):
        norm = LogNorm(values.min(), max(values.max(), values.min() * 1.0001))
    else:
        norm = Normalize(values.min() if len(values) else 0.0, values.max() if len(values) else 1.0)
    cmap = colormaps["viridis"]
    for trial_id, points in curves.groupby("trial_id", sort=False):
        points = points[np.isfinite(points[loss_col])].sort_values("tokens")
        if points.empty or trial_id not in color_by:
            continue
        ax.plot(points["tokens"], points[loss_col], lw=0.8, alpha=0.7, color=cmap(norm(color_by[trial_id])))
    mappable = ax.figure.colorbar(_scalar_mappable(norm, cmap), ax=ax)
    mappable.set_label(label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"{'validation' if loss_col == 'val_loss' else 'training'} loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def _scalar_mappable(norm, cmap) -> ScalarMappable:
    return ScalarMappable(norm=norm, cmap=cmap)


def plot_budget_trend(ax_rho: Axes, ax_loss: Axes, trend: BudgetTrend, *, title: str = "") -> None:
    """rho* (interior budgets; boundary budgets as crosses at their edge) and the best loss over compute."""
    for budget, fit in zip(trend.budgets, trend.fits):
        est = fit.argmin
        if fit.rho_star is not None:
            ax_rho.errorbar([budget], [est.value], yerr=_yerr(est), fmt="o",
                            color="tab:blue", capsize=3)
        elif fit.verdict == "boundary":
            ax_rho.plot([budget], [fit.edge], marker="x", color="tab:red", ls="none", ms=8)
        else:   # no optimum claimed and no edge either: a grey mark at the curve's minimum, not an estimate
            ax_rho.plot([budget], [est.value], marker="o", mfc="none", color="0.6", ls="none", ms=7)
        loss = fit.loss_at_optimum
        ax_loss.errorbar([budget], [loss.value], yerr=_yerr(loss), fmt="o",
                         color="tab:green", capsize=3)
    cs = np.geomspace(trend.budgets.min(), trend.budgets.max(), 100)
    if trend.rho_star_scaling is not None:
        s = trend.rho_star_scaling
        ax_rho.plot(cs, s.predict(cs), color="tab:blue", lw=1.2,
                    label=f"rho* = {s.coefficient.value:.3g} C^{s.exponent.value:.3f} "
                          f"[{s.exponent.lo:.3f}, {s.exponent.hi:.3f}]")
    if trend.loss_scaling is not None:
        s = trend.loss_scaling
        ax_loss.plot(cs, s.predict(cs), color="tab:green", lw=1.2,
                     label=f"L* = {s.coefficient.value:.3g} C^{s.exponent.value:.3f} "
                           f"[{s.exponent.lo:.3f}, {s.exponent.hi:.3f}]")
    ax_rho.plot([], [], marker="x", color="tab:red", ls="none", label="boundary optimum (no rho*)")
    if any(f.verdict not in ("interior", "boundary") for f in trend.fits):
        ax_rho.plot([], [], marker="o", mfc="none", color="0.6", ls="none",
                    label="concave / flat / too noisy (no rho*)")
    for ax, ylabel in ((ax_rho, "rho* (optimal allocation ratio)"), (ax_loss, "loss at the optimum (nats/token)")):
        ax.set_xscale("log")
        ax.set_xlabel("compute budget C (FLOPs)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    ax_rho.set_ylim(-0.05, 1.05)
    ax_rho.set_title(f"{title}rho* vs compute", fontsize=10)
    ax_loss.set_title(f"{title}best loss vs compute", fontsize=10)


def _yerr(est) -> list[list[float]]:
    """Error-bar lengths of a percentile interval, which need not contain its point estimate (then 0 that side)."""
    return [[max(est.value - est.lo, 0.0)], [max(est.hi - est.value, 0.0)]]


def plot_isoflop(ax: Axes, fit: IsoFlopFit, compute, x, loss, *, xlabel: str = "training tokens") -> None:
    """Approach 2: the points of each budget, its vertex (filled when interior) and the fitted x* = A C^b."""
    compute, x, loss = (np.asarray(v, dtype=float) for v in (compute, x, loss))
    norm = LogNorm(compute.min(), max(compute.max(), compute.min() * 1.0001))
    cmap = colormaps["plasma"]
    for v in fit.vertices:
        sel = compute == v.budget
        color = cmap(norm(v.budget))
        ax.scatter(x[sel], loss[sel], s=12, color=color, alpha=0.7)
        ax.plot([v.x_star], [v.loss_star], marker="*", ms=10, color=color,
                markeredgecolor="k" if v.interior else color, ls="none")
    s = fit.scaling
    ax.plot([], [], marker="*", color="k", ls="none",
            label=f"vertices; x* = {s.coefficient.value:.3g} C^{s.exponent.value:.4f} "
                  f"[{s.exponent.lo:.4f}, {s.exponent.hi:.4f}]")
    ax.set_xscale("log")
    ax.set_xlabel(f"{xlabel} (log scale)")
    ax.set_ylabel("loss")
    ax.set_title("iso-FLOP profiles (Chinchilla Approach 2)", fontsize=10)
    ax.figure.colorbar(_scalar_mappable(norm, cmap), ax=ax).set_label("compute budget (FLOPs)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def plot_memory_comparison(ax: Axes, points: pd.DataFrame, *, title: str = "No memory, Engram and OverEncoding",
                           ) -> None:
    """Loss over table parameters for each memory kind with tables, and the memory-free model as a level line.

    `points`: one row per trial with columns memory, table_params, loss and untrained (bool). Seed means are
    joined by a line; single trials are dots, hollow where the trial's tables stayed outside the trained regime
    (analysis.diagnostics). kind "none" (table_params 0) is drawn as its mean (line) and seed range (band).
    """
    none = points[points["memory"] == "none"]
    if len(none):
        ax.axhspan(none["loss"].min(), none["loss"].max(), color="0.5", alpha=BAND_ALPHA, lw=0)
        ax.axhline(none["loss"].mean(), color="0.3", lw=1.4, ls="--",
                   label=f"no memory: {none['loss'].mean():.3f} ({len(none)} trial(s), band = range)")
    for i, (kind, rows) in enumerate(sorted((k, r) for k, r in points.groupby("memory") if k != "none")):
        color = KIND_COLORS.get(kind, f"C{i + 2}")
        trained = rows[~rows["untrained"].astype(bool)]
        untrained = rows[rows["untrained"].astype(bool)]
        ax.scatter(trained["table_params"], trained["loss"], s=18, color=color, zorder=3)
        ax.scatter(untrained["table_params"], untrained["loss"], s=18, facecolors="none", edgecolors=color,
                   zorder=3)
        means = rows.groupby("table_params")["loss"].mean()
        n = rows.groupby("table_params").size()
        per_point = "one trial per point" if n.max() == 1 else (
            f"mean of {n.min()} trials per point" if n.min() == n.max() else f"mean of {n.min()}-{n.max()} trials")
        ax.plot(means.index, means.to_numpy(), color=color, lw=1.6, marker="_", label=f"{kind} ({per_point})")
    if len(points[points["memory"] != "none"]):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # within a decade, minor labels overprint each other
    ax.set_xlabel("memory table parameters (log scale); hollow: outside the trained regime")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")


# ---------------------------------------------------------------------------------------------------------------
# The mix corpus (engram.mixcorpus): rho* against the knowledge share, per-kind losses against rho

KIND_LOSS_COLORS = MappingProxyType({"knowledge": "tab:green", "computation": "tab:purple", "total": "0.3"})


def plot_rho_star_vs_share(ax: Axes, fits: Mapping[float, UCurveFit], *,
                           title: str = "rho* vs knowledge share") -> None:
    """rho* with its interval at each knowledge share (filled); a boundary verdict shows its grid-edge minimum
    as a hollow marker without an interval (no rho* is claimed there)."""
    shares = sorted(fits)
    for share in shares:
        fit = fits[share]
        if fit.rho_star is not None:
            est = fit.rho_star
            ax.errorbar([share], [est.value], yerr=[[est.value - est.lo], [est.hi - est.value]], fmt="o",
                        color="tab:red", capsize=4, label="interior rho* (interval)")
        else:
            ax.plot([share], [fit.argmin.value], marker="o", mfc="none", color="tab:red", ls="none",
                    label="boundary minimum (no rho*)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("knowledge share of the corpus")
    ax.set_ylabel("rho* (1 = pure MoE, 0 = all memory)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def plot_kind_losses(ax: Axes, losses: pd.DataFrame, *, title: str = "Loss per token kind vs rho") -> None:
    """`losses`: columns rho, kind ("knowledge" | "computation" | "total") and loss (one row per trial); the mean
    over the rows at each rho is joined by a line, each trial is a point."""
    for kind, rows in losses.groupby("kind", sort=False):
        color = KIND_LOSS_COLORS.get(kind, None)
        ax.scatter(rows["rho"], rows["loss"], s=14, color=color, alpha=0.6)
        mean = rows.groupby("rho", sort=True)["loss"].mean()
        ax.plot(mean.index, mean.to_numpy(), color=color, lw=1.5, marker="o", ms=3, label=kind)
    ax.set_xlabel("allocation ratio rho (1 = pure MoE)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
