"""How a sweep's trials run against the plan's timed training step: the measurement behind sweeps.plan.TRIAL_OVER_STEP.

    PYTHONPATH=$PWD python scripts/measure_eta.py results/default [results/data-rich ...]

For every store (a finished run's results folder, its spec.yaml inside), one line per experiment: the FLOP/s of the
lone timed step of the experiment's timing model (sweeps.plan.step_flops_per_second, as `plan` measures it, on the
spec's cpus_per_trial threads), the median training compute per wall second of the experiment's finished trials
(`compute / wall_seconds`, as the store's "measured" throughput), and their ratio. Then, per store, the ratio of the
harmonic means (what `plan` multiplies by TRIAL_OVER_STEP) and the plan's ETA for those trials with
TRIAL_OVER_STEP against their measured wall seconds summed over the trials at once (what the ETA models).
Run it on an idle machine: the lone step is timed now, the trials were timed when they ran. A store that is not a
results folder: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Sequence

from analysis.report import read_store
from sweeps.plan import (TRIAL_OVER_STEP, Throughput, STARTUP_SECONDS, parallel_slots, plan_sweep,
                         step_flops_per_second, timing_models)
from sweeps.spec import SpecError, load_spec

PROG = "measure_eta"
USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+", type=Path, help="results folders of finished runs")
    args = parser.parse_args(argv)
    for store in args.stores:
        try:
            runs = read_store(store)[0]
            spec = load_spec(store / "spec.yaml")
        except (ValueError, SpecError, OSError) as err:
            print(f"{PROG}: {store}: {err}", file=sys.stderr)
            return USER_ERROR
        ok = runs[(runs["status"] == "ok") & (runs["wall_seconds"] > 0)]
        threads = max(1, int(spec.resources.cpus_per_trial))
        print(f"{store} (d_model {spec.model.d_model}, vocabulary {spec.model.vocab_size}, {len(ok)} finished trials)")
        step_rates, trial_rates = [], []
        for name, model in timing_models(spec).items():
            done = ok[ok["experiment"] == name]
            if done.empty:
                continue
            step = step_flops_per_second(model, spec.train, threads=threads)
            trial = statistics.median((done["compute"] / done["wall_seconds"]).tolist())
            step_rates.append(step)
            trial_rates.append(trial)
            print(f"  {name}: lone step {step / 1e9:.1f} GFLOP/s, sweep trials {trial / 1e9:.1f} GFLOP/s "
                  f"(median of {len(done)}), ratio {trial / step:.3f}")
        if not step_rates:
            continue
        step_h = len(step_rates) / sum(1 / r for r in step_rates)
        trial_h = len(trial_rates) / sum(1 / r for r in trial_rates)
        print(f"  harmonic means: lone step {step_h / 1e9:.1f}, trials {trial_h / 1e9:.1f} GFLOP/s, "
              f"ratio {trial_h / step_h:.3f}")
        if TRIAL_OVER_STEP is not None:
            throughput = Throughput(step_h * TRIAL_OVER_STEP, STARTUP_SECONDS, "timed")
            done_ids = set(ok["trial_id"])
            planned = [t for t in plan_sweep(spec, throughput=throughput) if t.trial_id in done_ids]
            slots = parallel_slots(spec)
            eta = sum(t.est_seconds for t in planned) / slots
            trial_time = ok[ok["trial_id"].isin({t.trial_id for t in planned})]["wall_seconds"].sum() / slots
            print(f"  the plan's ETA with TRIAL_OVER_STEP {TRIAL_OVER_STEP} for its {len(planned)} grid trials: "
                  f"{eta / 60:.1f} min; their wall seconds over {slots} at once: {trial_time / 60:.1f} min "
                  f"(ETA / measured {eta / trial_time:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
