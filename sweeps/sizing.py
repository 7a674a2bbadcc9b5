"""Sizing a sweep's models from an experiment's targets, in plain arithmetic (no torch, and no spec types, so
that `sweeps.spec` can call it): the P_tot target of an allocation or search experiment, the memory of a memory
experiment's slot count, and the FLOPs of one optimiser step (the least budget a trial can have).

`sweeps.spec` validates a spec with these (a target the allocation solver cannot realise, a budget below one
step, is refused at load); `sweeps.plan` builds every trial from them.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from engram.accounting import flops_per_token, p_tot_for_ratio
from engram.config import MemoryConfig, ModelConfig


class PTotTarget(Protocol):
    """An experiment's P_tot target: exactly one of the two is set (the spec checks it)."""

    @property
    def p_tot(self) -> float | None: ...

    @property
    def p_tot_ratio(self) -> float | None: ...


def target_p_tot(base: ModelConfig, exp: PTotTarget) -> float:
    """The experiment's P_tot target on backbone `base`: `p_tot`, or `p_tot_ratio` times P_act of the rho = 1
    (pure MoE) model of that P_tot (engram.accounting.p_tot_for_ratio)."""
    if exp.p_tot is not None:
        return float(exp.p_tot)
    assert exp.p_tot_ratio is not None
    return float(p_tot_for_ratio(base, exp.p_tot_ratio))


def memory_for_slots(base: ModelConfig, slots: int, kind: str = "engram") -> MemoryConfig:
    """`base.memory`'s shape with a kind and slot count filled in; kind "none" is the memory-free model.

    `slots` counts Engram rows (d_head wide). OverEncoding rows are d_model / ((N-1) * K) wide, so its table gets
    slots * d_head / that width rows: equal table parameters at equal `slots` (the same rows at the default
    shape, where both widths are 16)."""
    if kind == "none":
        return MemoryConfig()
    if kind == "overencoding":
        width = base.d_model // ((base.memory.max_ngram - 1) * base.memory.n_heads)
        slots = round(int(slots) * base.memory.d_head / max(width, 1))
    return dataclasses.replace(base.memory, kind=kind, slots=int(slots))


def step_flops(model: ModelConfig, batch_size: int) -> float:
    """FLOPs of one optimiser step of `model` at `batch_size` sequences: the least budget a trial can have."""
    return flops_per_token(model) * batch_size * model.seq_len
