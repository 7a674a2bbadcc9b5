"""Benchmarks of one training step of a trial (engram/trial.py), on one CPU thread; prints ratios measured in one run.

(a) MFU at the default trial size: achieved FLOP/s (flops_per_token x tokens per step / step time) over the
    FLOP/s of a large fp32 matmul measured in the same process (target >= 0.5).
(b) Engram is O(1) in slots: step time with 64x the base Engram slots over step time with the base slots, full
    optimiser step including SparseAdam (target <= 1.15).
(c) Engram overhead: step time at rho = 0.8 over rho = 1.0 from engram.accounting.solve_allocation, same P_act
    (target <= 1.15).
(d) Hashing time as a share of a step (target < 5%).

Steps are the trial's own `train_step` (fused AdamW + SparseAdam, clipping, router-bias update) on real batches of
the stdlib corpus. Times are this thread's CPU time (time.thread_time; with one torch thread all the work runs
on it), so other processes competing for the cores inflate neither a step nor the matmul reference; the steps
of the configurations compared run in interleaved rounds and the median per step is used, so drift in the load
of a shared machine affects both sides of a ratio alike.

As in a sweep's trial workers, glibc is first told to keep large buffers in the heap
(engram.trial.keep_large_buffers_in_heap); `--glibc-defaults` measures without that.

    python -m benchmarks.bench_trial [--rounds 5] [--steps 4] [--max-bytes 4000000] [--glibc-defaults]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from engram.accounting import flops_per_token, p_tot_for_ratio, param_counts, solve_allocation
from engram.config import DataConfig, MemoryConfig, ModelConfig, TrainConfig
from engram.data import prepare_data
from engram.memory import Engram, build_compression
from engram.model import EngramMoE
from engram.trial import build_optimizers, keep_large_buffers_in_heap, sample_batch, train_step

MATMUL_N = 2048  # fp32 matmul size for the reference FLOP/s: large enough to run at the core's peak
BASE_SLOTS = 1 << 16  # Engram rows over all tables of the base model of (b)
SLOTS_FACTOR = 64
P_TOT_RATIO = 4.0  # P_tot / P_act of the (c) allocation, as in the default sweep


@dataclasses.dataclass
class StepBench:
    """A model with its optimisers and a pool of real training batches; `step()` runs one train_step."""

    model: EngramMoE
    run_step: Callable[[], None]
    tokens_per_step: int
    flops_per_token: float


def make_bench(cfg: ModelConfig, train: TrainConfig, tokens: np.ndarray, compression: torch.Tensor | None,
               n_batches: int = 8) -> StepBench:
    torch.manual_seed(0)
    model = EngramMoE(cfg, compression)
    model.train()
    dense_opt, sparse_opt = build_optimizers(model, train)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    batches = [sample_batch(tokens, train.batch_size, cfg.seq_len, gen) for _ in range(n_batches)]
    state = {"i": 0}

    def run_step() -> None:
        batch_BT = batches[state["i"] % n_batches]
        state["i"] += 1
        train_step(model, batch_BT, dense_opt, sparse_opt, params, lr=train.lr, train=train)

    return StepBench(model, run_step, train.batch_size * cfg.seq_len, flops_per_token(cfg))


def time_interleaved(benches: dict[str, Callable[[], None]], n_rounds: int,
                     n_steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median (thread CPU seconds, wall seconds) per call of each function, in interleaved rounds after a warm-up."""
    for fn in benches.values():
        fn()
    cpu: dict[str, list[float]] = {name: [] for name in benches}
    wall: dict[str, list[float]] = {name: [] for name in benches}
    for _ in range(n_rounds):
        for name, fn in benches.items():
            for _ in range(n_steps):
                t0, w0 = time.thread_time(), time.perf_counter()
                fn()
                cpu[name].append(time.thread_time() - t0)
                wall[name].append(time.perf_counter() - w0)
    return ({name: statistics.median(ts) for name, ts in cpu.items()},
            {name: statistics.median(ts) for name, ts in wall.items()})


def matmul_flops_per_second(n: int = MATMUL_N, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        torch.mm(a, b, out=out)
        best = min(best, time.thread_time() - t0)
    return 2 * n ** 3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per configuration per round")
    parser.add_argument("--max-bytes", type=int, default=4_000_000, help="stdlib corpus cap for the batches")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--glibc-defaults", action="store_true", help="leave glibc's malloc thresholds alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    heap = False if args.glibc_defaults else keep_large_buffers_in_heap()
    print(f"large buffers kept in the heap (glibc mallopt): {'yes' if heap else 'no'}")

    base = ModelConfig()  # the default trial size
    train = TrainConfig(steps=1)
    data = prepare_data(DataConfig(max_bytes=args.max_bytes), base.vocab_size, args.cache_dir, seq_len=base.seq_len)
    compression = torch.as_tensor(build_compression(data.token_texts)) if data.token_texts else None
    shape = MemoryConfig(kind="engram", slots=BASE_SLOTS)
    with_engram = dataclasses.replace(base, memory=shape)
    big_engram = dataclasses.replace(base, memory=dataclasses.replace(shape, slots=BASE_SLOTS * SLOTS_FACTOR))
    p_tot = p_tot_for_ratio(base, P_TOT_RATIO)
    alloc_moe, alloc_mem = solve_allocation(with_engram, p_tot, 1.0), solve_allocation(with_engram, p_tot, 0.8)

    configs = {"default (no memory)": base, "engram base slots": with_engram, "engram 64x slots": big_engram,
               "alloc rho=1.0": alloc_moe.config, "alloc rho=0.8": alloc_mem.config}
    benches = {name: make_bench(cfg, train, data.train, compression) for name, cfg in configs.items()}
    hasher = next(m for m in benches["engram base slots"].model.modules() if isinstance(m, Engram)).hasher
    hash_batch_BT = sample_batch(data.train, train.batch_size, base.seq_len, torch.Generator().manual_seed(1))

    def hash_only() -> None:
        with torch.no_grad():
            hasher(hash_batch_BT[:, :-1])

    peak = matmul_flops_per_second()
    fns = {name: b.run_step for name, b in benches.items()} | {"hashing (one Engram layer)": hash_only}
    step_s, wall_s = time_interleaved(fns, args.rounds, args.steps)
    peak_after = matmul_flops_per_second()

    print(f"torch {torch.__version__}, 1 thread; matmul {MATMUL_N}^3 fp32: {peak / 1e9:.1f} GFLOP/s before, "
          f"{peak_after / 1e9:.1f} after the steps (the higher is the reference)")
    peak = max(peak, peak_after)
    print(f"median of {args.rounds} x {args.steps} steps per configuration (batch {train.batch_size} x seq "
          f"{base.seq_len}); ms are thread CPU time, wall time alongside")
    print(f"{'configuration':28s} {'P_tot':>10s} {'P_act':>9s} {'slots':>9s} {'n_routed':>8s} {'ms/step':>8s} "
          f"{'wall ms':>8s} {'MFU':>6s}")
    for name, cfg in configs.items():
        counts, bench = param_counts(cfg), benches[name]
        mfu = bench.flops_per_token * bench.tokens_per_step / step_s[name] / peak
        slots = cfg.memory.slots if cfg.memory.kind != "none" else 0
        print(f"{name:28s} {counts.p_tot:10d} {counts.p_act:9d} {slots:9d} {cfg.n_routed:8d} "
              f"{1e3 * step_s[name]:8.1f} {1e3 * wall_s[name]:8.1f} {mfu:6.3f}")
    mfu_default = benches["default (no memory)"].flops_per_token * benches["default (no memory)"].tokens_per_step
    mfu_default /= step_s["default (no memory)"] * peak
    print()
    print(f"(a) MFU at the default trial size (batch {train.batch_size} x seq {base.seq_len}): {mfu_default:.3f}"
          f"   (target >= 0.5)")
    print(f"(b) step time, {SLOTS_FACTOR}x Engram slots / base slots: "
          f"{step_s['engram 64x slots'] / step_s['engram base slots']:.3f}   (target <= 1.15)")
    print(f"(c) step time, rho=0.8 / rho=1.0 (P_tot {p_tot:.3g}, P_act {alloc_moe.counts.p_act} vs "
          f"{alloc_mem.counts.p_act}): {step_s['alloc rho=0.8'] / step_s['alloc rho=1.0']:.3f}   (target <= 1.15)")
    print(f"(d) hashing share of a step (one Engram layer): "
          f"{100 * step_s['hashing (one Engram layer)'] / step_s['engram base slots']:.2f}%   (target < 5%)")


if __name__ == "__main__":
    main()
