"""The plan: a SweepSpec expanded into concrete trials (solver applied, horizon and seed set, trial ids, costs).

`plan_sweep` lists the grid trials (allocation and memory experiments); a search experiment's trials exist only
once Optuna suggests a rho, and the launcher builds each with `plan_search_trial`. `plan_table` renders what
`engram-sweep plan` prints.

Time estimates (ETA) use a deliberately simple model, stated here and printed with the plan:
    seconds(trial) = STARTUP_SECONDS + (training FLOPs + evaluation FLOPs) / effective FLOP/s
where training FLOPs = flops_per_token * tokens, evaluation = forward passes (flops_per_token / 3 per token) of
eval_tokens every eval_interval steps, and the effective FLOP/s of one trial is either
  * measured: the median of compute / wall_seconds over finished trials already in the store, or
  * calibrated: a short fp32 matmul of the trial's width on `cpus_per_trial` threads (~0.15 s), times
    CPU_EFFICIENCY, the ratio of real trial throughput to that matmul measured on this project's default models.
The sweep's ETA is the sum over trials divided by the trials that run at once locally.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass
from typing import Mapping

import pandas as pd

from engram.accounting import ParamCounts, flops_per_token, param_counts, solve_allocation
from engram.config import ModelConfig, TrialConfig
from engram.data import corpus_fingerprint
from engram.trial import horizon_steps, resolve_precision, trial_id
from sweeps.spec import (AllocationExperiment, MemoryExperiment, SearchExperiment, SweepSpec, engram_shape,
                         target_p_tot)

# Measured 2026-11-29 on 2-core machines: trials of the default sweep's models reach 0.45 of the calibration
# matmul's FLOP/s when two run at once (median over the 21 trials of `make sweep` on a fresh clone: 47.5 vs
# ~105 GFLOP/s; small models lose to routing, embedding lookups and sparse table updates), 0.26-0.45 on a machine
# shared with other heavy jobs (docs/sweep-spec.md, "Sizing the default sweep"). With 0.3 the first plan
# over-estimated the default sweep 1.6-1.8x.
CPU_EFFICIENCY = 0.45
# Trial throughput in bf16 over fp32 on a CPU with native bf16 (train.precision auto -> bf16 there): measured
# 1.07-1.19 for default-size steps, fp32 and bf16 interleaved in one run (benchmarks/bench_trial.py, 2026-11-30,
# heavily loaded 2-core machine; docs/benchmarks.md). The calibration matmul stays fp32.
BF16_CPU_SPEEDUP = 1.1
# Per-trial fixed cost outside the training loop: model build, token cache load, first evaluation set-up.
STARTUP_SECONDS = 5.0
CALIBRATION_SECONDS = 0.15
CALIBRATION_WINDOWS = 8


@dataclass(frozen=True)
class PlannedTrial:
    trial_id: str
    sweep: str
    experiment: str
    kind: str  # "allocation" | "memory" | "search"
    memory: str  # "engram" | "overencoding" | "none"
    rho: float | None  # target rho (grid value) for allocation/search; None for memory
    slots: int
    seed: int
    budget: float | None
    config: TrialConfig  # resolved and concrete (solver applied, horizon set, seed set)
    counts: ParamCounts
    flops_per_token: float
    tokens: int
    est_seconds: float

    @property
    def steps(self) -> int:
        return self.tokens // (self.config.train.batch_size * self.config.model.seq_len)


@dataclass(frozen=True)
class Throughput:
    """The ETA model's inputs (see the module docstring)."""

    flops_per_second: float  # effective training FLOP/s of one trial
    startup_seconds: float
    source: str  # how the figure was obtained, printed with the plan

    def seconds(self, config: TrialConfig, fpt: float, steps: int) -> float:
        train, seq_len = config.train, config.model.seq_len
        train_flops = fpt * steps * train.batch_size * seq_len
        n_evals = 1 + (steps // train.eval_interval if train.eval_interval else 0)
        eval_flops = n_evals * train.eval_tokens * fpt / 3
        return self.startup_seconds + (train_flops + eval_flops) / self.flops_per_second


# ---------------------------------------------------------------------------------------------------------------
# Planning


def plan_sweep(spec: SweepSpec, *, throughput: Throughput | None = None) -> list[PlannedTrial]:
    """Every grid trial of the sweep (allocation and memory experiments), in spec order."""
    fingerprint = corpus_fingerprint(spec.data)
    throughput = throughput or calibrate_throughput(spec)
    trials: list[PlannedTrial] = []
    for exp in spec.experiments:
        if isinstance(exp, AllocationExperiment):
            p_tot = target_p_tot(spec, exp)
            for budget in exp.budgets:
                for rho in exp.rho:
                    model = allocation_model(spec, p_tot, rho)
                    for seed in exp.seeds:
                        trials.append(_planned(spec, exp.name, exp.kind, model, rho, budget, seed, fingerprint,
                                               throughput))
        elif isinstance(exp, MemoryExperiment):
            for kind in exp.memory:
                for slots in exp.slots:
                    model = dataclasses.replace(spec.model, memory=engram_shape(spec, slots, kind))
                    for seed in exp.seeds:
                        trials.append(_planned(spec, exp.name, exp.kind, model, None, exp.budget, seed,
                                               fingerprint, throughput))
    # Equal configs are one trial (content-addressed): e.g. rho = 0.99 and 1.0 can both round to the pure MoE,
    # or two experiments can share a point. It runs once and is recorded under its first occurrence.
    unique: dict[str, PlannedTrial] = {}
    for t in trials:
        unique.setdefault(t.trial_id, t)
    return list(unique.values())


def plan_search_trial(spec: SweepSpec, experiment: str, rho: float, seed: int, *,
                      throughput: Throughput | None = None, fingerprint: str | None = None) -> PlannedTrial:
    """One trial of search experiment `experiment` at an Optuna-suggested `rho` (in [0, 1])."""
    exp = spec.experiment(experiment)
    if not isinstance(exp, SearchExperiment):
        raise ValueError(f"experiment: {experiment!r} is a {exp.kind} experiment, not a search")
    if not 0 <= rho <= 1:
        raise ValueError(f"rho: expected a number in [0, 1], got {rho}")
    model = allocation_model(spec, target_p_tot(spec, exp), float(rho))
    return _planned(spec, exp.name, exp.kind, model, float(rho), exp.budget, seed,
                    fingerprint or corpus_fingerprint(spec.data), throughput or calibrate_throughput(spec))


def allocation_model(spec: SweepSpec, p_tot: float, rho: float) -> ModelConfig:
    """The backbone with routed experts and Engram slots solved for (P_tot, rho)."""
    return solve_allocation(spec.model, p_tot, rho).config


def _planned(spec: SweepSpec, experiment: str, kind: str, model: ModelConfig, rho: float | None,
             budget: float, seed: int, fingerprint: str, throughput: Throughput) -> PlannedTrial:
    config = TrialConfig(model=model, data=spec.data, train=spec.trial_train(budget, seed))
    fpt = flops_per_token(model)
    steps = horizon_steps(config.train, fpt, model.seq_len)
    return PlannedTrial(
        trial_id=trial_id(config, fingerprint), sweep=spec.name, experiment=experiment, kind=kind,
        memory=model.memory.kind, rho=rho, slots=model.memory.slots if model.memory.kind != "none" else 0,
        seed=seed, budget=float(budget), config=config, counts=param_counts(model), flops_per_token=fpt,
        tokens=steps * config.train.batch_size * model.seq_len,
        est_seconds=throughput.seconds(config, fpt, steps))


# ---------------------------------------------------------------------------------------------------------------
# Throughput (for ETAs)


def calibrate_throughput(spec: SweepSpec, runs: pd.DataFrame | None = None) -> Throughput:
    """Effective FLOP/s of one trial: measured from finished trials in `runs` if any, else calibrated."""
    if runs is not None and len(runs):
        ok = runs[(runs["status"] == "ok") & (runs["wall_seconds"] > 0)]
        if len(ok):
            rate = statistics.median((ok["compute"] / ok["wall_seconds"]).tolist())
            return Throughput(rate, STARTUP_SECONDS,
                              f"measured: median {rate / 1e9:.2f} GFLOP/s over {len(ok)} finished trials")
    peak = matmul_flops_per_second(spec.model.d_model, spec.train.batch_size * spec.model.seq_len,
                                   threads=max(1, int(spec.resources.cpus_per_trial)))
    import torch

    efficiency = CPU_EFFICIENCY
    if resolve_precision(spec.train.precision, torch.device("cpu")) == "bf16":
        efficiency *= BF16_CPU_SPEEDUP
    return Throughput(peak * efficiency, STARTUP_SECONDS,
                      f"calibrated: {peak / 1e9:.2f} GFLOP/s fp32 matmul x efficiency {efficiency:.3g}")


def matmul_flops_per_second(d_model: int, n_tokens: int, *, threads: int) -> float:
    """FLOP/s of (n_tokens x d) @ (d x 4d) fp32 matmuls on `threads` threads: the best of CALIBRATION_WINDOWS
    short windows, because on a shared machine the first windows (thread pool start) and any window another
    process preempts read low; the best is the closest to what the core can do."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n_tokens, d_model)
        b = torch.randn(d_model, 4 * d_model)
        best = 0.0
        for _ in range(CALIBRATION_WINDOWS):
            n, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < CALIBRATION_SECONDS / CALIBRATION_WINDOWS:
                a @ b
                n += 1
            best = max(best, n / elapsed)
    finally:
        torch.set_num_threads(before)
    return best * 2 * n_tokens * d_model * 4 * d_model


def parallel_slots(spec: SweepSpec) -> int:
    """Trials running at once on this machine (an embedded local Ray)."""
    n = max(1, int((os.cpu_count() or 1) // spec.resources.cpus_per_trial))
    return min(n, spec.resources.max_concurrent) if spec.resources.max_concurrent else n


# ---------------------------------------------------------------------------------------------------------------
# The printed plan


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def format_seconds(s: float) -> str:
    s = int(round(s))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def plan_table(spec: SweepSpec, trials: list[PlannedTrial], stored: set[str], throughput: Throughput,
               search_done: Mapping[str, int] | None = None) -> str:
    """The text `engram-sweep plan` prints: one row per trial, then deviations from targets and the ETA.
    `search_done`: complete trials already stored per search experiment (they are not run again)."""
    header = ["experiment", "memory", "rho", "rho_ach", "slots", "n_routed", "P_tot", "dP_tot", "P_act",
              "P_sparse", "seed", "tokens", "FLOPs", "ETA", "stored"]
    rows, max_dp, max_drho, dp_act = [], 0.0, 0.0, []
    targets = {e.name: target_p_tot(spec, e) for e in spec.experiments if not isinstance(e, MemoryExperiment)}
    # P_act of each allocation/search experiment's rho = 1 model: the fixed P_act the other rhos deviate from.
    p_act_ref = {name: solve_allocation(spec.model, p_tot, 1.0).counts.p_act for name, p_tot in targets.items()}
    for t in trials:
        c = t.counts
        dp = (c.p_tot / targets[t.experiment] - 1) if t.experiment in targets else None
        rho_ach = c.rho
        if dp is not None:
            max_dp = max(max_dp, abs(dp))
            dp_act.append(c.p_act / p_act_ref[t.experiment] - 1)
        if t.rho is not None and rho_ach is not None:
            max_drho = max(max_drho, abs(rho_ach - t.rho))
        rows.append([t.experiment, t.memory, "-" if t.rho is None else f"{t.rho:.3g}",
                     "-" if rho_ach is None or t.rho is None else f"{rho_ach:.3f}", str(t.slots),
                     str(t.config.model.n_routed), _si(c.p_tot), "-" if dp is None else f"{100 * dp:+.1f}%",
                     _si(c.p_act), _si(c.p_sparse), str(t.seed), _si(t.tokens), f"{t.flops_per_token * t.tokens:.2e}",
                     format_seconds(t.est_seconds), "yes" if t.trial_id in stored else "no"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]

    pending = [t for t in trials if t.trial_id not in stored]
    eta = sum(t.est_seconds for t in pending)
    for exp in spec.experiments:
        if isinstance(exp, SearchExperiment):
            probe = plan_search_trial(spec, exp.name, 1.0, exp.seed, throughput=throughput)  # 1: always realisable
            n_done = min(exp.n_trials, (search_done or {}).get(exp.name, 0))
            eta += (exp.n_trials - n_done) * probe.est_seconds
            lines.append(f"{exp.name}: search, {exp.n_trials} Optuna trials over rho in [0, 1] at budget "
                         f"{exp.budget:.2e} FLOPs ({n_done} stored), ~{format_seconds(probe.est_seconds)} each "
                         f"(rho=1 estimate)")
    slots = parallel_slots(spec)
    lines += [
        f"{len(trials)} grid trials: {len(trials) - len(pending)} stored, {len(pending)} to run",
        f"deviation from targets: max |P_tot/target - 1| = {100 * max_dp:.2f}%, max |rho_ach - rho| = {max_drho:.3f}",
        "P_act vs the rho = 1 model (Engram projections, norms and conv add to it; fewer routers take away): "
        + (f"{100 * min(dp_act):+.1f}% .. {100 * max(dp_act):+.1f}%" if dp_act else "-"),
        f"ETA: {format_seconds(eta / slots)} with {slots} trial(s) at once "
        f"({format_seconds(eta)} of trial time; {throughput.source}; startup {throughput.startup_seconds:.0f}s/trial)",
    ]
    return "\n".join(lines)
