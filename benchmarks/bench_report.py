"""Full-report figures: a synthetic 200-trial store (analysis.synthetic), then `write_report` with 1,000
bootstrap resamples for every fit and every plot, timed in phases.

    python benchmarks/bench_report.py [--resamples 1000] [--repeats 1] [--keep DIR]

Target (issue 4): the whole report in under 30 s on 2 cores. Phases: reading the store, fitting (all U-curves
with both curves, budget trends, power laws), drawing and saving the plots (PNG + SVG), and the end-to-end
`write_report` call. Also the fitting phase with BLAS left multi-threaded, as a ratio against one thread, because
that setting is what made the difference on a shared machine. Absolute times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.fits import single_threaded_blas  # noqa: E402
from analysis.report import analyse, draw_figures, read_store, write_report  # noqa: E402
from analysis.synthetic import write_synthetic_store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="write the store and report here and keep them")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = (args.keep or Path(tmp)) / "synthetic"
        t0 = time.perf_counter()
        write_synthetic_store(root)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f} (shared machine: absolute times vary)")
        print(f"synthetic store: 200 trials written in {time.perf_counter() - t0:.2f} s")
        for repeat in range(args.repeats):
            t = time.perf_counter()
            runs, curves, _ = read_store(root)
            t_read = time.perf_counter() - t
            t = time.perf_counter()
            with single_threaded_blas():
                result = analyse(runs, n_resamples=args.resamples)
            t_fit = time.perf_counter() - t
            t = time.perf_counter()
            analyse(runs, n_resamples=args.resamples)
            t_fit_threads = time.perf_counter() - t
            t = time.perf_counter()
            figures = draw_figures(result, curves, root / "bench_plots")
            t_plot = time.perf_counter() - t
            t = time.perf_counter()
            write_report(root, n_resamples=args.resamples)
            t_total = time.perf_counter() - t
            n_fits = sum(len(f) for f in result.u_curves.values()) + len(result.power_laws) + len(result.compute_laws) \
                + len(result.trends)
            print(f"[{repeat}] read {t_read:.2f} s | fit {n_fits} groups x {args.resamples} resamples "
                  f"{t_fit:.2f} s (BLAS multi-threaded: {t_fit_threads:.2f} s, x{t_fit_threads / t_fit:.1f}) | "
                  f"{len(figures)} figures PNG+SVG {t_plot:.2f} s | write_report end to end {t_total:.2f} s "
                  f"(target < 30 s)")


if __name__ == "__main__":
    main()
