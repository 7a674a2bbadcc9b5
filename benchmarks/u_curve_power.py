"""How many seeds would the report's U-curve verdict need on a measured shape? Reads one allocation experiment
and budget of a results store, takes its seed means as the truth (loss above the lowest mean at each rho), its
residual sd as the trial noise and the spread of its seed offsets as theirs, and counts over planted draws how
often each seed count gets each verdict (`analysis.synthetic.shape_power`).

    python benchmarks/u_curve_power.py results/allocation-interior [--experiment allocation] [--budget 4.8e12]
        [--seeds 4 8 16 32] [--draws 100] [--resamples 1000] [--methods cubic quadratic spline]

The answer is conditional: the seed means of a few seeds are themselves noisy, so this is "if the means were the
truth", not a promise. Every seed must have trained every rho of the group once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.fits import single_threaded_blas  # noqa: E402
from analysis.report import read_store  # noqa: E402
from analysis.synthetic import measured_shape, shape_power  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--experiment", default=None, help="allocation experiment (default: the only one)")
    parser.add_argument("--budget", type=float, default=None, help="its budget (default: the only one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--methods", nargs="+", default=["cubic"], choices=["cubic", "quadratic", "spline"])
    args = parser.parse_args()

    runs, _, _ = read_store(args.store)
    alloc = runs[(runs["kind"] == "allocation") & (runs["status"] == "ok")]
    for col, want in (("experiment", args.experiment), ("budget", args.budget)):
        if want is None:
            values = sorted(alloc[col].unique())
            if len(values) != 1:
                sys.exit(f"u_curve_power: --{col} needed, the store has "
                         + ", ".join(f"{v:g}" if col == "budget" else str(v) for v in values))
            want = values[0]
        alloc = alloc[np.isclose(alloc[col].astype(float), want)] if col == "budget" else alloc[alloc[col] == want]
    if alloc.empty:
        sys.exit("u_curve_power: no finished allocation trial matches")
    try:  # rho is the target rho, which every seed shares
        points, shape, noise, offset_sd = measured_shape(alloc["rho"].to_numpy(), alloc["final_val_loss"].to_numpy(),
                                                         alloc["seed"].to_numpy())
    except ValueError as err:
        sys.exit(f"u_curve_power: {err}")
    print(f"{args.store}: {len(alloc)} trials, {len(points)} rho x {alloc['seed'].nunique()} seeds; residual sd "
          f"{noise:.4f}, seed-offset sd {offset_sd:.4f}")
    print("shape (mean loss above the lowest mean): "
          + ", ".join(f"rho {r:g}: {s:.4f}" for r, s in zip(points, shape)))
    t0 = time.perf_counter()
    with single_threaded_blas():
        table = shape_power(points, shape, noise=noise, offset_sd=offset_sd, seeds=tuple(args.seeds),
                            n_draws=args.draws, n_resamples=args.resamples, methods=tuple(args.methods))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(3).to_string(index=False))
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
