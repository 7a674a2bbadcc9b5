"""How high the memory law's R^2 can go given the seed noise: the report fits L = a - b ln(slots) to single trials,
so its R^2 has an expectation that more seeds do not raise (the report prints it too, as "log-linear R^2 from
seed noise"; this script adds the seed sd that a target R^2 would need).

    PYTHONPATH=$PWD python scripts/r2_ceiling.py results/default

For every memory experiment, kind and budget (the report's usable trials) with at least three slot counts (with
two, a line meets both means whatever the law, and the report prints no R^2) and a repeated one, one line: the
least-squares slope b and R^2 over the trials, the seed sd (within-slot-point spread, pooled), the sd of the
fitted values over the trials, the R^2 to expect, var(fit) / (var(fit) + seed variance), and the seed sd at which
that expectation would reach --target (default 0.9). A missing or empty store: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from analysis.fits import fit_loglinear, pooled_seed_variance
from analysis.report import MIN_LINE_TEST_COUNTS, read_store, split_usable

PROG = "r2_ceiling"
USER_ERROR = 2


@dataclass(frozen=True)
class Ceiling:
    b: float  # slope of L = a - b ln(slots): the report's log-linear fit (analysis.fits.fit_loglinear)
    r2: float  # its R^2 over the trials
    seed_sd: float  # pooled within-slot-point standard deviation (analysis.fits.pooled_seed_variance)
    fitted_sd: float  # standard deviation of the fitted values over the trials
    expected_r2: float  # fitted variance / (fitted variance + seed variance): LogLinearFit.noise_r2

    def seed_sd_for(self, target: float) -> float:
        """The seed sd at which the expected R^2 would be `target`, the slope and grid unchanged."""
        return self.fitted_sd * np.sqrt((1 - target) / target)


def r2_ceiling(slots, loss) -> Ceiling:
    """Ceiling of the log-linear R^2 over single trials at (slots[i], loss[i]); needs MIN_LINE_TEST_COUNTS (3)
    distinct slot counts and a slot count with at least 2 trials."""
    slots = np.asarray(slots, dtype=float)
    loss = np.asarray(loss, dtype=float)
    n_distinct = len(np.unique(slots))
    if n_distinct < MIN_LINE_TEST_COUNTS or len(slots) <= n_distinct:
        raise ValueError(f"slots: need {MIN_LINE_TEST_COUNTS} distinct slot counts and a repeated one, got "
                         f"{n_distinct} distinct of {len(slots)} trials")
    fit = fit_loglinear(slots, loss)  # its bootstrap intervals are not used here
    return Ceiling(b=fit.b.value, r2=fit.r2, seed_sd=float(np.sqrt(pooled_seed_variance(slots, loss))),
                   fitted_sd=float(np.std(loss - fit.residuals)), expected_r2=fit.noise_r2)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", type=Path, help="a results store (results/<sweep>)")
    parser.add_argument("--target", type=float, default=0.9, help="R^2 to reach (default 0.9, issue 10's bar)")
    args = parser.parse_args(argv)
    if not 0 < args.target < 1:
        print(f"{PROG}: error: --target: expected a number in (0, 1), got {args.target}", file=sys.stderr)
        return USER_ERROR
    try:
        if not args.results_dir.is_dir():
            raise ValueError(f"{args.results_dir}: no such results folder")
        runs, _, _ = read_store(args.results_dir)
    except ValueError as err:
        print(f"{PROG}: error: {str(err).removeprefix('store_dir: ')}", file=sys.stderr)
        return USER_ERROR
    usable, _ = split_usable(runs)  # status ok and a finite loss, as the report
    memory = usable[(usable["kind"] == "memory") & (usable["memory"] != "none")]
    printed = 0
    groups = memory.groupby(["experiment", "memory", "budget"], sort=True, dropna=False)
    for (experiment, kind, budget), trials in groups:
        name = f"{experiment} ({kind}) @ {budget:.3g} FLOPs"
        try:
            c = r2_ceiling(trials["slots"], trials["final_val_loss"])
        except ValueError as err:
            print(f"{name}: skipped: {err}")
            continue
        print(f"{name}: {len(trials)} trials over {trials['slots'].nunique()} slot counts; "
              f"b {c.b:.4f}, R^2 {c.r2:.2f}; seed sd {c.seed_sd:.4f}, fitted sd {c.fitted_sd:.4f}; R^2 to expect "
              f"{c.expected_r2:.2f} however many seeds; {args.target:g} needs a seed sd of "
              f"{c.seed_sd_for(args.target):.4f}")
        printed += 1
    if not printed:
        print(f"{PROG}: error: {args.results_dir}: no memory experiment with {MIN_LINE_TEST_COUNTS} slot counts "
              "and a repeated one",
              file=sys.stderr)
        return USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
