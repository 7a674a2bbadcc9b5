"""Loss parity and trial wall time of bf16 against fp32: whole default-size trials, paired by seed.

The trial is the spec's largest Engram trial of its first memory experiment (sweep.yaml: 40,800 slots on the
default's backbone and budget, as benchmarks/bench_gpu.py runs it on a GPU), or the one with `--slots` Engram
slots, run once per seed in each precision with everything else equal; validation is fp32 in both
(engram.trial.evaluate). Prints, per seed, the final validation loss of each and their difference, then the
mean paired difference against the seed-to-seed spread of each precision, and the trials' wall and training
times (tokens per second over training steps only). Trials run one after another on one torch thread.

    python -m benchmarks.bench_precision [--seeds 0 1 2] [--slots N] [--spec sweep.yaml]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch

from benchmarks.bench_gpu import trial_under_test
from engram.trial import keep_large_buffers_in_heap, run_trial
from sweeps.plan import Throughput, plan_sweep
from sweeps.spec import load_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("sweep.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--slots", type=int, default=None, help="default: the largest Engram trial")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_large_buffers_in_heap()  # as a sweep's trial workers do

    spec = load_spec(args.spec)
    planned = plan_sweep(spec, throughput=Throughput(1e9, 0.0, "unused"))
    if args.slots is None:
        base = trial_under_test(planned)
    else:
        base = next((t for t in planned if t.kind == "memory" and t.memory == "engram" and t.slots == args.slots),
                    None)
        if base is None:
            parser.exit(2, f"bench_precision: --slots: no Engram trial of {args.spec} has {args.slots} slots\n")
    print(f"trial: {base.experiment}, engram {base.slots} slots, budget {base.budget:.3g} FLOPs, "
          f"{base.tokens} tokens, torch {torch.__version__}, 1 thread")
    results = {}
    for seed in args.seeds:
        for precision in ("fp32", "bf16"):
            train = dataclasses.replace(base.config.train, seed=seed, precision=precision,
                                        checkpoint_interval=None)
            config = dataclasses.replace(base.config, train=train)
            r = run_trial(config, cache_dir=args.cache_dir)
            assert r.status == "ok" and r.precision == precision, (r.status, r.error, r.precision)
            results[seed, precision] = r
            print(f"seed {seed} {precision}: final val {r.final_val_loss:.4f}  wall {r.wall_seconds:6.1f} s  "
                  f"{r.tokens_per_second / 1e3:6.2f}k tok/s (training steps)", flush=True)
    diffs = [results[s, "bf16"].final_val_loss - results[s, "fp32"].final_val_loss for s in args.seeds]
    print()
    print(f"{'seed':>4s} {'fp32':>8s} {'bf16':>8s} {'bf16-fp32':>10s}")
    for seed, d in zip(args.seeds, diffs):
        print(f"{seed:4d} {results[seed, 'fp32'].final_val_loss:8.4f} {results[seed, 'bf16'].final_val_loss:8.4f} "
              f"{d:+10.4f}")
    for precision in ("fp32", "bf16"):
        losses = [results[s, precision].final_val_loss for s in args.seeds]
        print(f"{precision}: mean {statistics.mean(losses):.4f}, "
              f"seed spread (max - min) {max(losses) - min(losses):.4f}"
              f", sd {statistics.stdev(losses) if len(losses) > 1 else float('nan'):.4f}")
    print(f"paired bf16 - fp32: mean {statistics.mean(diffs):+.4f}, max |diff| {max(abs(d) for d in diffs):.4f}")
    for label, attr in (("wall seconds", "wall_seconds"), ("training tok/s", "tokens_per_second")):
        ratio = [getattr(results[s, "bf16"], attr) / getattr(results[s, "fp32"], attr) for s in args.seeds]
        print(f"{label}, bf16 / fp32 per seed: {', '.join(f'{x:.2f}' for x in ratio)}")


if __name__ == "__main__":
    main()
