"""Matplotlib drawings of fitted results, each onto an `Axes` the caller owns; nothing here fits or estimates.

- `plot_u_curve`: loss over rho with the points of each seed, the fit, its band and rho* with its interval
  (the Engram paper's Figure 3, left).
- `plot_power_laws`: loss over memory slots on a log axis, one power law (and its band) per memory kind, so
  OverEncoding sits beside Engram (Figure 3, right).
- `plot_training_curves`: validation (or training) loss over tokens, one line per trial, coloured by a value.
- `plot_budget_trend`: rho* and the best loss over compute with their intervals and fitted scaling.
- `plot_isoflop`: Approach 2 parabolas and their vertices, one colour per budget.
- `plot_rho_star_vs_share` / `plot_kind_losses`: the mix corpus's read-outs, rho* against the knowledge share
  and the per-kind validation losses against rho.
Figures are built with `matplotlib.figure.Figure` (no pyplot state), so this is safe in any process.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize

from analysis.fits import BudgetTrend, IsoFlopFit, LogLinearFit, PowerLawFit, UCurveFit

SEED_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
KIND_COLORS = MappingProxyType({"engram": "tab:blue", "overencoding": "tab:orange"})
BAND_ALPHA = 0.2


def plot_u_curve(ax: Axes, fit: UCurveFit, *, title: str | None = None, color: str = "tab:blue") -> None:
    """Points per seed, the fitted curve with its bootstrap band, and rho* with its interval (or the edge)."""
    for i, s in enumerate(np.unique(fit.seed)):
        sel = fit.seed == s
        ax.scatter(fit.rho[sel], fit.loss[sel], marker=SEED_MARKERS[i % len(SEED_MARKERS)], s=22,
                   facecolors="none", edgecolors="0.3", linewidths=0.9, label=f"seed {s}", zorder=3)
    level = int(round(100 * fit.bootstrap.level))
    ax.plot(fit.grid, fit.curve, color=color, lw=1.8, label=f"{fit.method} fit")
    ax.fill_between(fit.grid, fit.curve_lo, fit.curve_hi, color=color, alpha=BAND_ALPHA, lw=0,
                    label=f"{level}% band")
    if fit.rho_star is not None:
        ax.axvline(fit.rho_star.value, color="tab:red", lw=1.2, ls="--",
                   label=f"rho* = {fit.rho_star.value:.2f} [{fit.rho_star.lo:.2f}, {fit.rho_star.hi:.2f}]")
        ax.axvspan(fit.rho_star.lo, fit.rho_star.hi, color="tab:red", alpha=0.08, lw=0)
    else:
        ax.plot([fit.argmin.value], [fit.loss_at_optimum.value], marker="x", color="tab:red", ms=9, ls="none",
                label=f"boundary minimum at rho = {fit.argmin.value:.2f} (no rho* claimed)")
    ax.set_xlabel("allocation ratio rho (share of sparse params in experts; 1 = pure MoE)")
    ax.set_ylabel("validation loss (nats/token)")
    seeds_note = "single seed: points-only bootstrap" if fit.single_seed else f"{fit.n_seeds} seeds"
    ax.set_title(title or f"Loss vs rho ({seeds_note})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


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
        ax.fill_between(xs, lo, hi, color=color, alpha=BAND_ALPHA, lw=0)
        if isinstance(fit, LogLinearFit):
            ax.plot(xs, fit.predict(xs), color=color, lw=1.4, ls="--",
                    label=f"{label}: L = {fit.a.value:.3g} - {fit.b.value:.3g} ln {symbol} (log-linear only)")
            continue
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
            ax_rho.errorbar([budget], [est.value], yerr=[[est.value - est.lo], [est.hi - est.value]], fmt="o",
                            color="tab:blue", capsize=3)
        else:
            ax_rho.plot([budget], [est.value], marker="x", color="tab:red", ls="none", ms=8)
        loss = fit.loss_at_optimum
        ax_loss.errorbar([budget], [loss.value], yerr=[[loss.value - loss.lo], [loss.hi - loss.value]], fmt="o",
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
    for ax, ylabel in ((ax_rho, "rho* (optimal allocation ratio)"), (ax_loss, "loss at the optimum (nats/token)")):
        ax.set_xscale("log")
        ax.set_xlabel("compute budget C (FLOPs)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    ax_rho.set_ylim(-0.05, 1.05)
    ax_rho.set_title(f"{title}rho* vs compute", fontsize=10)
    ax_loss.set_title(f"{title}best loss vs compute", fontsize=10)


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
