"""torch.compile on CPU for a default trial: compile time included, amortised over the trial's steps.

The model is the default sweep's memory-experiment trial (sweep.yaml's backbone, Engram 1e5 slots) at the
precision `auto` resolves to here; the compiled step is the trial's own `train_step` with `torch.compile(model)`
in place of the model (default inductor settings). Eager and compiled models start from the same weights and
see the same batches; each of the first `--first` compiled steps is timed alone (they hold the compilation and
any recompilation), then both run `--steps` steps interleaved and the medians are compared. End to end: a
default trial's steps (its FLOPs budget) cost n x eager median against the first steps + the rest x compiled
median. Times are CPU seconds of this process and its children (compilation may run in worker processes), so
that on a shared machine time spent waiting for a core counts for neither side; wall seconds alongside.

    python -m benchmarks.bench_compile [--first 6] [--steps 8] [--slots 100000]

With `--spec sweep.yaml` the model, training settings, corpus and step count are those of the spec's largest
Engram trial (its memory experiment's top slot count), as `plan` builds it.

    python -m benchmarks.bench_compile --spec sweep.yaml [--first 6] [--steps 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import time

import torch

from engram.accounting import flops_per_token
from engram.config import DataConfig, MemoryConfig, ModelConfig, TrainConfig, horizon_steps
from engram.data import prepare_data
from engram.memory import build_compression
from engram.model import EngramMoE
from engram.trial import build_optimizers, keep_large_buffers_in_heap, resolve_precision, sample_batch, train_step

DEFAULT_BUDGET = 2e12  # FLOPs of a default sweep trial (sweep.yaml)


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its waited-for children (compile workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=int, default=6, help="compiled steps timed one by one (compilation)")
    parser.add_argument("--steps", type=int, default=8, help="steps per variant after that, interleaved")
    parser.add_argument("--slots", type=int, default=100_000)
    parser.add_argument("--max-bytes", type=int, default=4_000_000)
    parser.add_argument("--spec", default=None, help="time this sweep spec's largest Engram trial instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_large_buffers_in_heap()
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1  # compile in this process (and waited-for compilers), so its CPU time counts

    if args.spec:
        from sweeps.plan import Throughput, plan_sweep
        from sweeps.spec import load_spec

        spec = load_spec(args.spec)
        trial = max((t for t in plan_sweep(spec, throughput=Throughput(1.0, 0.0, "not used"))
                     if t.memory == "engram"), key=lambda t: (t.kind == "memory", t.slots))
        cfg, train, data_cfg = trial.config.model, trial.config.train, spec.data
        print(f"{args.spec}: {trial.experiment}, Engram {trial.slots} slots, seed {trial.seed}")
    else:
        cfg = dataclasses.replace(ModelConfig(), memory=MemoryConfig(kind="engram", slots=args.slots))
        train, data_cfg = TrainConfig(flops=DEFAULT_BUDGET), DataConfig(max_bytes=args.max_bytes)
    precision = resolve_precision(train.precision, torch.device("cpu"))
    n_trial_steps = horizon_steps(train, flops_per_token(cfg), cfg.seq_len)
    data = prepare_data(data_cfg, cfg.vocab_size, None, seq_len=cfg.seq_len)
    compression = torch.as_tensor(build_compression(data.token_texts)) if data.token_texts else None
    gen = torch.Generator().manual_seed(0)
    batches = [sample_batch(data.train, train.batch_size, cfg.seq_len, gen) for _ in range(8)]

    def make(compiled: bool):
        torch.manual_seed(0)
        model = EngramMoE(cfg, compression)
        dense, sparse = build_optimizers(model, train)
        params = list(model.parameters())
        runner = torch.compile(model) if compiled else model
        state = {"i": 0}

        def step() -> tuple[float, float]:
            batch = batches[state["i"] % len(batches)]
            state["i"] += 1
            t0, w0 = cpu_seconds(), time.perf_counter()
            train_step(runner, batch, dense, sparse, params, lr=train.lr, train=train, precision=precision)
            return cpu_seconds() - t0, time.perf_counter() - w0

        return step

    eager, compiled = make(False), make(True)
    print(f"torch {torch.__version__}, precision {precision}, 1 thread, load average {os.getloadavg()[0]:.1f}; "
          f"a default trial has {n_trial_steps} steps")
    for _ in range(3):
        eager()
    first = []
    for i in range(args.first):
        cpu, wall = compiled()
        first.append(cpu)
        print(f"compiled step {i + 1}: {cpu:.2f} CPU s ({wall:.1f} wall s)", flush=True)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.steps):
        times["eager"].append(eager()[0])
        times["compiled"].append(compiled()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    eager_trial = n_trial_steps * med["eager"]
    compiled_trial = sum(first) + (n_trial_steps - args.first) * med["compiled"]
    print(f"median step: eager {med['eager'] * 1e3:.0f} ms, compiled {med['compiled'] * 1e3:.0f} ms "
          f"(compiled / eager {med['compiled'] / med['eager']:.2f}); first {args.first} compiled steps "
          f"{sum(first):.1f} CPU s")
    print(f"a default trial's {n_trial_steps} steps: eager {eager_trial:.0f} CPU s, "
          f"compiled {compiled_trial:.0f} CPU s "
          f"(compiled / eager {compiled_trial / eager_trial:.2f}); load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
