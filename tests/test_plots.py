"""analysis.plots: each drawing puts the fitted result on the given Axes, titled and labelled, and saves."""

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.fits import fit_budget_trend, fit_isoflop, fit_loglinear, fit_power_law, fit_u_curve
from analysis.plots import (plot_budget_trend, plot_isoflop, plot_memory_comparison, plot_power_laws,
                            plot_training_curves, plot_u_curve)

RHO = np.repeat([0.0, 0.25, 0.5, 0.75, 1.0], 2)
SEED = np.tile([0, 1], 5)


def _axes():
    return Figure().subplots()


def _legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_u_curve_plot_shows_seeds_fit_band_and_rho_star(tmp_path):
    loss = 3.0 + 0.1 * (RHO - 0.6) ** 2 + np.random.default_rng(0).normal(0, 0.002, len(RHO))
    fit = fit_u_curve(RHO, loss, SEED, n_resamples=100)
    ax = _axes()
    plot_u_curve(ax, fit, title="budget 1e14")
    texts = _legend_texts(ax)
    assert any(t.startswith("rho* = ") for t in texts)
    assert {"seed 0", "seed 1"} <= set(texts)
    assert ax.get_title() == "budget 1e14" and "rho" in ax.get_xlabel() and "loss" in ax.get_ylabel()
    assert ax.collections, "points and band drawn"
    ax.figure.savefig(tmp_path / "u.png")
    ax.figure.savefig(tmp_path / "u.svg")
    assert (tmp_path / "u.png").stat().st_size > 1000 and "<svg" in (tmp_path / "u.svg").read_text()


def test_u_curve_plot_shades_the_rho_points_with_untrained_tables():
    fit = fit_u_curve(RHO, 3.0 + 0.1 * (RHO - 0.6) ** 2, SEED, n_resamples=50)
    ax = _axes()
    plot_u_curve(ax, fit, untrained_rho=[0.0, 0.5], untrained_label="tables untrained")
    grey = [p for p in ax.patches if np.allclose(p.get_facecolor()[:3], 0.5)]
    centres = sorted(p.get_x() + p.get_width() / 2 for p in grey)
    assert np.allclose(centres, [0.0, 0.5])
    assert _legend_texts(ax).count("tables untrained") == 1        # one legend entry for all of them
    ax = _axes()
    plot_u_curve(ax, fit)
    assert "tables untrained" not in _legend_texts(ax)


def test_u_curve_plot_marks_a_boundary_optimum_without_rho_star():
    fit = fit_u_curve(RHO, 3.0 - 0.05 * RHO, SEED, n_resamples=50)
    ax = _axes()
    plot_u_curve(ax, fit)
    texts = _legend_texts(ax)
    assert not any(t.startswith("rho* = ") for t in texts)
    assert any("no rho* claimed" in t for t in texts)


def test_power_law_plot_puts_overencoding_beside_engram():
    x = np.repeat([1e4, 1e5, 1e6, 1e7], 2)
    fits = {kind: fit_power_law(x, e + 2.0 * x ** -0.3, np.tile([0, 1], 4), n_resamples=50)
            for kind, e in (("engram", 2.0), ("overencoding", 2.05))}
    fits["small"] = fit_loglinear([1e4, 1e5], [2.2, 2.15], n_resamples=20)
    ax = _axes()
    plot_power_laws(ax, fits)
    texts = _legend_texts(ax)
    assert sum(t.startswith("engram") for t in texts) == 2          # power law and log-linear
    assert sum(t.startswith("overencoding") for t in texts) == 2
    assert [t for t in texts if t.startswith("small")] == ["small: L = 2.4 - 0.0217 ln x (log-linear only)"]
    assert ax.get_xscale() == "log" and ax.get_title()


def test_training_curves_and_budget_trend_and_isoflop_plots_draw():
    curves = pd.DataFrame({"trial_id": np.repeat(["a", "b"], 5), "tokens": np.tile(np.arange(5) * 100, 2),
                           "val_loss": np.r_[np.linspace(5, 3, 5), np.linspace(5, 2.9, 5)]})
    ax = _axes()
    plot_training_curves(ax, curves, {"a": 0.0, "b": 1.0}, label="rho")
    assert len(ax.get_lines()) == 2 and ax.get_xlabel() == "training tokens"

    fits = [fit_u_curve(RHO, 3.0 - 0.1 * i + 0.1 * (RHO - 0.7) ** 2, SEED, n_resamples=50) for i in range(3)]
    trend = fit_budget_trend([1e14, 1e15, 1e16], fits)
    fig = Figure()
    ax_rho, ax_loss = fig.subplots(1, 2)
    plot_budget_trend(ax_rho, ax_loss, trend)
    assert ax_rho.get_xscale() == "log" and "rho*" in ax_rho.get_ylabel()
    assert any(t.startswith("rho* = ") for t in _legend_texts(ax_rho))

    c = np.repeat([1e18, 1e19], 5)
    x = np.tile(np.geomspace(1e8, 1e10, 5), 2) * np.repeat([1.0, 3.0], 5)
    loss = 2 + 0.1 * (np.log10(x) - np.repeat([9.0, 9.5], 5)) ** 2
    ax = _axes()
    plot_isoflop(ax, fit_isoflop(c, x, loss, n_resamples=20), c, x, loss)
    assert any("C^" in t for t in _legend_texts(ax))


def test_no_u_is_drawn_for_a_concave_or_unresolved_fit():
    cap = fit_u_curve(RHO, 3.0 - 0.2 * (RHO - 0.5) ** 2, SEED, n_resamples=100)   # a cap, as the search drew
    assert cap.verdict == "concave"
    ax = _axes()
    plot_u_curve(ax, cap)
    assert not ax.get_lines() and not any("band" in t for t in _legend_texts(ax))
    assert any("concave: no curve drawn" in t.get_text() for t in ax.texts)
    assert "concave" in ax.get_title()


def test_power_law_plot_draws_the_log_linear_form_when_the_law_is_not_identified():
    x = np.repeat([1e4, 1e5, 1e6, 1e7], 2)
    flat = fit_power_law(x, 3.0 + np.random.default_rng(5).normal(0, 0.01, 8), np.tile([0, 1], 4), n_resamples=100)
    assert not flat.identified
    ax = _axes()
    plot_power_laws(ax, {"engram": flat})
    texts = _legend_texts(ax)
    assert len(texts) == 1 and "power law not identified" in texts[0] and " ln x " in texts[0]


def test_memory_comparison_says_how_many_trials_each_line_averages_and_hollows_untrained_points():
    points = pd.DataFrame({
        "memory": ["none", "none", "engram", "engram", "engram", "engram", "overencoding", "overencoding"],
        "table_params": [0, 0, 1e4, 1e4, 1e5, 1e5, 1e4, 1e5],
        "loss": [4.0, 4.02, 3.95, 3.97, 3.90, 3.92, 3.99, 4.1],
        "untrained": [False, False, False, False, False, True, False, True]})
    ax = _axes()
    plot_memory_comparison(ax, points)
    ax.legend()                                                      # the caller places the legend
    texts = _legend_texts(ax)
    assert "engram (mean of 2 trials per point)" in texts and "overencoding (one trial per point)" in texts
    assert any(t.startswith("no memory: 4.010 (2 trial(s)") for t in texts)
    hollow = [c for c in ax.collections if len(c.get_offsets()) and not len(c.get_facecolors())]
    assert sorted(len(c.get_offsets()) for c in hollow) == [1, 1]     # engram's and OverEncoding's untrained trial
    assert ax.get_xscale() == "log"
