"""Scheduling overhead of the launcher: sweep wall time over the ideal, and per-trial start-up overhead.

    python benchmarks/bench_sweep.py [--spec sweep.yaml] [--max-trials N] [--no-search] [--address ADDR]

Runs the spec (its grid trials, or the first N with --max-trials taken round-robin over the experiments so
that every experiment is represented; and its search experiments unless --no-search) into a fresh temporary
results folder on an embedded local Ray (or ADDR), then prints, all measured within this one run:
- ideal = sum of the trials' training times (TrialResult.wall_seconds) / parallel slots;
- Tune wall time / ideal (target <= 1.10) and the whole launch (Ray start, data preparation) / ideal;
- per-trial start-up overhead: time in the trainable outside run_trial's training loop (imports, data cache,
  model build, the final report), and the scheduling cost per trial = (Tune wall x slots - sum of trial
  wall times) / trials.
The CPU may be shared with other work: say so next to any figure you record (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sweeps.launcher import launch  # noqa: E402
from sweeps.plan import plan_sweep  # noqa: E402
from sweeps.spec import load_spec  # noqa: E402
from sweeps.store import ResultStore  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=ROOT / "sweep.yaml")
    ap.add_argument("--max-trials", type=int, default=None)
    ap.add_argument("--no-search", action="store_true", help="leave out the search experiments")
    ap.add_argument("--address", default=None)
    args = ap.parse_args()

    spec = load_spec(args.spec)
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    spec = dataclasses.replace(spec, results_dir=work, experiments=tuple(
        e for e in spec.experiments if not (args.no_search and e.kind == "search")))
    trials = plan_sweep(spec)
    if args.max_trials is not None:
        trials = _round_robin(trials, args.max_trials)
    n_search = sum(e.n_trials for e in spec.experiments if e.kind == "search")
    est = sum(t.est_seconds for t in trials)
    print(f"{len(trials)} grid trials of {args.spec} ({', '.join(sorted({t.experiment for t in trials}))}) "
          f"+ {n_search} search trials; plan estimate of the grid {est:.0f} trial-seconds; "
          f"cpu_count {os.cpu_count()}")

    store = ResultStore(spec.store_dir)
    s = launch(spec, trials, store, address=args.address, log_path=work / "ray.log", stream=io.StringIO())
    if s.n_recorded != len(trials) + n_search or s.trial_seconds <= 0:
        print(f"only {s.n_recorded}/{len(trials) + n_search} trials recorded; see {s.log_path}")
        return 1
    ideal = s.trial_seconds / s.n_slots
    runs = store.runs()
    print(f"slots {s.n_slots} | trials ok {s.n_ok} diverged {s.n_diverged} failed {s.n_failed}")
    print(f"sum of trial training times {s.trial_seconds:.1f} s (median {runs['wall_seconds'].median():.1f} s)"
          f" -> ideal {ideal:.1f} s")
    print(f"Tune wall {s.tune_seconds:.1f} s -> ratio {s.tune_seconds / ideal:.3f} (target <= 1.10)")
    print(f"whole launch {s.wall_seconds:.1f} s (Ray start, data) -> ratio {s.wall_seconds / ideal:.3f}")
    setup = list(s.setup_seconds)
    print(f"start-up in the trainable: median {statistics.median(setup):.2f} s, max {max(setup):.2f} s "
          f"(first trial of a worker includes importing torch)")
    per_trial = (s.tune_seconds * s.n_slots - s.trial_seconds) / s.n_recorded
    print(f"scheduling cost per trial (slot-seconds not spent training) {per_trial:.2f} s")
    grid_seconds = runs.loc[runs["kind"] != "search", "wall_seconds"].sum()
    print(f"plan estimate / measured trial time (grid) {est / grid_seconds:.2f}")
    return 0


def _round_robin(trials: list, n: int) -> list:
    by_exp: dict[str, list] = {}
    for t in trials:
        by_exp.setdefault(t.experiment, []).append(t)
    out: list = []
    while len(out) < n and any(by_exp.values()):
        for queue in by_exp.values():
            if queue and len(out) < n:
                out.append(queue.pop(0))
    return out


if __name__ == "__main__":
    sys.exit(main())
