"""Accounting against the real modules, FLOPs per token, the allocation solver on a fine rho grid, and counting
and planning without torch."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.accounting import (FAIR_TOLERANCE, AllocationError, ParamCounts, check_fair, flops_per_token,
                               p_tot_for_ratio, param_counts, solve_allocation)
from engram.config import MemoryConfig, ModelConfig
from engram.model import EngramMoE
from engram.moe import MoE

DEFAULT = ModelConfig()
ENGRAM_SHAPE = dataclasses.replace(DEFAULT, memory=MemoryConfig(kind="engram", slots=1000))

SHAPES = {
    "default": DEFAULT,
    "engram-2-layers": ModelConfig(vocab_size=300, d_model=32, n_layers=3, n_heads=2, d_expert=16, n_routed=5,
                                   memory=MemoryConfig(kind="engram", slots=3000, layers=(0, 2), max_ngram=4,
                                                       n_heads=2, d_head=8, conv_kernel=3)),
    "overencoding": ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, d_expert=16, n_routed=4,
                                memory=MemoryConfig(kind="overencoding", slots=2000)),
    "untied-no-dense": ModelConfig(vocab_size=300, d_model=48, n_layers=3, n_heads=3, n_dense_layers=0,
                                   d_expert=8, n_routed=7, top_k=3, tie_embeddings=False),
    "all-dense-untied": ModelConfig(vocab_size=200, d_model=32, n_layers=2, n_heads=4, n_dense_layers=2,
                                    d_ff_dense=40, tie_embeddings=False),
    "no-shared-two-dense": ModelConfig(vocab_size=200, d_model=32, n_layers=4, n_heads=2, n_dense_layers=2,
                                       n_shared_experts=0, d_expert=24, n_routed=3, top_k=1,
                                       memory=MemoryConfig(kind="engram", slots=800, layers=(3,))),
    "two-shared": ModelConfig(vocab_size=200, d_model=32, n_layers=2, n_heads=2, n_shared_experts=2,
                              d_expert=12, n_routed=9, top_k=4),
}


def numel(params) -> int:
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("cfg", SHAPES.values(), ids=SHAPES.keys())
def test_counts_equal_the_modules_group_by_group(cfg):
    torch.manual_seed(0)
    model = EngramMoE(cfg)
    counts = param_counts(cfg)
    assert counts.total == numel(model.parameters())
    moes = [b.ffn for b in model.blocks if isinstance(b.ffn, MoE)]
    dense = [b.ffn for b in model.blocks if not isinstance(b.ffn, MoE)]
    memory = model.memory_modules()
    tables = model.table_parameters()
    assert counts.embedding == model.wte.weight.numel()
    assert counts.head == (0 if model.head is None else model.head.weight.numel())
    assert counts.attention == numel(p for b in model.blocks for p in b.attn.parameters())
    assert counts.norms == numel(p for b in model.blocks for n in (b.norm_attn, b.norm_ffn) for p in n.parameters()) \
        + model.norm_out.weight.numel()
    assert counts.dense_ffn == numel(p for f in dense for p in f.parameters())
    assert counts.shared == numel(p for m in moes if m.shared is not None for p in m.shared.parameters())
    assert counts.routed_total == numel(p for m in moes for p in (m.w_in, m.w_out))
    assert counts.routed_active == sum((m.w_in[0].numel() + m.w_out[0].numel()) * m.top_k for m in moes)
    assert counts.router == numel(m.router.weight for m in moes)
    assert counts.engram_tables == numel(tables)
    assert counts.engram_dense == numel(p for m in memory for p in m.parameters()) - numel(tables)


def test_derived_quantities():
    c = ParamCounts(embedding=100, head=100, attention=10, norms=1, dense_ffn=5, shared=4, routed_total=40,
                    routed_active=8, router=2, engram_tables=48, engram_dense=3)
    assert c.total == 313 and c.p_tot == 113
    assert c.p_act == 10 + 1 + 5 + 4 + 8 + 2 + 3
    assert c.p_sparse == 32 + 48 and c.p_engram == 51
    assert c.rho == pytest.approx(32 / 80)
    no_sparse = dataclasses.replace(c, routed_total=8, engram_tables=0)
    assert no_sparse.p_sparse == 0 and no_sparse.rho == 1.0  # convention: nothing to allocate is pure MoE
    pure = param_counts(DEFAULT)
    assert pure.rho == 1.0 and pure.p_engram == 0 and pure.p_sparse == pure.routed_total - pure.routed_active
    assert pure.as_dict()["p_act"] == pure.p_act


def test_flops_per_token_convention():
    cfg = SHAPES["untied-no-dense"]
    c = param_counts(cfg)
    expected = 6 * (c.p_act + cfg.d_model * cfg.vocab_size) + 12 * cfg.n_layers * cfg.d_model * cfg.seq_len
    assert flops_per_token(cfg) == expected
    # Tying changes the parameter count, not the head's matmul.
    assert flops_per_token(dataclasses.replace(cfg, tie_embeddings=True)) == expected
    # Inactive experts and memory tables cost no FLOPs.
    assert flops_per_token(dataclasses.replace(DEFAULT, n_routed=64)) - flops_per_token(DEFAULT) == \
        6 * DEFAULT.n_moe_layers * DEFAULT.d_model * (64 - 16)  # router columns only
    big = dataclasses.replace(DEFAULT, memory=MemoryConfig(kind="engram", slots=1_000_000))
    small = dataclasses.replace(DEFAULT, memory=MemoryConfig(kind="engram", slots=10_000))
    assert flops_per_token(big) == flops_per_token(small)


@pytest.mark.parametrize("ratio", [3.0, 4.0, 10.0])
def test_solver_hits_p_tot_and_follows_the_expert_formula_on_a_fine_grid(ratio):
    p_tot = p_tot_for_ratio(ENGRAM_SHAPE, ratio)
    moe = solve_allocation(ENGRAM_SHAPE, p_tot, 1.0)
    assert moe.config.memory.kind == "none" and moe.rho == 1.0 and moe.counts.p_tot == p_tot
    expert = 3 * DEFAULT.d_model * DEFAULT.d_expert * DEFAULT.n_moe_layers
    router = DEFAULT.d_model * DEFAULT.n_moe_layers
    # Whole experts: the ratio is met to within half an expert (P_act moves with n only by router columns).
    assert abs(moe.counts.p_tot / moe.counts.p_act - ratio) <= 0.5 * (expert + router) / moe.counts.p_act
    prev_n, prev_slots = -1, float("inf")
    for rho in np.linspace(0.0, 1.0, 201):
        alloc = solve_allocation(ENGRAM_SHAPE, p_tot, float(rho))
        c = alloc.counts
        assert abs(c.p_tot - p_tot) <= 0.01 * p_tot, (rho, c.p_tot, p_tot)
        assert alloc.config.n_routed == DEFAULT.top_k + round(rho * moe.counts.p_sparse / expert) or \
            alloc.config == moe.config
        assert alloc.config.n_routed >= prev_n and alloc.slots <= prev_slots  # monotone in rho
        prev_n, prev_slots = alloc.config.n_routed, alloc.slots
        # P_act held: the memory's dense parameters and the router columns of removed experts are paid for by
        # a narrower dense FFN, to within half a unit of its width (3 * D per dense layer).
        unit = 3 * DEFAULT.d_model * DEFAULT.n_dense_layers
        assert c.p_act - moe.counts.p_act == (alloc.p_act_engram_dense + alloc.p_act_router_delta
                                              + alloc.d_ff_dense_delta * unit)
        assert abs(c.p_act - moe.counts.p_act) <= unit / 2
        assert alloc.p_act_deviation == pytest.approx((c.p_act - moe.counts.p_act) / moe.counts.p_act)
        # Achieved rho off the target by at most half an expert of rounding; 1e-3 for the primes of the tables.
        assert abs(alloc.rho - rho) <= 0.5 * expert / moe.counts.p_sparse + 1e-3, (rho, alloc.rho)
        assert alloc.p_tot_target == p_tot and alloc.rho_target == rho
    zero = solve_allocation(ENGRAM_SHAPE, p_tot, 0.0)
    assert zero.config.n_routed == DEFAULT.top_k and zero.rho == 0.0 and zero.config.memory.kind == "engram"


def test_solved_configs_build_models_with_the_counted_parameters():
    base = dataclasses.replace(SHAPES["engram-2-layers"], memory=dataclasses.replace(
        SHAPES["engram-2-layers"].memory, kind="none"))  # kind "none" is read as an Engram of that shape
    p_tot = p_tot_for_ratio(base, 6.0)
    for rho in (0.0, 0.5, 0.8):
        alloc = solve_allocation(base, p_tot, rho)
        assert alloc.config.memory.kind == "engram" and alloc.config.memory.layers == (0, 2)
        torch.manual_seed(0)
        assert numel(EngramMoE(alloc.config).parameters()) == alloc.counts.total
        assert abs(alloc.p_tot_deviation) < 0.01


def test_solver_with_overencoding_shape():
    base = dataclasses.replace(DEFAULT, memory=MemoryConfig(kind="overencoding", slots=1000))
    p_tot = p_tot_for_ratio(base, 4.0)
    alloc = solve_allocation(base, p_tot, 0.5)
    assert alloc.config.memory.kind == "overencoding" and alloc.counts.engram_dense == 8 * 16 * 128  # projections
    assert abs(alloc.p_tot_deviation) < FAIR_TOLERANCE and abs(alloc.p_act_deviation) < FAIR_TOLERANCE


def test_solver_ignores_base_n_routed_and_slots():
    p_tot = p_tot_for_ratio(ENGRAM_SHAPE, 4.0)
    a = solve_allocation(ENGRAM_SHAPE, p_tot, 0.6)
    other = dataclasses.replace(ENGRAM_SHAPE, n_routed=40, memory=dataclasses.replace(ENGRAM_SHAPE.memory,
                                                                                      slots=123_456))
    assert solve_allocation(other, p_tot, 0.6).config == a.config


def test_infeasible_targets_raise_with_the_numbers():
    smallest = param_counts(dataclasses.replace(DEFAULT, n_routed=DEFAULT.top_k))
    with pytest.raises(AllocationError, match=str(smallest.p_act)):
        solve_allocation(ENGRAM_SHAPE, 0.5 * smallest.p_tot, 0.5)
    # Memory whose dense projections outweigh the dense FFN: P_act cannot be held.
    wide = dataclasses.replace(DEFAULT, memory=MemoryConfig(kind="engram", slots=1000, n_heads=8, d_head=64))
    with pytest.raises(AllocationError, match="P_act cannot be held"):
        solve_allocation(wide, p_tot_for_ratio(wide, 4.0), 0.5)
    with pytest.raises(AllocationError, match="n_dense_layers=0"):
        no_dense = dataclasses.replace(ENGRAM_SHAPE, n_dense_layers=0)
        solve_allocation(no_dense, p_tot_for_ratio(no_dense, 4.0), 0.5)
    with pytest.raises(AllocationError, match="no MoE layer"):
        solve_allocation(dataclasses.replace(ENGRAM_SHAPE, n_dense_layers=DEFAULT.n_layers), 1e7, 0.5)
    with pytest.raises(ValueError, match="rho"):
        solve_allocation(ENGRAM_SHAPE, 1e7, 1.5)
    with pytest.raises(ValueError, match="ratio"):
        p_tot_for_ratio(ENGRAM_SHAPE, 0.5)
    with pytest.raises(AllocationError, match="ratio"):
        p_tot_for_ratio(ENGRAM_SHAPE, 1000.0)  # every expert adds router columns to P_act: ratio < 3 d_expert + 1


@pytest.mark.parametrize("shape", ["default", "engram-2-layers", "no-shared-two-dense"])
@pytest.mark.parametrize("ratio", [2.0, 4.0, 10.0])
def test_p_act_and_p_tot_are_held_within_tolerance_on_a_grid_of_rho_and_ratios(shape, ratio):
    base = dataclasses.replace(SHAPES[shape], memory=dataclasses.replace(SHAPES[shape].memory, kind="none"))
    if shape == "default":
        base = ENGRAM_SHAPE
    try:
        p_tot = p_tot_for_ratio(base, ratio)
    except AllocationError:
        pytest.skip("ratio out of this shape's reach")
    moe = solve_allocation(base, p_tot, 1.0)
    for rho in np.linspace(0.0, 0.95, 20):
        alloc = solve_allocation(base, p_tot, float(rho))
        check_fair(alloc)  # raises beyond FAIR_TOLERANCE
        assert abs(alloc.counts.p_act / moe.counts.p_act - 1) <= FAIR_TOLERANCE
        assert abs(alloc.counts.p_tot / p_tot - 1) <= FAIR_TOLERANCE
        if alloc.config.memory.kind != "none":
            assert alloc.counts.engram_dense > 0 and alloc.config.d_ff_dense != base.d_ff_dense


def test_check_fair_refuses_a_p_tot_target_whole_experts_miss():
    moe = solve_allocation(ENGRAM_SHAPE, p_tot_for_ratio(ENGRAM_SHAPE, 4.0), 1.0)
    expert = 3 * DEFAULT.d_model * DEFAULT.d_expert * DEFAULT.n_moe_layers
    off = moe.counts.p_tot + 0.45 * expert  # nearly half an expert from any realisable P_tot: ~1.3%
    with pytest.raises(AllocationError, match=f"nearest realisable P_tot {moe.counts.p_tot}"):
        check_fair(solve_allocation(ENGRAM_SHAPE, off, 0.5))


def test_counting_and_planning_import_without_torch():
    # Counting parameters, parsing a spec and planning a sweep are arithmetic: importing them must not pull in
    # torch (seconds of start-up and gigabytes of memory in a process that trains nothing). A fresh interpreter,
    # because this one has torch loaded already.
    modules = ("engram.config", "engram.memory_layout", "engram.accounting", "sweeps.sizing", "sweeps.spec",
               "sweeps.plan")
    script = (f"import sys\nimport {', '.join(modules)}\n"
              "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(repo)})
    assert out.stdout.strip() == "[]"
