"""Benchmarks of one training step of a trial (engram/trial.py), on one CPU thread; prints ratios measured in one run.

Every configuration runs in fp32 and in bf16 mixed precision (train.precision), side by side:
(s) bf16 speed-up: tokens/s of the default trial's bf16 step over its fp32 step, and over "today's" fp32 step
    (the fp32 step before issue 9: full (N, V) logits, then the hand-written cross-entropy; target >= 2.5).
(a) MFU at the default trial size: achieved FLOP/s (flops_per_token x tokens per step / step time) over the
    FLOP/s of a large matmul measured in the same process, bf16 against the bf16 matmul, fp32 against fp32.
(b) Engram is O(1) in slots: step time with 64x the base Engram slots over step time with the base slots, full
    optimiser step including SparseAdam (target <= 1.15).
(c) Engram overhead: step time at rho = 0.8 over rho = 1.0 from engram.accounting.solve_allocation, same P_act
    (target <= 1.15).
(d) Hashing time as a share of a step (target < 5%).

Steps are the trial's own `train_step` (fused AdamW + SparseAdam, clipping, router-bias update) on real batches of
the stdlib corpus. Times are this thread's CPU time (time.thread_time; with one torch thread all the work runs
on it), so other processes competing for the cores inflate neither a step nor the matmul reference as long as
they leave this core's caches alone (on a loaded machine they do not: compare ratios, not absolute times); the
steps of the configurations compared run in interleaved rounds and the median per step is used, so drift in the
load of a shared machine affects both sides of a ratio alike.

As in a sweep's trial workers, glibc is first told to keep large buffers in the heap
(engram.trial.keep_large_buffers_in_heap); `--glibc-defaults` measures without that. `--profile` prints where
the time of a default bf16 step goes (torch.profiler, operators grouped by what they belong to).

`--widths 128 256 512` measures (s) alone at the default trial's shape scaled in width (d_model w, w / 32 heads,
dense FFN 3w, experts w / 2 wide; layers, vocabulary, batch and sequence as the default): where the bf16 step
reaches the issue's 2.5x over the fp32 step as the matmuls' share of a step grows.

    python -m benchmarks.bench_trial [--rounds 5] [--steps 4] [--max-bytes 4000000] [--glibc-defaults] [--profile]
    python -m benchmarks.bench_trial --widths 128 256 512 [--rounds 3] [--steps 2]

`--tied-vs-untied` measures the default trial's step with the input embedding tied to the output head (the
benchmark's model, ModelConfig's default) and untied (the default sweep's since 2026-12-01), in both precisions.

    python -m benchmarks.bench_trial --tied-vs-untied [--rounds 4] [--steps 3]

`--matmul-shapes` prints fp32 and bf16 matmul GFLOP/s, one thread, at the default step's product shapes and at
large squares: what bf16 can buy on the machine at hand (AMX or AVX512_BF16 alone differ several-fold).

    python -m benchmarks.bench_trial --matmul-shapes

`--spec sweep.yaml` measures (s) and (a) on the sweep's own trials instead of `ModelConfig()`: every distinct model
of its plan (seed 0; allocation rho points, memory-free, Engram and OverEncoding points), its data, batch and
vocabulary, fp32 and bf16 interleaved (and today's fp32 step on the first model), then the sweep's bf16 over fp32
speed-up weighted by each model's tokens and seeds (what the sweep's wall time gains).

    python -m benchmarks.bench_trial --spec sweep.yaml [--rounds 3] [--steps 3] [--profile]

With `--profile` it then prints, per model and precision, where a step's time goes (the groups of the default's
profile).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable, Hashable
from pathlib import Path

import numpy as np
import torch

from engram.accounting import flops_per_token, p_tot_for_ratio, param_counts, solve_allocation
from engram.config import DataConfig, MemoryConfig, ModelConfig, TrainConfig
from engram.data import prepare_data
from engram.memory import Engram, build_compression
from engram.model import EngramMoE, cross_entropy
from engram.trial import build_optimizers, cpu_has_native_bf16, keep_large_buffers_in_heap, sample_batch, train_step

MATMUL_N = 2048  # matmul size for the reference FLOP/s: large enough to run at the core's peak
BASE_SLOTS = 1 << 16  # Engram rows over all tables of the base model of (b)
SLOTS_FACTOR = 64
P_TOT_RATIO = 4.0  # P_tot / P_act of the (c) allocation, as in the default sweep
# Warm-up steps per configuration of --widths: oneDNN compiles a bf16 kernel for every new padded expert block
# size, which a lone configuration meets over its first tens of steps (see time_interleaved).
WIDTH_WARMUP = 30


class UnfusedLossMoE(EngramMoE):
    """Today's fp32 step (before issue 9): the full (N, V) logits, then the hand-written `cross_entropy`."""

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None):
        logits_BTV, _ = super().forward(idx_BT)
        return logits_BTV, cross_entropy(logits_BTV.view(-1, logits_BTV.shape[-1]), targets_BT.reshape(-1))


@dataclasses.dataclass
class StepBench:
    """A model with its optimisers and a pool of real training batches; `step()` runs one train_step."""

    model: EngramMoE
    run_step: Callable[[], None]
    tokens_per_step: int
    flops_per_token: float


def make_bench(cfg: ModelConfig, train: TrainConfig, tokens: np.ndarray, compression: torch.Tensor | None,
               precision: str, n_batches: int = 8, model_cls: type[EngramMoE] = EngramMoE,
               device: torch.device | str = "cpu") -> StepBench:
    torch.manual_seed(0)
    model = model_cls(cfg, compression).to(device)
    model.train()
    dense_opt, sparse_opt = build_optimizers(model, train)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    batches = [sample_batch(tokens, train.batch_size, cfg.seq_len, gen).to(device) for _ in range(n_batches)]
    state = {"i": 0}

    def run_step() -> None:
        batch_BT = batches[state["i"] % n_batches]
        state["i"] += 1
        train_step(model, batch_BT, dense_opt, sparse_opt, params, lr=train.lr, train=train, precision=precision)

    return StepBench(model, run_step, train.batch_size * cfg.seq_len, flops_per_token(cfg))


def time_interleaved(benches: dict[Hashable, Callable[[], None]], n_rounds: int, n_steps: int,
                     n_warmup: int = 3) -> tuple[dict[Hashable, float], dict[Hashable, float]]:
    """Median (thread CPU seconds, wall seconds) per call of each function, in interleaved rounds after a warm-up.

    A few warm-up calls, not one: oneDNN compiles a bf16 matmul kernel per new shape, and the padded expert
    blocks take a few steps to have met their usual sizes."""
    for fn in benches.values():
        for _ in range(n_warmup):
            fn()
    cpu: dict[Hashable, list[float]] = {name: [] for name in benches}
    wall: dict[Hashable, list[float]] = {name: [] for name in benches}
    for _ in range(n_rounds):
        for name, fn in benches.items():
            for _ in range(n_steps):
                t0, w0 = time.thread_time(), time.perf_counter()
                fn()
                cpu[name].append(time.thread_time() - t0)
                wall[name].append(time.perf_counter() - w0)
    return ({name: statistics.median(ts) for name, ts in cpu.items()},
            {name: statistics.median(ts) for name, ts in wall.items()})


def matmul_flops_per_second(dtype: torch.dtype, n: int = MATMUL_N, repeats: int = 5, *,
                            shape: tuple[int, int, int] | None = None) -> float:
    """Best of `repeats` (m x k) @ (k x n) products, n x n x n unless `shape` = (m, k, n) is given; thread CPU time."""
    m, k, n = shape or (n, n, n)
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)
    reps = max(1, int(2e9 / (2 * m * k * n)))      # small products timed in batches, thread_time's tick is coarse
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        best = min(best, (time.thread_time() - t0) / reps)
    return 2 * m * k * n / best


# Products of the default trial's shapes (rows = 16 x 128 tokens): the attention's q, k, v projection, the dense
# FFN in and out, the head, one padded expert block (~256 rows, gate and up together); then a wider model's and
# the large squares a peak is usually quoted at.
MATMUL_SHAPES = ((2048, 128, 384), (2048, 128, 768), (2048, 384, 128), (2048, 128, 4096), (256, 128, 128),
                 (2048, 512, 1536), (2048, 2048, 2048), (4096, 4096, 4096))


def matmul_shapes(shapes=MATMUL_SHAPES, repeats: int = 5) -> None:
    """fp32 and bf16 GFLOP/s per product shape, one thread, and their ratio: how much bf16 can buy a step here."""
    print(f"{'(m x k) @ (k x n)':>30} {'fp32 GFLOP/s':>13} {'bf16 GFLOP/s':>13} {'bf16 / fp32':>12}")
    for m, k, n in shapes:
        f32, b16 = (matmul_flops_per_second(dt, repeats=repeats, shape=(m, k, n)) / 1e9
                    for dt in (torch.float32, torch.bfloat16))
        print(f"{f'({m} x {k}) @ ({k} x {n})':>30} {f32:13.1f} {b16:13.1f} {b16 / f32:12.2f}", flush=True)


# Where a step's operators belong, for the profile breakdown: first match on the operator's name wins.
PROFILE_GROUPS = (
    ("matmul (mm, bmm, addmm, linear)", ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::linear")),
    ("attention (flash kernel)", ("flash_attention",)),
    ("softmax / max / exp / logsumexp (loss)", ("softmax", "aten::max", "aten::amax", "aten::exp_", "logsumexp")),
    ("dtype casts and copies", ("aten::copy_", "aten::_to_copy", "aten::to")),
    ("optimisers (fused AdamW, SparseAdam, clipping)", ("adamw", "sparse", "coalesce", "norm", "foreach")),
    ("elementwise (mul, add, silu, sigmoid, ...)", ("aten::mul", "aten::add", "aten::sub", "aten::div", "silu",
                                                     "sigmoid", "aten::pow", "rsqrt", "aten::neg", "aten::exp",
                                                     "aten::sum", "aten::mean", "rms_norm", "aten::where")),
    ("gather / scatter / index (routing, embeddings)", ("index", "gather", "scatter", "embedding", "sort", "topk",
                                                        "bincount", "remainder", "bitwise", "cumsum",
                                                        "repeat_interleave")),
    ("convolution (Engram short conv)", ("conv",)),
    ("allocation and fills", ("empty", "zero", "fill", "full", "cat")),
)


def profile_breakdown(run_step: Callable[[], None], n_steps: int = 4) -> list[tuple[str, float]]:
    """Self CPU time per step of each PROFILE_GROUPS group (and "other"), in ms, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    run_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n_steps):
            run_step()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if not event.key.startswith("aten::") and "flash" not in event.key:
            name = "python / autograd glue"
        else:
            key = event.key.lower()
            name = next((g for g, pats in PROFILE_GROUPS if any(p.lower() in key for p in pats)), "other aten ops")
        totals[name] = totals.get(name, 0.0) + event.self_cpu_time_total / 1e3 / n_steps
    return sorted(totals.items(), key=lambda kv: -kv[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per configuration per round")
    parser.add_argument("--max-bytes", type=int, default=4_000_000, help="stdlib corpus cap for the batches")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--glibc-defaults", action="store_true", help="leave glibc's malloc thresholds alone")
    parser.add_argument("--profile", action="store_true", help="also profile a default bf16 and fp32 step")
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="only (s), at the default shape scaled to these d_model values")
    parser.add_argument("--tied-vs-untied", action="store_true",
                        help="only the default step with tied and untied embeddings")
    parser.add_argument("--matmul-shapes", action="store_true",
                        help="only fp32 and bf16 matmul GFLOP/s at the default step's product shapes")
    parser.add_argument("--spec", type=Path, default=None,
                        help="only (s) and (a), on this sweep spec's planned models (its data, batch, vocabulary)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.matmul_shapes:
        matmul_shapes()
        return
    if args.spec:
        heap = False if args.glibc_defaults else keep_large_buffers_in_heap()
        print(f"large buffers kept in the heap (glibc mallopt): {'yes' if heap else 'no'}")
        spec_scan(args.spec, args.rounds, args.steps, args.cache_dir, profile=args.profile)
        return
    heap = False if args.glibc_defaults else keep_large_buffers_in_heap()
    print(f"large buffers kept in the heap (glibc mallopt): {'yes' if heap else 'no'}")

    base = ModelConfig()  # the default trial size
    train = TrainConfig(steps=1)
    data = prepare_data(DataConfig(max_bytes=args.max_bytes), base.vocab_size, args.cache_dir, seq_len=base.seq_len)
    compression = torch.as_tensor(build_compression(data.token_texts)) if data.token_texts else None
    if args.widths:
        width_scan(base, train, data.train, compression, args.widths, args.rounds, args.steps)
        return
    if args.tied_vs_untied:
        tied_vs_untied(base, train, data.train, compression, args.rounds, args.steps)
        return
    shape = MemoryConfig(kind="engram", slots=BASE_SLOTS)
    with_engram = dataclasses.replace(base, memory=shape)
    big_engram = dataclasses.replace(base, memory=dataclasses.replace(shape, slots=BASE_SLOTS * SLOTS_FACTOR))
    p_tot = p_tot_for_ratio(base, P_TOT_RATIO)
    alloc_moe, alloc_mem = solve_allocation(with_engram, p_tot, 1.0), solve_allocation(with_engram, p_tot, 0.8)

    configs = {"default (no memory)": base, "engram base slots": with_engram, "engram 64x slots": big_engram,
               "alloc rho=1.0": alloc_moe.config, "alloc rho=0.8": alloc_mem.config}
    benches = {(name, precision): make_bench(cfg, train, data.train, compression, precision)
               for name, cfg in configs.items() for precision in ("fp32", "bf16")}
    benches["default (no memory)", "fp32 today"] = make_bench(base, train, data.train, compression, "fp32",
                                                              model_cls=UnfusedLossMoE)
    engram_model = benches["engram base slots", "bf16"].model
    hasher = next(m for m in engram_model.modules() if isinstance(m, Engram)).hasher
    hash_batch_BT = sample_batch(data.train, train.batch_size, base.seq_len, torch.Generator().manual_seed(1))

    def hash_only() -> None:
        with torch.no_grad():
            hasher(hash_batch_BT[:, :-1])

    peak = {"fp32": matmul_flops_per_second(torch.float32), "bf16": matmul_flops_per_second(torch.bfloat16)}
    fns = {key: b.run_step for key, b in benches.items()} | {("hashing (one Engram layer)", "-"): hash_only}
    step_s, wall_s = time_interleaved(fns, args.rounds, args.steps)
    peak_after = {"fp32": matmul_flops_per_second(torch.float32), "bf16": matmul_flops_per_second(torch.bfloat16)}

    print(f"torch {torch.__version__}, 1 thread; matmul {MATMUL_N}^3: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s before, "
          f"{peak_after['fp32'] / 1e9:.1f} after; bf16 {peak['bf16'] / 1e9:.1f} before, "
          f"{peak_after['bf16'] / 1e9:.1f} after the steps (the higher of each is the reference)")
    peak = {k: max(peak[k], peak_after[k]) for k in peak}
    print(f"median of {args.rounds} x {args.steps} steps per configuration (batch {train.batch_size} x seq "
          f"{base.seq_len}); ms are thread CPU time, wall time alongside; MFU against the matmul peak of the "
          f"step's precision (bf16 steps also against fp32, for history)")
    print(f"{'configuration':28s} {'precision':10s} {'P_tot':>10s} {'P_act':>9s} {'slots':>9s} {'n_routed':>8s} "
          f"{'ms/step':>8s} {'wall ms':>8s} {'tok/s':>7s} {'MFU':>6s} {'MFU/fp32':>8s}")

    def mfu(key: tuple[str, str], precision: str) -> float:
        bench = benches[key]
        return bench.flops_per_token * bench.tokens_per_step / step_s[key] / peak[precision]

    for (name, precision), bench in benches.items():
        cfg = configs[name]
        counts = param_counts(cfg)
        slots = cfg.memory.slots if cfg.memory.kind != "none" else 0
        own = "bf16" if precision == "bf16" else "fp32"
        print(f"{name:28s} {precision:10s} {counts.p_tot:10d} {counts.p_act:9d} {slots:9d} {cfg.n_routed:8d} "
              f"{1e3 * step_s[name, precision]:8.1f} {1e3 * wall_s[name, precision]:8.1f} "
              f"{bench.tokens_per_step / step_s[name, precision]:7.0f} {mfu((name, precision), own):6.3f} "
              f"{mfu((name, precision), 'fp32'):8.3f}")
    default = "default (no memory)"
    print()
    print(f"(s) default step, bf16 tokens/s over fp32: {step_s[default, 'fp32'] / step_s[default, 'bf16']:.2f}; "
          f"over today's fp32 step (unfused loss): {step_s[default, 'fp32 today'] / step_s[default, 'bf16']:.2f}"
          f"   (target >= 2.5); fp32 now over today's fp32: "
          f"{step_s[default, 'fp32 today'] / step_s[default, 'fp32']:.2f}")
    engram = "engram base slots"
    print(f"    Engram (base slots) step, bf16 over fp32: {step_s[engram, 'fp32'] / step_s[engram, 'bf16']:.2f}")
    print(f"(a) MFU at the default trial size: bf16 {mfu((default, 'bf16'), 'bf16'):.3f} of the bf16 peak "
          f"({mfu((default, 'bf16'), 'fp32'):.3f} of the fp32 peak); fp32 {mfu((default, 'fp32'), 'fp32'):.3f} "
          f"of the fp32 peak")
    for precision in ("bf16", "fp32"):
        print(f"[{precision}] (b) step time, {SLOTS_FACTOR}x Engram slots / base slots: "
              f"{step_s['engram 64x slots', precision] / step_s['engram base slots', precision]:.3f}"
              f"   (target <= 1.15)")
        print(f"[{precision}] (c) step time, rho=0.8 / rho=1.0 (P_tot {p_tot:.3g}, P_act {alloc_moe.counts.p_act} vs "
              f"{alloc_mem.counts.p_act}): "
              f"{step_s['alloc rho=0.8', precision] / step_s['alloc rho=1.0', precision]:.3f}   (target <= 1.15)")
        print(f"[{precision}] (d) hashing share of a step (one Engram layer): "
              f"{100 * step_s['hashing (one Engram layer)', '-'] / step_s['engram base slots', precision]:.2f}%"
              f"   (target < 5%)")
    if args.profile:
        for precision in ("bf16", "fp32"):
            print(f"\nprofile of the default {precision} step (torch.profiler, self CPU ms per step; the profiler "
                  f"adds its own overhead):")
            rows = profile_breakdown(benches[default, precision].run_step)
            total = sum(ms for _, ms in rows)
            for name, ms in rows:
                print(f"  {name:48s} {ms:8.1f} ms  {100 * ms / total:5.1f}%")


def scaled(base: ModelConfig, width: int) -> ModelConfig:
    """The default trial's shape at d_model `width`: heads of 32, dense FFN 3x, experts half the width."""
    return dataclasses.replace(base, d_model=width, n_heads=max(1, width // 32), d_ff_dense=3 * width,
                               d_expert=width // 2)


def width_scan(base: ModelConfig, train: TrainConfig, tokens: np.ndarray, compression: torch.Tensor | None,
               widths: list[int], n_rounds: int, n_steps: int) -> None:
    """(s) per width: today's fp32 step, this code's fp32 step and its bf16 step, interleaved per width."""
    print(f"torch {torch.__version__}, 1 thread; matmul {MATMUL_N}^3: fp32 "
          f"{matmul_flops_per_second(torch.float32) / 1e9:.1f} GFLOP/s, bf16 "
          f"{matmul_flops_per_second(torch.bfloat16) / 1e9:.1f} GFLOP/s")
    print(f"median of {n_rounds} x {n_steps} steps (thread CPU ms), no memory, batch {train.batch_size} x seq "
          f"{base.seq_len}, {base.n_layers} layers, vocab {base.vocab_size}")
    print(f"{'d_model':>7s} {'P_act':>9s} {'today fp32':>10s} {'fp32':>8s} {'bf16':>8s} {'bf16/today':>10s} "
          f"{'bf16/fp32':>9s}")
    for width in widths:
        cfg = scaled(base, width)
        runs = {"today": make_bench(cfg, train, tokens, compression, "fp32", model_cls=UnfusedLossMoE).run_step,
                "fp32": make_bench(cfg, train, tokens, compression, "fp32").run_step,
                "bf16": make_bench(cfg, train, tokens, compression, "bf16").run_step}
        step_s, _ = time_interleaved(runs, n_rounds, n_steps, n_warmup=WIDTH_WARMUP)
        print(f"{width:7d} {param_counts(cfg).p_act:9d} {1e3 * step_s['today']:10.1f} {1e3 * step_s['fp32']:8.1f} "
              f"{1e3 * step_s['bf16']:8.1f} {step_s['today'] / step_s['bf16']:10.2f} "
              f"{step_s['fp32'] / step_s['bf16']:9.2f}", flush=True)


def tied_vs_untied(base: ModelConfig, train: TrainConfig, tokens: np.ndarray, compression: torch.Tensor | None,
                   n_rounds: int, n_steps: int) -> None:
    """The default step with tied and untied embeddings, both precisions, interleaved."""
    runs = {(tie, precision): make_bench(dataclasses.replace(base, tie_embeddings=tie), train, tokens, compression,
                                         precision).run_step
            for tie in (True, False) for precision in ("bf16", "fp32")}
    step_s, _ = time_interleaved(runs, n_rounds, n_steps, n_warmup=WIDTH_WARMUP)
    print(f"median of {n_rounds} x {n_steps} steps (thread CPU ms), default trial size, no memory")
    for precision in ("bf16", "fp32"):
        tied, untied = step_s[True, precision], step_s[False, precision]
        print(f"{precision}: tied {1e3 * tied:.1f} ms, untied {1e3 * untied:.1f} ms, untied / tied {untied / tied:.3f}")


def planned_models(trials) -> dict[str, tuple[ModelConfig, float]]:
    """Every distinct model of a plan (sweeps.plan.PlannedTrial list), by a label naming its experiment and point
    ("allocation rho=0.5", "memory engram 7200", "memory none"), with the tokens of all its seeds."""
    models: dict[str, tuple[ModelConfig, float]] = {}
    for t in trials:
        point = f"rho={t.rho:g}" if t.rho is not None else (f"{t.memory} {t.slots}" if t.memory != "none" else "none")
        label = f"{t.experiment} {point}"
        model, tokens = models.get(label, (t.config.model, 0.0))
        models[label] = (model, tokens + t.tokens)
    return models


def spec_scan(path: Path, n_rounds: int, n_steps: int, cache_dir: Path | None, *, profile: bool = False) -> None:
    """(s) and (a) on every distinct model a sweep spec plans (seed 0), with the spec's data, batch and vocabulary;
    then the bf16 over fp32 speed-up of the whole sweep, each model weighted by its planned tokens x seeds.
    `profile`: then, per model and precision, where a step's time goes (PROFILE_GROUPS, torch.profiler)."""
    from sweeps.plan import Throughput, plan_sweep
    from sweeps.spec import load_spec

    spec = load_spec(path)
    models = planned_models(plan_sweep(spec, throughput=Throughput(1.0, 0.0, "not used")))
    train = dataclasses.replace(spec.train, steps=1)
    first = next(iter(models.values()))[0]
    data = prepare_data(spec.data, first.vocab_size, cache_dir, seq_len=first.seq_len)
    compression = torch.as_tensor(build_compression(data.token_texts)) if data.token_texts else None
    precisions = ("fp32", "bf16") if cpu_has_native_bf16() else ("fp32",)
    if len(precisions) == 1:
        print("this CPU has no native bf16 (no AVX512_BF16 or AMX flag): its bf16 products are emulated, tens of "
              "times slower than fp32 (--matmul-shapes), and train.precision auto trains fp32; fp32 steps only")
    runs: dict[tuple[str, str], StepBench] = {}
    for label, (model, _) in models.items():
        for precision in precisions:
            runs[label, precision] = make_bench(model, train, data.train, compression, precision)
    first_label = next(iter(models))
    runs[first_label, "fp32 today"] = make_bench(first, train, data.train, compression, "fp32",
                                                 model_cls=UnfusedLossMoE)
    nan = float("nan")
    peak = {"fp32": matmul_flops_per_second(torch.float32),
            "bf16": matmul_flops_per_second(torch.bfloat16) if "bf16" in precisions else nan}
    step_s, _ = time_interleaved({k: b.run_step for k, b in runs.items()}, n_rounds, n_steps, n_warmup=WIDTH_WARMUP)
    print(f"torch {torch.__version__}, 1 thread; {path}: {len(models)} models, batch {train.batch_size} x seq "
          f"{first.seq_len}, vocabulary {first.vocab_size}; matmul {MATMUL_N}^3 fp32 {peak['fp32'] / 1e9:.1f} "
          f"GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f}; median of {n_rounds} x {n_steps} steps after {WIDTH_WARMUP} "
          f"warm-up steps each (thread CPU ms)")
    print(f"{'model':34s} {'P_act':>8s} {'n_routed':>8s} {'fp32 ms':>8s} {'bf16 ms':>8s} {'bf16/fp32':>9s} "
          f"{'bf16 MFU':>8s} {'fp32 MFU':>8s}")
    total = dict.fromkeys(precisions, 0.0)  # one thread's seconds of the sweep's training steps
    for label, (model, tokens) in models.items():
        bench = runs[label, "fp32"]
        f32, b16 = step_s[label, "fp32"], step_s.get((label, "bf16"), nan)
        work = bench.flops_per_token * bench.tokens_per_step
        print(f"{label:34s} {param_counts(model).p_act:8d} {model.n_routed:8d} {1e3 * f32:8.1f} {1e3 * b16:8.1f} "
              f"{f32 / b16:9.2f} {work / b16 / peak['bf16']:8.3f} {work / f32 / peak['fp32']:8.3f}")
        for precision in precisions:
            total[precision] += tokens / bench.tokens_per_step * step_s[label, precision]
    today = step_s[first_label, "fp32 today"]
    print(f"\n(s) {first_label}: this code's fp32 step over today's (unfused loss) "
          f"{today / step_s[first_label, 'fp32']:.2f}" + (
              f"; bf16 over today's fp32 {today / step_s[first_label, 'bf16']:.2f} (target >= 2.5), over this "
              f"code's fp32 {step_s[first_label, 'fp32'] / step_s[first_label, 'bf16']:.2f}" if "bf16" in total
              else ""))
    print(f"    the whole sweep's training steps (tokens x seeds per model), one thread: fp32 "
          f"{total['fp32'] / 60:.1f} min" + (f", bf16 {total['bf16'] / 60:.1f} min: bf16 over fp32 "
                                            f"{total['fp32'] / total['bf16']:.2f}" if "bf16" in total else ""))
    if profile:
        keys = [k for k in runs if k[1] in precisions]
        breakdown = {k: dict(profile_breakdown(runs[k].run_step)) for k in keys}
        groups = sorted({g for b in breakdown.values() for g in b}, key=lambda g: -sum(b.get(g, 0.0)
                                                                                      for b in breakdown.values()))
        print("\nwhere a step goes (self CPU ms per step, torch.profiler over 4 steps; share of the profiled step)")
        for k in keys:
            b = breakdown[k]
            step = sum(b.values())
            print(f"{k[0]} {k[1]} ({step:.0f} ms profiled): " + "; ".join(
                f"{g} {b[g]:.1f} ({b[g] / step:.0%})" for g in groups if b.get(g, 0.0) >= 0.01 * step))


if __name__ == "__main__":
    main()
