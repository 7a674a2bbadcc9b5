"""U-curve calibration study: planted truths (analysis.synthetic.U_TRUTHS) x the issue's noise, grids and seeds
(U_CASES), fitted with each U-curve method; prints per truth the coverage of the 90% and 95% rho* and gain
intervals and the share of each verdict, the worst case, and how much per-seed offsets narrow the intervals.

    python benchmarks/calibrate_u_curve.py [--draws 54] [--resamples 500] [--methods cubic quadratic spline]
                                           [--csv OUT.csv] [--detect]

First, the detectability study (the standard error behind "detectable gain" and "seeds needed" against the
sampling sd of its contrast), the level-coverage study (intervals of absolute losses against seed counts) and the
null study (the verdicts on a truth where rho does nothing); --detect stops there (~2.5 min).

Targets (issue 8): rho* coverage within 5 points of nominal on the truths with an interior optimum, false
"interior" <= 10% on the truths without one, false "boundary" (or "concave") <= 10% on the truths with one.
Run it under `nice -n 10` on a shared machine; the full default run fits 7 x 8 x 54 = 3,024 draws per method.
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

from analysis.fits import fit_u_curve, single_threaded_blas  # noqa: E402
from analysis.synthetic import U_CASES, U_TRUTHS, detectability_calibration, level_coverage_study, \
    null_calibration, planted_u_curve, summarise_calibration, u_curve_calibration  # noqa: E402

OFFSET_SDS = (0.003, 0.03)      # the seed-offset sd, and one ten times larger (real seeds differ more)


def offsets_study(n_draws: int, n_resamples: int, rng_seed: int = 1) -> pd.DataFrame:
    """Median ratio of interval widths (with per-seed offsets / without) for the symmetric truth."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for sd in OFFSET_SDS:
        for noise, n_rho, n_seeds in U_CASES:
            for _ in range(n_draws):
                rho, loss, seed = planted_u_curve("symmetric", n_rho=n_rho, n_seeds=n_seeds, noise=noise, rng=rng,
                                                  seed_offset_sd=sd)
                fits = {off: fit_u_curve(rho, loss, seed, seed_offsets=off, n_resamples=n_resamples, rng=rng)
                        for off in (True, False)}
                rows.append({"offset sd": sd, "noise": noise, **{
                    f"{what} width ratio": (getattr(fits[True], what).hi - getattr(fits[True], what).lo)
                    / (getattr(fits[False], what).hi - getattr(fits[False], what).lo) for what in ("argmin", "gain")},
                    "interior with": fits[True].verdict == "interior",
                    "interior without": fits[False].verdict == "interior"})
    frame = pd.DataFrame(rows)
    return frame.groupby(["offset sd", "noise"]).agg(
        draws=("noise", "size"), rho_width_ratio=("argmin width ratio", "median"),
        gain_width_ratio=("gain width ratio", "median"), interior_with=("interior with", "mean"),
        interior_without=("interior without", "mean")).reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=54, help="draws per (truth, case)")
    parser.add_argument("--resamples", type=int, default=500)
    parser.add_argument("--methods", nargs="+", default=["cubic", "quadratic", "spline"])
    parser.add_argument("--offset-draws", type=int, default=12, help="draws per case for the offsets study")
    parser.add_argument("--csv", type=Path, default=None, help="write every draw here")
    parser.add_argument("--detect", action="store_true",
                        help="only the detectability, level-coverage and null studies (~2.5 min)")
    args = parser.parse_args()
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    print(f"truths: {len(U_TRUTHS)}; cases (noise, rho points, seeds): {list(U_CASES)}; draws per case "
          f"{args.draws}; resamples {args.resamples}")
    frames = []
    with single_threaded_blas():
        t0 = time.perf_counter()
        detect = pd.concat([detectability_calibration(seed_offset_sd=sd).assign(**{"offset sd": sd})
                            for sd in OFFSET_SDS])
        print(f"\n## detectable gain: its standard error against the contrast's sampling sd, linear truth "
              f"({time.perf_counter() - t0:.0f} s)")
        print(detect.round(4).to_string(index=False))
        t0 = time.perf_counter()
        levels = level_coverage_study()
        print(f"\n## levels: coverage of 90% intervals of absolute losses against seeds "
              f"({time.perf_counter() - t0:.0f} s)")
        print(levels.round(3).to_string(index=False))
        t0 = time.perf_counter()
        null = null_calibration()
        print(f"\n## null: verdicts on a constant truth (rho does nothing), cubic, 1000 resamples "
              f"({time.perf_counter() - t0:.0f} s); pooled false claim {null['false claim'].mean():.3f}")
        print(null.round(3).to_string(index=False))
        if args.detect:
            return
        for method in args.methods:
            t0 = time.perf_counter()
            draws = u_curve_calibration(n_draws=args.draws, n_resamples=args.resamples, method=method)
            draws.insert(0, "method", method)
            frames.append(draws)
            summary = summarise_calibration(draws)
            print(f"\n## method = {method} ({time.perf_counter() - t0:.0f} s)")
            print(summary.round(3).to_string(index=False))
            inner = draws[draws["truth"].map(lambda t: U_TRUTHS[t][2])]
            worst = inner.groupby(["truth", "noise", "n_rho", "n_seeds"])[["cover_rho_0.9", "cover_rho_0.95"]].mean()
            print("worst single case (interior truths), 90% / 95%:",
                  f"{worst['cover_rho_0.9'].min():.3f} / {worst['cover_rho_0.95'].min():.3f}")
        t0 = time.perf_counter()
        offsets = offsets_study(args.offset_draws, args.resamples)
    print(f"\n## per-seed offsets vs none, symmetric truth, cubic ({time.perf_counter() - t0:.0f} s): "
          "median ratio of interval widths (with / without)")
    print(offsets.round(3).to_string(index=False))
    if args.csv:
        pd.concat(frames).to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
