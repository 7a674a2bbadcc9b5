"""The README's two figures from a results store: the allocation U-curve with its verdict, and loss against memory
(Engram, the memory-free point and OverEncoding on one axis).

    PYTHONPATH=$PWD python scripts/readme_figures.py results/default docs/figures

writes OUT_DIR/allocation.png and OUT_DIR/memory.png (small PNGs: 6 x 3.5 in at 100 dpi); `--only memory`
(or `allocation`) writes that one, for a store without the other experiment, under `--name` if given:

    PYTHONPATH=$PWD python scripts/readme_figures.py results/memory-untied docs/figures --only memory \
        --name memory-untied.png

The fits and the drawings are the report's own (analysis.report.analyse, analysis.plots); nothing is fitted
here. The figures asked for are built before any is written, so a store that cannot give them writes nothing:
one line on stderr and exit status 2, as for a missing or empty store.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from analysis.fits import N_RESAMPLES, LogLinearFit, single_threaded_blas
from analysis.plots import plot_memory_comparison, plot_u_curve
from analysis.report import (UNTRAINED_RHO_LABEL, SweepAnalysis, analyse, default_u, memory_comparison_points,
                             read_store, untrained_rhos)

PROG = "readme_figures"
USER_ERROR = 2
FIG_SIZE = (6.0, 3.5)  # inches: ~600 x 350 px at FIG_DPI, a few tens of KB as PNG
FIG_DPI = 100
TITLE_WIDTH = 75  # characters per title line at the plots' 10 pt in 6 inches
FIGURES = ("allocation", "memory")
ALLOCATION_EXPERIMENT = "allocation"  # the default sweep's name for it; otherwise the first allocation experiment


class FigureError(ValueError):
    """The store cannot give a README figure (one line, exit status 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", type=Path, help="a results store (results/<sweep>)")
    parser.add_argument("out_dir", type=Path, help="folder for allocation.png and memory.png (created)")
    parser.add_argument("--experiment", default=None,
                        help=f"allocation experiment to draw (default: {ALLOCATION_EXPERIMENT!r} if the store has "
                             "it, else the first allocation experiment)")
    parser.add_argument("--only", choices=FIGURES, default=None, help="write only this figure")
    parser.add_argument("--name", default=None,
                        help="file name for the one figure of --only (default: <figure>.png)")
    parser.add_argument("--resamples", type=int, default=N_RESAMPLES,
                        help=f"bootstrap resamples per fit (default: the report's {N_RESAMPLES})")
    args = parser.parse_args(argv)
    if args.name is not None and (args.only is None or not args.name.endswith(".png") or "/" in args.name):
        parser.error("--name needs --only and a bare file name ending in .png")
    try:
        if not args.results_dir.is_dir():
            raise FigureError(f"{args.results_dir}: no such results folder")
        try:
            runs, _, _ = read_store(args.results_dir)
        except ValueError as err:  # no runs/ folder, or no finished trial in it
            raise FigureError(str(err).removeprefix("store_dir: ")) from None
        with single_threaded_blas():
            result = analyse(runs, n_resamples=args.resamples)
        figures = {}
        if args.only in (None, "allocation"):
            figures["allocation.png"] = allocation_figure(result, args.experiment)
        if args.only in (None, "memory"):
            figures["memory.png"] = memory_figure(result)
        if args.name is not None:
            figures = {args.name: figures.popitem()[1]}
    except FigureError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return USER_ERROR
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, fig in figures.items():
        fig.savefig(args.out_dir / name, dpi=FIG_DPI)
        print(args.out_dir / name)
    return 0


def allocation_figure(result: SweepAnalysis, experiment: str | None = None) -> Figure:
    """The U-curve of `experiment` (see main) at its largest budget, titled with its verdict."""
    alloc = result.usable.loc[result.usable["kind"] == "allocation", "experiment"] \
        if "kind" in result.usable.columns else result.usable["experiment"]
    fitted = [e for e in dict.fromkeys(alloc) if any(k[0] == e for k in result.u_curves)]
    if experiment is None:
        experiment = ALLOCATION_EXPERIMENT if ALLOCATION_EXPERIMENT in fitted else (fitted or [None])[0]
    if experiment not in fitted:
        raise FigureError(f"no fitted allocation U-curve for {experiment or 'any experiment'} "
                          f"(fitted: {', '.join(fitted) or 'none'}; not fitted: "
                          f"{'; '.join(w for w, _ in result.not_fitted if 'U-curve' in w) or '-'})")
    budget = max(b for e, b in result.u_curves if e == experiment)
    fit = default_u(result.u_curves[(experiment, budget)])[1]
    headline = fit.verdict
    if fit.rho_star is not None:
        headline += f", rho* = {fit.rho_star.value:.2f} [{fit.rho_star.lo:.2f}, {fit.rho_star.hi:.2f}]"
    if fit.rho_star is not None and fit.gain is not None:   # the report states a gain with an interior optimum
        headline += f", gain vs rho=1 {fit.gain.value:.3f} [{fit.gain.lo:.3f}, {fit.gain.hi:.3f}] nats"
    fig = _figure()
    plot_u_curve(fig.axes[0], fit, title=textwrap.fill(f"{experiment} at C = {budget:.2g} FLOPs: {headline}",
                                                       TITLE_WIDTH),
                 untrained_rho=untrained_rhos(result.usable, experiment, budget),
                 untrained_label=UNTRAINED_RHO_LABEL)
    return fig


def memory_figure(result: SweepAnalysis) -> Figure:
    """No memory, Engram and OverEncoding over table parameters at the largest budget that has Engram and a
    second kind; the title gives Engram's log-linear slope over slots (the paper's form) with its interval."""
    groups = {b: g for b, g in memory_comparison_points(result.usable).items()
              if "engram" in set(g["memory"]) and g["memory"].nunique() >= 2}
    if not groups:
        raise FigureError("no memory experiment with Engram beside the memory-free point or OverEncoding at one "
                          "budget")
    budget = max(groups)
    laws = [f for (_, m, b), f in result.power_laws.items() if m == "engram" and np.isclose(b, budget)]
    title = f"Memory at C = {budget:.2g} FLOPs"
    if laws:
        ll = laws[0] if isinstance(laws[0], LogLinearFit) else laws[0].loglinear
        interval = (f" [{ll.b.lo:.3g}, {ll.b.hi:.3g}]" if np.isfinite([ll.b.lo, ll.b.hi]).all()
                    else " (no interval)")
        title += f": Engram L = a - b ln(slots), b = {ll.b.value:.3g}{interval}, R² {ll.r2:.2f}"
    fig = _figure()
    plot_memory_comparison(fig.axes[0], groups[budget], title=textwrap.fill(title, TITLE_WIDTH))
    fig.axes[0].legend(fontsize=7, loc="best")
    return fig


def _figure() -> Figure:
    fig = Figure(figsize=FIG_SIZE, layout="constrained")
    fig.subplots()
    return fig


if __name__ == "__main__":
    sys.exit(main())
