"""The plan: a SweepSpec expanded into concrete trials (solver applied, horizon and seed set, trial ids, costs).

`plan_sweep` lists the grid trials (allocation and memory experiments); a search experiment's trials exist only
once Optuna suggests a rho, and the launcher builds each with `plan_search_trial`. `plan_table` renders what
`engram-sweep plan` prints, `PlannedTrial.as_row` what `plan --json` prints.

Fairness (docs/fairness.md): every trial of one experiment and budget trains on the same tokens
(`reference_tokens`), P_tot and P_act are held by the solver, and `check_plan_fair` refuses a plan off by more
than FAIR_TOLERANCE. Each trial's expected reads per memory-table row are shown, with a warning where a memory
experiment's slots get fewer than analysis.diagnostics.PLANNED_LOOKUPS_PER_ROW (the report's threshold on the
median read row, over the lowest median / mean measured).

Time estimates (ETA) use a deliberately simple model, stated here and printed with the plan:
    seconds(trial) = STARTUP_SECONDS + (training FLOPs + evaluation FLOPs) / effective FLOP/s
where training FLOPs = flops_per_token * tokens, evaluation = forward passes (flops_per_token / 3 per token) of
eval_tokens every eval_interval steps, and the effective FLOP/s of one trial is either
  * measured: the median of compute / wall_seconds over finished trials already in the store, or
  * timed (CPU trials, no finished trials yet): a few of the trial's own training steps (engram.trial.train_step,
    random tokens, the spec's precision) on `cpus_per_trial` threads, one model per experiment (its most
    expert-heavy: the rho = 1 model of an allocation or search, the largest Engram of a memory experiment),
    FLOP/s of the fastest step, times TRIAL_OVER_STEP, the measured ratio of a sweep trial's throughput (two at
    once, checkpoints, Ray) to that lone step's; the experiments' rates combine as a harmonic mean (equal
    FLOPs each), or
  * timed on the GPU (trials given GPUs by `gpus_per_trial`, planned on a machine that has one): the same steps
    on the GPU, each timed to its end; no sweep-over-step factor (none measured on a GPU yet), or
  * calibrated (a step too large to time here, or GPU trials planned on a machine without a GPU, where the
    figure is a CPU's time and the plan says so): a short fp32 matmul of the trial's width on `cpus_per_trial`
    threads (~0.15 s), times CPU_EFFICIENCY, the ratio of real trial throughput to that matmul measured on this
    project's default models (d_model 128: about twice what a d_model 64 step reaches).
The sweep's ETA is the sum over trials divided by the trials that run at once locally (CPUs over
`cpus_per_trial`, GPUs over `gpus_per_trial` when that is set, and `max_concurrent`, as the launcher counts).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Mapping

import pandas as pd

from analysis.diagnostics import (LAW_MIN_DECADES, LAW_R2_BAR, MIN_LINE_TEST_COUNTS, PLANNED_LOOKUPS_PER_ROW,
                                  PLANNED_MEDIAN_SHARE, TRAINED_LOOKUPS_PER_ROW, law_grid)
from engram.accounting import (FAIR_TOLERANCE, AllocationError, ParamCounts, check_fair, flops_per_token,
                               param_counts, solve_allocation)
from engram.config import DataConfig, MemoryConfig, ModelConfig, TrainConfig, TrialConfig, horizon_steps, trial_id
from engram.data import corpus_fingerprint
from engram.memory_layout import expected_lookups_per_row
from engram.util import format_duration, format_si, format_table
from sweeps.footprint import format_bytes, limits_text, trial_footprint
from sweeps.sizing import memory_for_slots, step_flops, target_p_tot
from sweeps.spec import AllocationExperiment, MemoryExperiment, SearchExperiment, SweepSpec

# Real trial throughput over the calibration matmul's FLOP/s, bf16 trials. Re-measured 2026-12-01 on the default
# sweep (D8, `make sweep` on a fresh clone of an idle 2-core machine, 2 trials at once): median 52.7 GFLOP/s of
# training compute per trial's wall second (allocation 49.2, memory 53.7, OverEncoding 58.9) against 115-156
# GFLOP/s (median 125 of six) from this calibration on the same idle machine -> 0.42. With the 0.30 measured on
# D4 (2026-11-30, 41.4 against 139.6; the bf16 code has become faster since) `plan` put D8's run at ~20 min
# (13 min 3 s measured) and E2's (examples/memory-untied.yaml, 16-expert backbone, 60.6 GFLOP/s) at 1h04m (39 min
# 51 s). Backbones with few experts run faster than the default's allocation (up to 64 experts), so the ETA stays
# ~15% long there; the calibration's own spread (115-156 idle) moves any ETA by as much.
# The fp32 figure divides by the bf16/fp32 ratio of whole default-size trials (1.20-1.38, benchmarks/
# bench_precision.py; docs/benchmarks.md).
CPU_EFFICIENCY_BF16 = 0.42
BF16_CPU_SPEEDUP = 1.3
CPU_EFFICIENCY = CPU_EFFICIENCY_BF16 / BF16_CPU_SPEEDUP
# Sweep trial throughput over a lone timed step's (calibrate_throughput's "timed" path). Measured 2026-12-02 by
# scripts/measure_eta.py on P2's last three runs (LOG.md; d_model 64, Engram 22,000 slots, 3 trials each, two at
# once, idle 2-core machine) against the same model's lone step timed right after: 1.000, 1.048, 0.941 -> the
# median, 1.0. The lone step itself moved by that much: six repeats of it a minute later read 45.7-48.3 GFLOP/s
# against 38.7-46.3 in that script, so an ETA from it carries about +-10%.
TRIAL_OVER_STEP = 1.0
TIMED_STEPS = 3
# The timed ETA over the measured run, lowest and highest of thirteen readings over eleven runs (docs/
# benchmarks.md, "`plan`'s ETA against the trials it predicts"; D14, 2026-12-02: 0.74; MB1, 2026-12-03: 1.28).
# The same lone step, timed again minutes apart on one idle machine, read 126-163 ms (2026-12-03): the drift is
# the machine's, and timing two copies at once (as a sweep runs them) did not narrow it, so the plan prints the
# range with its ETA.
TIMED_ETA_OVER_RUN = (0.74, 1.28)
# Models whose step costs more than this (~2 s at the default's speed) or needs more memory are not timed at
# plan time: the matmul calibration stands in.
MAX_TIMED_STEP_FLOPS = 1e11
MAX_TIMED_BYTES = 2 << 30
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
    slots: int  # table rows; in a memory experiment the grid value (Engram rows of the same table parameters)
    seed: int
    budget: float | None
    config: TrialConfig  # resolved and concrete (solver applied, horizon set, seed set)
    counts: ParamCounts
    flops_per_token: float
    tokens: int
    est_seconds: float

    @property
    def knowledge_share(self) -> float | None:
        """The mix corpus's knowledge share of this trial (None for other corpora)."""
        return self.config.data.knowledge_share if self.config.data.is_mix else None

    @property
    def steps(self) -> int:
        return self.tokens // (self.config.train.batch_size * self.config.model.seq_len)

    @property
    def lookups_per_row(self) -> float | None:
        """Expected reads per memory table row over the trial (tokens x tables / rows); None without memory."""
        return expected_lookups_per_row(self.config.model.memory, self.tokens)

    def as_row(self) -> dict:
        """The planned row `engram-sweep plan --json` prints (plain JSON types)."""
        c = self.counts
        return {"trial_id": self.trial_id, "experiment": self.experiment, "kind": self.kind, "memory": self.memory,
                "rho": self.rho, "rho_achieved": c.rho if self.rho is not None else None, "slots": self.slots,
                "n_routed": self.config.model.n_routed, "d_ff_dense": self.config.model.d_ff_dense,
                "seed": self.seed, "budget": self.budget, "P_tot": c.p_tot, "P_act": c.p_act,
                "P_sparse": c.p_sparse, "table_params": c.engram_tables, "tokens": self.tokens,
                "flops_per_token": self.flops_per_token, "FLOPs": self.flops_per_token * self.tokens,
                "lookups_per_row": self.lookups_per_row, "est_seconds": self.est_seconds}


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
            p_tot = target_p_tot(spec.model, exp)
            for data in exp.data_configs(spec.data):  # the knowledge_share axis, if any: outermost
                data_fingerprint = fingerprint if data == spec.data else corpus_fingerprint(data)
                for budget in exp.budgets:
                    tokens = reference_tokens(spec, allocation_model(spec, p_tot, 1.0), budget)
                    for rho in exp.rho:
                        model = allocation_model(spec, p_tot, rho)
                        for seed in exp.seeds:
                            trials.append(_planned(spec, exp.name, exp.kind, model, rho, budget, seed,
                                                   data_fingerprint, throughput, tokens, data=data))
        elif isinstance(exp, MemoryExperiment):
            tokens = reference_tokens(spec, memory_free_model(spec), exp.budget)
            for kind in exp.memory:
                for slots in (exp.slots if kind != "none" else (0,)):  # one memory-free point
                    model = dataclasses.replace(spec.model, memory=memory_for_slots(spec.model, slots, kind))
                    for seed in exp.seeds:
                        trials.append(_planned(spec, exp.name, exp.kind, model, None, exp.budget, seed,
                                               fingerprint, throughput, tokens, slots=int(slots)))
    # Equal configs are one trial (content-addressed): e.g. rho = 0.99 and 1.0 can both round to the pure MoE,
    # or two experiments can share a point. It runs once and is recorded under its first occurrence.
    unique: dict[str, PlannedTrial] = {}
    for t in trials:
        unique.setdefault(t.trial_id, t)
    planned = list(unique.values())
    check_plan_fair(spec, planned)
    return planned


def plan_search_trial(spec: SweepSpec, experiment: str, rho: float, seed: int, *,
                      throughput: Throughput | None = None, fingerprint: str | None = None) -> PlannedTrial:
    """One trial of search experiment `experiment` at an Optuna-suggested `rho` (in [0, 1]); AllocationError
    when no model of the shape realises that rho with P_tot and P_act within FAIR_TOLERANCE."""
    exp = spec.experiment(experiment)
    if not isinstance(exp, SearchExperiment):
        raise ValueError(f"experiment: {experiment!r} is a {exp.kind} experiment, not a search")
    if not 0 <= rho <= 1:
        raise ValueError(f"rho: expected a number in [0, 1], got {rho}")
    p_tot = target_p_tot(spec.model, exp)
    alloc = solve_allocation(spec.model, p_tot, float(rho))
    check_fair(alloc)  # AllocationError: a rho this shape cannot hold within the fairness tolerance
    model = alloc.config
    tokens = reference_tokens(spec, allocation_model(spec, p_tot, 1.0), exp.budget)
    return _planned(spec, exp.name, exp.kind, model, float(rho), exp.budget, seed,
                    fingerprint or corpus_fingerprint(spec.data), throughput or calibrate_throughput(spec), tokens)


def allocation_model(spec: SweepSpec, p_tot: float, rho: float) -> ModelConfig:
    """The backbone with routed experts and Engram slots solved for (P_tot, rho)."""
    return solve_allocation(spec.model, p_tot, rho).config


def memory_free_model(spec: SweepSpec) -> ModelConfig:
    """A memory experiment's fixed backbone without memory: the reference of its token count."""
    return dataclasses.replace(spec.model, memory=MemoryConfig())


def reference_tokens(spec: SweepSpec, reference: ModelConfig, budget: float) -> int:
    """Training tokens of every trial of one experiment and budget: what the budget buys the reference model
    (allocation and search: the rho = 1 model; memory: the memory-free backbone), in whole steps.

    Why one count for all: with the budget as each trial's own FLOPs horizon, a model with ~0.02% more P_act can
    round to one step fewer (0.8% of ~120 steps), and a memory model trains ~5% fewer tokens than the
    memory-free one. Equal tokens compare models on the same data; their FLOPs (shown by the plan, recorded per
    trial) then differ by their P_act difference: < 0.5% in an allocation experiment (FAIR_TOLERANCE), the
    memory's dense part in a memory experiment."""
    probe = dataclasses.replace(spec.train, steps=None, tokens=None, flops=float(budget))
    steps = horizon_steps(probe, flops_per_token(reference), reference.seq_len)
    return steps * spec.train.batch_size * reference.seq_len


def _planned(spec: SweepSpec, experiment: str, kind: str, model: ModelConfig, rho: float | None,
             budget: float, seed: int, fingerprint: str, throughput: Throughput, tokens: int,
             slots: int | None = None, data: DataConfig | None = None) -> PlannedTrial:
    """`slots`: the grid value of a memory experiment (Engram rows; OverEncoding's table gets the rows of equal
    table parameters, sweeps.sizing.memory_for_slots); by default the model's table rows. `data`: the trial's corpus
    when the experiment sweeps the mix corpus's knowledge share (default: the spec's)."""
    config = TrialConfig(model=model, data=spec.data if data is None else data,
                         train=spec.trial_train(budget, seed, tokens))
    fpt = flops_per_token(model)
    steps = horizon_steps(config.train, fpt, model.seq_len)
    return PlannedTrial(
        trial_id=trial_id(config, fingerprint), sweep=spec.name, experiment=experiment, kind=kind,
        memory=model.memory.kind, rho=rho,
        slots=0 if model.memory.kind == "none" else (model.memory.slots if slots is None else slots),
        seed=seed, budget=float(budget), config=config, counts=param_counts(model), flops_per_token=fpt,
        tokens=steps * config.train.batch_size * model.seq_len,
        est_seconds=throughput.seconds(config, fpt, steps))


# ---------------------------------------------------------------------------------------------------------------
# Throughput (for ETAs)


def calibrate_throughput(spec: SweepSpec, runs: pd.DataFrame | None = None) -> Throughput:
    """Effective FLOP/s of one trial: measured from finished trials in `runs` if any, else timed training steps
    (CPU trials) or the matmul calibration (see the module docstring)."""
    if runs is not None and len(runs):
        ok = runs[(runs["status"] == "ok") & (runs["wall_seconds"] > 0)]
        if len(ok):
            rate = statistics.median((ok["compute"] / ok["wall_seconds"]).tolist())
            return Throughput(rate, STARTUP_SECONDS,
                              f"measured: median {rate / 1e9:.2f} GFLOP/s over {len(ok)} finished trials")
    import torch  # only calibrating needs torch: importing the plan does not

    from engram.trial import resolve_precision

    # A trial trains on a GPU only when Ray gives it one (sweeps.launcher.worker.hide_gpus_not_given).
    on_cpu = spec.train.device == "cpu" or spec.resources.gpus_per_trial == 0
    threads = max(1, int(spec.resources.cpus_per_trial))
    models = timing_models(spec)
    if not on_cpu and torch.cuda.is_available() and models:
        cuda = torch.device("cuda")
        rates = {name: step_flops_per_second(m, spec.train, threads=threads, device=cuda)
                 for name, m in models.items()}
        rate = len(rates) / sum(1 / r for r in rates.values())
        each = ", ".join(f"{name} {r / 1e9:.1f}" for name, r in rates.items())
        return Throughput(rate, STARTUP_SECONDS, f"timed on {torch.cuda.get_device_name(cuda)}: training steps "
                          f"at {each} GFLOP/s (a sweep's trials over a lone step: measured on CPUs only)")
    if models and on_cpu and all(step_flops(m, spec.train.batch_size) <= MAX_TIMED_STEP_FLOPS and
                                 timing_bytes(m, spec) <= MAX_TIMED_BYTES for m in models.values()):
        rates = {name: step_flops_per_second(m, spec.train, threads=threads) for name, m in models.items()}
        rate = len(rates) / sum(1 / r for r in rates.values()) * TRIAL_OVER_STEP
        each = ", ".join(f"{name} {r / 1e9:.1f}" for name, r in rates.items())
        return Throughput(rate, STARTUP_SECONDS,
                          f"timed: training steps at {each} GFLOP/s x {TRIAL_OVER_STEP} in a sweep")
    peak = matmul_flops_per_second(spec.model.d_model, spec.train.batch_size * spec.model.seq_len, threads=threads)
    efficiency = CPU_EFFICIENCY
    if resolve_precision(spec.train.precision, torch.device("cpu")) == "bf16":
        efficiency *= BF16_CPU_SPEEDUP
    source = f"calibrated: {peak / 1e9:.2f} GFLOP/s fp32 matmul x efficiency {efficiency:.3g}"
    if not on_cpu:  # trials given GPUs, and no GPU here to time their steps on
        source += (" on this machine's CPU; the trials train on a GPU this machine does not have, so this is a CPU's "
                   "time for them, not theirs")
    return Throughput(peak * efficiency, STARTUP_SECONDS, source)


def timing_models(spec: SweepSpec) -> dict[str, ModelConfig]:
    """Per experiment, the model whose training steps time its trials: the most expert-heavy of its grid (the
    rho = 1 model of an allocation or search at its first budget's target; a memory experiment's backbone with
    its largest table of its first memory kind that has one)."""
    out: dict[str, ModelConfig] = {}
    for exp in spec.experiments:
        if isinstance(exp, MemoryExperiment):
            kinds = [k for k in exp.memory if k != "none"] or ["none"]
            out[exp.name] = dataclasses.replace(spec.model, memory=memory_for_slots(spec.model, max(exp.slots),
                                                                                   kinds[0]))
        else:
            out[exp.name] = allocation_model(spec, target_p_tot(spec.model, exp), 1.0)
    return out


def timing_bytes(model: ModelConfig, spec: SweepSpec) -> int:
    """Peak memory of timing `model`'s steps: its trial's footprint (sweeps.footprint)."""
    return trial_footprint(TrialConfig(model=model, data=spec.data, train=spec.train), param_counts(model)).total


def step_flops_per_second(model: ModelConfig, train: TrainConfig, *, threads: int, device=None) -> float:
    """Training FLOP/s of `model`'s own optimiser step (engram.trial.train_step: forward, backward, clipping,
    AdamW and SparseAdam, router biases) on `threads` CPU threads, or on `device` (a torch.device; None: the CPU)
    timed to the step's end, in the precision `train` resolves to there: random tokens, one warm-up step, then
    the fastest of TIMED_STEPS (on a shared machine the fastest is the least disturbed)."""
    import torch

    from engram.model import EngramMoE
    from engram.trial import build_optimizers, resolve_precision, train_step

    device = torch.device("cpu") if device is None else device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(0)
            net = EngramMoE(model).to(device)
            dense_opt, sparse_opt = build_optimizers(net, train)
            params = [p for p in net.parameters() if p.requires_grad]
            precision = resolve_precision(train.precision, device)
            best = float("inf")
            for i in range(1 + TIMED_STEPS):
                batch = torch.randint(0, model.vocab_size, (train.batch_size, model.seq_len + 1)).to(device)
                sync()
                t0 = time.perf_counter()
                train_step(net, batch, dense_opt, sparse_opt, params, lr=train.lr, train=train, precision=precision)
                sync()
                if i:  # the first step allocates the optimiser state and warms the allocator
                    best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return step_flops(model, train.batch_size) / best


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
    """Trials running at once on this machine (an embedded local Ray): its CPUs over cpus_per_trial, its GPUs
    over gpus_per_trial when trials take GPUs, and max_concurrent, as the launcher counts them on a cluster."""
    n = int((os.cpu_count() or 1) // spec.resources.cpus_per_trial)
    if spec.resources.gpus_per_trial > 0:
        import torch

        n = min(n, math.floor(torch.cuda.device_count() / spec.resources.gpus_per_trial + 1e-9))
    n = max(1, n)
    return min(n, spec.resources.max_concurrent) if spec.resources.max_concurrent else n


# ---------------------------------------------------------------------------------------------------------------
# The printed plan


def plan_table(spec: SweepSpec, trials: list[PlannedTrial], stored: set[str], throughput: Throughput,
               search_done: Mapping[str, int] | None = None) -> str:
    """The text `engram-sweep plan` prints: one row per trial, then deviations from targets, table-training
    warnings and the ETA. `search_done`: complete trials already stored per search experiment (they are not run
    again)."""
    header = ["experiment", "memory", "rho", "rho_ach", "slots", "n_routed", "d_ff", "P_tot", "dP_tot", "P_act",
              "dP_act", "P_sparse", "seed", "tokens", "FLOPs", "lookups/row", "ETA", "peak mem", "stored"]
    rows = []
    dev = fairness_deviations(spec, trials)
    for t in trials:
        c, d = t.counts, dev.get(t.trial_id, {})
        rows.append([t.experiment, t.memory, "-" if t.rho is None else f"{t.rho:.3g}",
                     "-" if t.rho is None else f"{c.rho:.3f}", str(t.slots),
                     str(t.config.model.n_routed), str(t.config.model.d_ff_dense), format_si(c.p_tot),
                     "-" if "p_tot" not in d else f"{100 * d['p_tot']:+.2f}%", format_si(c.p_act),
                     "-" if "p_act" not in d else f"{100 * d['p_act']:+.2f}%", format_si(c.p_sparse), str(t.seed),
                     format_si(t.tokens), f"{t.flops_per_token * t.tokens:.2e}",
                     "-" if t.lookups_per_row is None else f"{t.lookups_per_row:.3g}",
                     format_duration(t.est_seconds), format_bytes(trial_footprint(t.config, t.counts).total),
                     "yes" if t.trial_id in stored else "no"])
    if any(t.knowledge_share is not None for t in trials):  # the mix corpus: its knowledge share per row
        header.insert(1, "share")
        for r, t in zip(rows, trials):
            r.insert(1, "-" if t.knowledge_share is None else f"{t.knowledge_share:.3g}")
    lines = format_table(header, rows)

    pending = [t for t in trials if t.trial_id not in stored]
    eta = sum(t.est_seconds for t in pending)
    for exp in spec.experiments:
        if isinstance(exp, SearchExperiment):
            probe = plan_search_trial(spec, exp.name, 1.0, exp.seed, throughput=throughput)  # 1: always realisable
            n_done = min(exp.n_trials, (search_done or {}).get(exp.name, 0))
            eta += (exp.n_trials - n_done) * probe.est_seconds
            lines.append(f"{exp.name}: search, {exp.n_trials} Optuna trials over rho in [0, 1] at budget "
                         f"{exp.budget:.2e} FLOPs ({n_done} stored), ~{format_duration(probe.est_seconds)} each "
                         f"(rho=1 estimate)")
    slots = parallel_slots(spec)
    lines.append(limits_text(spec, trials, slots))

    def worst(key: str) -> str:
        values = [abs(d[key]) for d in dev.values() if key in d]
        return f"{100 * max(values):.2f}%" if values else "-"

    max_drho = max((abs(t.counts.rho - t.rho) for t in trials if t.rho is not None), default=0.0)
    lines += [
        f"{len(trials)} grid trials: {len(trials) - len(pending)} stored, {len(pending)} to run",
        f"fairness (tolerance {100 * FAIR_TOLERANCE:.1f}%): max |P_tot/target - 1| = {worst('p_tot')}, "
        f"max |P_act/P_act(rho=1) - 1| = {worst('p_act')}, max token spread within an experiment and budget = "
        f"{worst('tokens')}; max |rho_ach - rho| = {max_drho:.3f}",
        "P_act held by narrowing the dense FFN (d_ff) by the memory's dense parameters (docs/fairness.md)",
    ]
    lines += table_training_warnings(spec, trials)
    lines += allocation_table_warnings(spec, trials)
    lines += memory_law_notes(spec)
    lines.append(f"ETA: {format_duration(eta / slots)} with {slots} trial(s) at once "
                 f"({format_duration(eta)} of trial time; {throughput.source}; "
                 f"startup {throughput.startup_seconds:.0f}s/trial)")
    if throughput.source.startswith("timed"):
        low, high = TIMED_ETA_OVER_RUN
        lines.append(f"  (timed ETAs have read {low:.2f}-{high:.2f} of the measured run on 2-core machines: a step "
                     f"timed alone drifts +-15% from minute to minute there; docs/benchmarks.md)")
    return "\n".join(lines)


def fairness_deviations(spec: SweepSpec, trials: list[PlannedTrial]) -> dict[str, dict[str, float]]:
    """Per trial_id, the relative deviations the fairness rule bounds: p_tot (from the experiment's target) and
    p_act (from its rho = 1 model) for allocation and search trials; tokens (from the smallest token count of
    the same experiment and budget) for every trial."""
    out: dict[str, dict[str, float]] = {t.trial_id: {} for t in trials}
    for exp in spec.experiments:
        if isinstance(exp, MemoryExperiment):
            continue
        p_tot = target_p_tot(spec.model, exp)
        p_act_ref = solve_allocation(spec.model, p_tot, 1.0).counts.p_act
        for t in trials:
            if t.experiment == exp.name:
                out[t.trial_id].update(p_tot=t.counts.p_tot / p_tot - 1, p_act=t.counts.p_act / p_act_ref - 1)
    groups: dict[tuple, list[PlannedTrial]] = {}
    for t in trials:
        groups.setdefault((t.experiment, t.budget), []).append(t)
    for group in groups.values():
        least = min(t.tokens for t in group)
        for t in group:
            out[t.trial_id]["tokens"] = t.tokens / least - 1
    return out


def check_plan_fair(spec: SweepSpec, trials: list[PlannedTrial]) -> None:
    """Raise AllocationError (one line) when any planned trial breaks the fairness tolerance (FAIR_TOLERANCE)."""
    names = {"p_tot": "P_tot vs its target", "p_act": "P_act vs the rho = 1 model", "tokens": "tokens vs the "
             "experiment's other trials"}
    by_id = {t.trial_id: t for t in trials}
    for tid, d in fairness_deviations(spec, trials).items():
        for key, value in d.items():
            if abs(value) > FAIR_TOLERANCE:
                t = by_id[tid]
                raise AllocationError(f"experiments.{t.experiment}: {names[key]} off by {100 * value:+.2f}% at "
                                 f"rho={t.rho}, slots={t.slots} (tolerance {100 * FAIR_TOLERANCE:.1f}%)")


def _thinly_read(trials: list[PlannedTrial], key, **match) -> list[tuple]:
    """Sorted distinct (key(trial), expected lookups per row) of the trials matching every `match` attribute whose
    tables get fewer than PLANNED_LOOKUPS_PER_ROW expected lookups per row (trials without tables are skipped)."""
    return sorted({(key(t), t.lookups_per_row) for t in trials
                   if all(getattr(t, name) == value for name, value in match.items())
                   and t.lookups_per_row is not None and t.lookups_per_row < PLANNED_LOOKUPS_PER_ROW})


def table_training_warnings(spec: SweepSpec, trials: list[PlannedTrial]) -> list[str]:
    """One line per memory experiment (and memory kind) whose slot grid reaches past what its budget trains:
    slot points whose expected (mean) lookups per row fall below PLANNED_LOOKUPS_PER_ROW, i.e. where the median
    read row, which the report checks against TRAINED_LOOKUPS_PER_ROW, may fall short (analysis.diagnostics says
    how both were measured)."""
    lines = []
    for exp in spec.experiments:
        if not isinstance(exp, MemoryExperiment):
            continue
        for kind in exp.memory:
            under = _thinly_read(trials, lambda t: t.slots, experiment=exp.name, memory=kind)
            if under:
                points = ", ".join(f"{s:.3g} ({n:.3g}/row)" for s, n in under)
                lines.append(f"warning: {exp.name} ({kind}): slots {points} get fewer than "
                             f"{PLANNED_LOOKUPS_PER_ROW:g} expected lookups per row at {exp.budget:.2e} FLOPs, so "
                             f"their median read row may get fewer than {TRAINED_LOOKUPS_PER_ROW:g} (measured "
                             f"median / mean >= {PLANNED_MEDIAN_SHARE:g}): those tables stay near their init "
                             f"(outside the trained regime)")
    return lines


def memory_law_notes(spec: SweepSpec) -> list[str]:
    """One line per memory experiment with Engram whose slot grid cannot meet the counts or the decades of the bar
    the report reads each memory law against (analysis.diagnostics: >= MIN_LINE_TEST_COUNTS slot counts,
    >= LAW_MIN_DECADES decades), so that a design that cannot show Engram's log-linear law says so before it runs.
    (Experiments of OverEncoding alone are comparisons at equal table parameters, not laws: no note.)"""
    lines = []
    for exp in spec.experiments:
        if not isinstance(exp, MemoryExperiment) or "engram" not in exp.memory:
            continue
        n_counts, decades, enough_counts, enough_decades = law_grid(exp.slots)
        short = []
        if not enough_counts:
            short.append(f"{n_counts} slot count(s), under the {MIN_LINE_TEST_COUNTS} a line needs")
        if not enough_decades:
            short.append(f"{decades:.3f} decades of slots, under {LAW_MIN_DECADES:g}")
        if short:
            lines.append(f"note: {exp.name}: {'; '.join(short)}: the report cannot call this memory law log-linear "
                         f"by its bar (slope above 0, R² >= {LAW_R2_BAR:g}, >= {LAW_MIN_DECADES:g} decades, every "
                         f"point trained)")
    return lines


def allocation_table_warnings(spec: SweepSpec, trials: list[PlannedTrial]) -> list[str]:
    """One line per allocation experiment and budget whose rho < 1 points hold tables that the budget cannot train
    (expected lookups per row under PLANNED_LOOKUPS_PER_ROW, as for memory experiments). Unlike a memory
    experiment's slot grid, an allocation's slot counts follow from P_tot and rho, so the plan only says it: those
    points set thinly read tables against experts, and the report flags the ones that end `untrained`.
    More tokens per trial, or a smaller P_tot/P_act, bring them into the trained regime."""
    lines = []
    for exp in spec.experiments:
        if not isinstance(exp, AllocationExperiment):
            continue
        for budget in exp.budgets:
            under = _thinly_read(trials, lambda t: t.rho, experiment=exp.name, budget=budget)
            if under:
                rhos = ", ".join(f"{r:g}" for r, _ in under)
                reads = [n for _, n in under]
                lines.append(f"warning: {exp.name} @ {budget:.2e} FLOPs: the tables at rho {rhos} get "
                             f"{min(reads):.3g}-{max(reads):.3g} expected lookups per row (fewer than "
                             f"{PLANNED_LOOKUPS_PER_ROW:g}): at this P_tot they hold more rows than the budget reads, "
                             f"so those points set thinly read tables against experts (the report flags those whose "
                             f"median read row gets fewer than {TRAINED_LOOKUPS_PER_ROW:g} untrained)")
    return lines
