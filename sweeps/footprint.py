"""Peak memory of one trial, estimated before it runs, and the check that refuses trials no machine can hold.

A trial's resident memory at its peak (the backward pass of a training step) is, in fp32 bytes:
- weights: every parameter, memory tables included;
- gradients: the dense parameters' (the tables' sparse gradients hold only the rows a batch touched);
- optimiser state: AdamW's two moments for the dense parameters and SparseAdam's two moments for the tables,
  which SparseAdam keeps as DENSE tensors the size of the table (it updates them lazily, row by row): a table
  costs four times its own size once trained;
- activations kept for the backward pass, per layer, from the model's shapes (coefficients below);
- logits: (tokens, vocabulary) three times over (the logits, the softmax kept for the backward, the gradient);
- the process itself: Python, torch, the token cache (RUNTIME_BYTES, measured).
The figure is an estimate meant to tell a trial that fits from one that cannot (a 64 TB table): against measured
peak RSS it was 0.92-1.02 of the truth from a tiny model to 1e7 slots (docs/reliability.md, "Peak memory";
scripts/measure_peak_memory.py). Tokenizing a corpus is not included: the launcher does it once in the driver.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from typing import TYPE_CHECKING

from engram.accounting import ParamCounts
from engram.config import TrialConfig
from sweeps.spec import AllocationExperiment, MemoryExperiment, SearchExperiment, SpecError, SweepSpec

if TYPE_CHECKING:
    from sweeps.plan import PlannedTrial

FLOAT_BYTES = 4  # fp32 weights, gradients, optimiser state and activations (the CPU default)
# Python, torch, the data pipeline and the token cache of a trial process, before the model: measured ~0.4 GB
# (RSS of a tiny trial, whose model is a few MB); taken a little above.
RUNTIME_BYTES = 450 * 2**20
# Activations kept per token per layer, in units of d_model (residual, norms, q/k/v/o, rotary copies,
# attention output) and in units of an FFN's hidden width (gate, up, their product). Counted from
# engram/model.py and engram/moe.py; the measured peaks of docs/reliability.md sit within the stated margin.
ATTN_ACTS_PER_D = 12
FFN_ACTS_PER_HIDDEN = 3
LOGIT_COPIES = 3
# A trial planned to take longer than this (at the plan's throughput) is refused by `run`: such a budget is a typo
# (1e30 for 1e13), not an experiment. A year is far beyond any sweep this tool is sized for.
MAX_TRIAL_SECONDS = 365 * 24 * 3600.0
# The plan's throughput is calibrated on this machine's CPU, meaningless for a trial that trains on a GPU
# (`train.device: cuda` or `resources.gpus_per_trial` > 0). Such a trial is refused only past what a year at
# 1 PFLOP/s would train (about one H200's dense bf16 peak): a typo, not an experiment.
GPU_MAX_TRIAL_FLOPS = MAX_TRIAL_SECONDS * 1e15
# Measured peaks were up to 8% above the estimate (docs/reliability.md): a trial must fit with this margin.
FIT_MARGIN = 1.1


@dataclass(frozen=True)
class Footprint:
    """Estimated bytes at a trial's peak, by part."""

    weights: int
    gradients: int
    optimiser: int
    activations: int
    logits: int
    runtime: int
    tables: int  # of the above: the memory tables' weights and SparseAdam moments (set by slots / P_tot)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimiser + self.activations + self.logits + self.runtime


def trial_footprint(config: TrialConfig, counts: ParamCounts) -> Footprint:
    """Peak resident bytes of one training trial of `config` (with its parameter `counts`)."""
    m, t = config.model, config.train
    tables = counts.engram_tables
    dense = counts.total - tables
    n_tok = t.batch_size * m.seq_len  # tokens per step
    per_layer = ATTN_ACTS_PER_D * m.d_model + m.n_heads * m.seq_len  # attention scores if not fused
    n_moe = m.n_layers - m.n_dense_layers
    acts = m.n_dense_layers * (per_layer + FFN_ACTS_PER_HIDDEN * m.d_ff_dense)
    acts += n_moe * (per_layer + FFN_ACTS_PER_HIDDEN * (m.top_k + m.n_shared_experts) * m.d_expert
                     + 2 * m.top_k * m.d_model + m.n_routed)
    mem = m.memory
    if mem.kind != "none":
        n_tables = (mem.max_ngram - 1) * mem.n_heads
        row = mem.d_head if mem.kind == "engram" else m.d_model  # OverEncoding rows are d_model wide
        layers = len(mem.layers) if mem.kind == "engram" else 1
        acts += layers * (2 * n_tables * row + 6 * m.d_model)  # gathered rows (and their gradient), gates, conv
    return Footprint(
        weights=FLOAT_BYTES * counts.total,
        gradients=FLOAT_BYTES * dense,
        optimiser=FLOAT_BYTES * 2 * (dense + tables),
        activations=FLOAT_BYTES * n_tok * acts,
        logits=FLOAT_BYTES * LOGIT_COPIES * n_tok * m.vocab_size,
        runtime=RUNTIME_BYTES,
        tables=FLOAT_BYTES * 3 * tables)


def machine_memory_bytes() -> int:
    """Physical memory of this machine (what an embedded local Ray's trials share)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def format_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n / 1e3:.3g} kB"


def trial_field(spec: SweepSpec, trial: PlannedTrial, part: str) -> str:
    """The spec field that sets `part` ("tables", "budget" or "size") of `trial`, as the loader names fields."""
    i = next(n for n, e in enumerate(spec.experiments) if e.name == trial.experiment)
    exp = spec.experiments[i]
    if part == "budget":
        if isinstance(exp, AllocationExperiment):
            return f"experiments[{i}].budgets[{list(exp.budgets).index(trial.budget)}]"
        return f"experiments[{i}].budget"
    if part == "tables":
        if isinstance(exp, MemoryExperiment):
            return f"experiments[{i}].slots[{list(exp.slots).index(trial.slots)}]"
        if isinstance(exp, (AllocationExperiment, SearchExperiment)):
            return f"experiments[{i}].{'p_tot' if exp.p_tot is not None else 'p_tot_ratio'}"
    return "train.batch_size"


def trains_on_gpu(spec: SweepSpec, trial: PlannedTrial) -> bool:
    """Whether `trial` trains on a GPU: its config asks for cuda, or the spec gives each trial a GPU."""
    return trial.config.train.device == "cuda" or spec.resources.gpus_per_trial > 0


def check_trials_fit(spec: SweepSpec, trials: list[PlannedTrial], memory_bytes: int, where: str) -> None:
    """Refuse (SpecError naming the spec field) the first trial whose estimated peak, with FIT_MARGIN, exceeds
    `memory_bytes` (`where`: "this machine's", "the largest node's") or whose planned time exceeds
    MAX_TRIAL_SECONDS. Trials running at once share a machine, but Ray only counts CPUs: this check refuses only
    what cannot run at all; `plan` prints what the trials at once need."""
    for t in trials:
        fp = trial_footprint(t.config, t.counts)
        if fp.total * FIT_MARGIN > memory_bytes:
            part = "tables" if fp.tables >= fp.total / 2 else "size"
            what = (f"{t.slots:.3g} memory slots" if part == "tables" and t.kind == "memory"
                    else f"trial {t.trial_id}")
            detail = (f"memory tables and their SparseAdam moments {format_bytes(fp.tables)}" if part == "tables"
                      else f"activations and logits {format_bytes(fp.activations + fp.logits)}")
            raise SpecError(f"{trial_field(spec, t, part)}: {what} need ~{format_bytes(fp.total)} per trial "
                            f"({detail}), more than {where} {format_bytes(memory_bytes)} of memory")
        if trains_on_gpu(spec, t):
            if not math.isfinite(t.budget) or t.budget > GPU_MAX_TRIAL_FLOPS:
                raise SpecError(f"{trial_field(spec, t, 'budget')}: {t.budget:.3g} FLOPs would take more than a "
                                f"year per trial even at 1 PFLOP/s on a GPU (a typo?)")
        elif not math.isfinite(t.est_seconds) or t.est_seconds > MAX_TRIAL_SECONDS:
            raise SpecError(f"{trial_field(spec, t, 'budget')}: {t.budget:.3g} FLOPs would take ~"
                            f"{t.est_seconds / 3600:.3g} hours per trial at the planned throughput "
                            f"(more than a year; a typo?)")


def limits_text(spec: SweepSpec, trials: list[PlannedTrial], n_at_once: int) -> str:
    """The plan's line on memory (and on absurd budgets): what `run` would refuse on this machine, and why."""
    if not trials:
        return "peak memory: no grid trials"
    have = machine_memory_bytes()
    peaks = [trial_footprint(t.config, t.counts).total for t in trials]
    top = sorted(peaks, reverse=True)[:n_at_once]
    text = (f"peak memory (estimate): up to {format_bytes(max(peaks))} per trial, {format_bytes(sum(top))} for "
            f"{len(top)} at once; this machine has {format_bytes(have)}")
    try:
        check_trials_fit(spec, trials, have, "this machine's")
    except SpecError as err:
        text += f"\nwarning: `run` on this machine would refuse: {err}"
    return text
