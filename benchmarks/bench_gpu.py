"""A sweep's trials on an accelerator: step throughput, MFU, bf16 against fp32, and whole trials paired by seed.

Written for the few sessions lent a GPU (15 minutes of device time in all): one run measures everything issue 9
asks of a GPU and prints ratios measured in that run. `scripts/device_check.sh` runs it with the gpu-marked tests.

(1) Peaks: fp32 and bf16 matmul FLOP/s on the device (an n^3 product, best of a few timed batches; fp32 without
    TF32, as trials run it: the code never turns TF32 on).
(2) Steps: every distinct model the spec plans (seed 0: allocation rho points, memory-free, Engram, OverEncoding),
    with the spec's data, batch and vocabulary; the trial's own `train_step` (engram.trial), fp32 and bf16 in
    interleaved rounds, each step timed to its end (device synchronised); ms per step, training tokens per
    second, MFU (training FLOPs per step / step time / the same precision's matmul peak) and bf16 over fp32.
    With `--cpu-reference`, the first model's fp32 step on one CPU thread of the same machine, for a device over
    CPU ratio measured in the same run.
(3) The sweep on this device: the spec's training steps (each model's tokens over all its seeds) at the rates of
    (2), one trial at a time; evaluation, data and start-up not included.
(4) Trials: the spec's largest Engram memory trial (its first trial if it has no memory experiment) run whole by
    engram.trial.run_trial on the device (data, evaluation, diagnostics), per seed in each precision: final
    validation loss, the paired bf16 - fp32 difference against each precision's seed spread, wall seconds,
    training tokens per second and peak device memory. Validation runs in fp32 in both (engram.trial.evaluate).

    python -m benchmarks.bench_gpu [--spec sweep.yaml] [--device cuda] [--rounds 3] [--steps 10]
                                   [--seeds 0 1 2] [--precisions fp32 bf16] [--no-trials] [--cpu-reference]
                                   [--json out.json]

`--device cpu` runs the same measurements on the CPU (torch's thread count as set; the tests use it on a tiny
spec). On a CUDA device without bf16, or a CPU without native bf16, bf16 is left out unless asked for with
`--precisions`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Hashable
from pathlib import Path

import torch

from benchmarks.bench_trial import StepBench, make_bench, planned_models
from engram.accounting import param_counts
from engram.data import prepare_data
from engram.memory import build_compression
from engram.trial import cpu_has_native_bf16, resolve_device, run_trial
from sweeps.plan import PlannedTrial, Throughput, plan_sweep
from sweeps.spec import load_spec

WARMUP_STEPS = 5  # per configuration, before timing: allocator, cuBLAS / oneDNN kernel choice per new shape


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    """FLOP/s of the best of `repeats` timed batches of n x n x n products on `device`, wall clock, synchronised."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    synchronize(device)
    t0 = time.perf_counter()
    torch.mm(a, b, out=out)
    synchronize(device)
    reps = max(1, min(50, int(0.2 / max(time.perf_counter() - t0, 1e-6))))  # batches of ~0.2 s
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n ** 3 / best


def time_steps(benches: dict[Hashable, Callable[[], None]], device: torch.device, n_rounds: int, n_steps: int,
               n_warmup: int = WARMUP_STEPS) -> dict[Hashable, float]:
    """Median wall seconds per call of each function, every call timed to its end on the device, in interleaved
    rounds after `n_warmup` calls each."""
    for fn in benches.values():
        for _ in range(n_warmup):
            fn()
    synchronize(device)
    times: dict[Hashable, list[float]] = {name: [] for name in benches}
    for _ in range(n_rounds):
        for name, fn in benches.items():
            for _ in range(n_steps):
                t0 = time.perf_counter()
                fn()
                synchronize(device)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def trial_under_test(planned: list[PlannedTrial]) -> PlannedTrial:
    """The largest Engram trial of the first memory experiment (seed order as planned), else the first trial."""
    engram = [t for t in planned if t.kind == "memory" and t.memory == "engram"]
    if not engram:
        return planned[0]
    first = engram[0].experiment
    return max((t for t in engram if t.experiment == first), key=lambda t: t.slots)


def native_bf16(device: torch.device) -> bool:
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {torch.get_num_threads()} torch thread(s)"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("sweep.yaml"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration per round")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the whole trials (4)")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=None,
                        help="default: fp32, and bf16 where the device has it natively")
    parser.add_argument("--no-trials", action="store_true", help="skip (4)")
    parser.add_argument("--cpu-reference", action="store_true", help="also time the first model's fp32 step on "
                        "one CPU thread of this machine")
    parser.add_argument("--matmul-n", type=int, default=None, help="peak product size (default 8192 on CUDA, "
                        "2048 on CPU)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        spec = load_spec(args.spec)
    except (OSError, ValueError) as err:  # SpecError is a ValueError
        parser.exit(2, f"bench_gpu: {err}\n")
    precisions = tuple(args.precisions or (("fp32", "bf16") if native_bf16(device) else ("fp32",)))
    out: dict = {"device": device_label(device), "torch": torch.__version__,
                 "cuda": torch.version.cuda if device.type == "cuda" else None, "spec": str(args.spec),
                 "precisions": list(precisions)}
    print(f"{out['device']}; torch {torch.__version__}" + (f", CUDA {out['cuda']}" if out["cuda"] else "")
          + f"; precisions {', '.join(precisions)}", flush=True)

    # (1) peaks
    n = args.matmul_n or (8192 if device.type == "cuda" else 2048)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peak = {p: matmul_peak(device, dtypes[p], n) for p in precisions}
    out["matmul_n"], out["peak_flops"] = n, peak
    print("(1) matmul peak, " + ", ".join(f"{p} {peak[p] / 1e9:,.1f} GFLOP/s" for p in precisions)
          + f" ({n}^3)", flush=True)

    # (2) steps of every planned model
    planned = plan_sweep(spec, throughput=Throughput(1.0, 0.0, "not used"))
    models = planned_models(planned)
    train = dataclasses.replace(spec.train, steps=1)
    first_model = next(iter(models.values()))[0]
    data = prepare_data(spec.data, first_model.vocab_size, args.cache_dir, seq_len=first_model.seq_len)
    compression = torch.as_tensor(build_compression(data.token_texts)) if data.token_texts else None
    benches: dict[tuple[str, str], StepBench] = {}
    for label, (model, _) in models.items():
        for p in precisions:
            benches[label, p] = make_bench(model, train, data.train, compression, p, device=device)
    step_s = time_steps({k: b.run_step for k, b in benches.items()}, device, args.rounds, args.steps)
    print(f"(2) training steps: {args.spec}, {len(models)} models, batch {train.batch_size} x seq "
          f"{first_model.seq_len}; median of {args.rounds} x {args.steps} steps after {WARMUP_STEPS} warm-up steps")
    print(f"{'model':34s} {'P_act':>8s} {'prec':>5s} {'ms/step':>8s} {'k tok/s':>9s} {'MFU':>7s} {'bf16/fp32':>9s}")
    rows = []
    sweep_s = dict.fromkeys(precisions, 0.0)
    for label, (model, tokens) in models.items():
        for p in precisions:
            b = benches[label, p]
            s = step_s[label, p]
            mfu = b.flops_per_token * b.tokens_per_step / s / peak[p]
            speedup = step_s[label, "fp32"] / s if "fp32" in precisions and p == "bf16" else None
            rows.append({"model": label, "p_act": param_counts(model).p_act, "precision": p, "step_seconds": s,
                         "tokens_per_second": b.tokens_per_step / s, "mfu": mfu, "bf16_over_fp32": speedup})
            print(f"{label:34s} {rows[-1]['p_act']:8d} {p:>5s} {1e3 * s:8.2f} {b.tokens_per_step / s / 1e3:9.1f} "
                  f"{mfu:7.4f} {'' if speedup is None else f'{speedup:9.2f}'}")
            sweep_s[p] += tokens / b.tokens_per_step * s
    out["steps"] = rows
    save(out, args.json)
    if args.cpu_reference:
        label = next(iter(models))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cpu = make_bench(first_model, train, data.train, compression, "fp32")
            cpu_s = time_steps({"cpu": cpu.run_step}, torch.device("cpu"), 1, 5, n_warmup=2)["cpu"]
        finally:
            torch.set_num_threads(threads)
        ratio = cpu_s / step_s[label, precisions[-1]]
        out["cpu_reference"] = {"model": label, "step_seconds": cpu_s, "device_over_cpu": ratio,
                                "device_precision": precisions[-1]}
        print(f"    {label}: fp32 step on one CPU thread of this machine {1e3 * cpu_s:.1f} ms, {ratio:.2f}x the "
              f"device's {precisions[-1]} step")

    # (3) the sweep's training steps on this device
    out["sweep_training_seconds"] = sweep_s
    save(out, args.json)
    print(f"(3) the sweep's training steps ({len(planned)} trials, one at a time): " + ", ".join(
        f"{p} {sweep_s[p] / 60:.1f} min" for p in precisions) + " (evaluation, data and start-up not included)")

    # (4) whole trials, paired by seed
    if not args.no_trials:
        base = trial_under_test(planned)
        what = f"{base.experiment}, {base.memory} {base.slots} slots" if base.memory != "none" else base.experiment
        print(f"(4) whole trials: {what}, budget {base.budget:.3g} FLOPs, {base.tokens} tokens, seeds "
              f"{', '.join(map(str, args.seeds))}", flush=True)
        trials: dict[tuple[int, str], dict] = {}
        for seed in args.seeds:
            for p in precisions:
                config = dataclasses.replace(base.config, train=dataclasses.replace(
                    base.config.train, seed=seed, precision=p, device=device.type, checkpoint_interval=None))
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                r = run_trial(config, cache_dir=args.cache_dir)
                if r.status != "ok":
                    raise SystemExit(f"bench_gpu: trial seed {seed} {p} ended {r.status}: {r.error}")
                mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                trials[seed, p] = {"seed": seed, "precision": p, "final_val_loss": r.final_val_loss,
                                   "wall_seconds": r.wall_seconds, "tokens_per_second": r.tokens_per_second,
                                   "steps": r.steps, "tokens": r.tokens, "peak_device_bytes": mem}
                out["trials"] = list(trials.values())
                save(out, args.json)
                print(f"    seed {seed} {p}: final val {r.final_val_loss:.4f}, wall {r.wall_seconds:.1f} s, "
                      f"{r.tokens_per_second / 1e3:.1f}k tok/s over training steps"
                      + (f", peak {mem / 2**20:.0f} MiB on the device" if mem is not None else ""), flush=True)
        for p in precisions:
            losses = [trials[s, p]["final_val_loss"] for s in args.seeds]
            print(f"    {p}: mean {statistics.mean(losses):.4f}, seed spread (max - min) "
                  f"{max(losses) - min(losses):.4f}")
        if set(precisions) == {"fp32", "bf16"}:
            diffs = [trials[s, "bf16"]["final_val_loss"] - trials[s, "fp32"]["final_val_loss"] for s in args.seeds]
            out["paired_bf16_minus_fp32"] = diffs
            print(f"    paired bf16 - fp32: {', '.join(f'{d:+.4f}' for d in diffs)} (mean "
                  f"{statistics.mean(diffs):+.4f})")
    save(out, args.json)
    return out


def save(out: dict, path: Path | None) -> None:
    """Write what is measured so far (each phase adds to it), so a run cut short by a time limit keeps it."""
    if path is not None:
        path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
