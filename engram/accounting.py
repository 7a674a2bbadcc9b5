"""Parameter accounting, FLOPs per token and the allocation solver of the Engram paper (arXiv 2601.07372 §3).

- `param_counts(cfg)`: analytic parameter counts by group, equal to the parameters of `EngramMoE(cfg)`
  (tests compare them for many shapes); the paper's P_tot / P_act / P_sparse / rho are properties.
- `flops_per_token(cfg)`: training FLOPs per token, 6 * (P_act + LM head) + an attention term.
- `solve_allocation(base, p_tot, rho)`: P_tot and P_act held fixed, the sparse budget split between inactive
  routed experts (share rho) and Engram table rows (the rest), rounded to whole experts and prime table sizes.
  P_act is held by taking the memory's dense parameters (and the router columns the experts gave back) out of
  the dense FFN's width (docs/fairness.md says why); `check_fair` refuses an allocation off by more than
  FAIR_TOLERANCE.

Formulas follow the modules: attention is qkv + out projection (4 D^2), every FFN a bias-free SwiGLU
(3 * D * hidden), RMSNorms carry a weight vector, the router a D x n_routed matrix (its selection bias is a buffer,
not a parameter). Memory parameter counts and table sizes come from `engram.memory_layout`, their one home.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from engram.config import MemoryConfig, ModelConfig
from engram.memory_layout import memory_param_counts, memory_table_sizes, n_memory_tables

# MemoryConfig's lower bound on table size.
MIN_ROWS_PER_TABLE = 16
# Largest relative deviation of P_tot (from its target), P_act (from the rho = 1 model's) and tokens (between
# the trials of one experiment and budget) that an allocation experiment accepts (docs/fairness.md, "Tolerance").
FAIR_TOLERANCE = 0.005
SLOT_SEARCH = 8  # per-table row shifts tried to bring the tables' prime sizes nearest the row budget


@dataclass(frozen=True)
class ParamCounts:
    """Trainable parameters by group. `routed_active` (top_k experts per MoE layer) is a subset of `routed_total`
    and is not added again in `total`."""

    embedding: int
    head: int  # 0 when tied to the embedding
    attention: int
    norms: int  # the backbone's RMSNorm weights (memory norms are in engram_dense)
    dense_ffn: int
    shared: int
    routed_total: int
    routed_active: int
    router: int
    engram_tables: int  # memory tables (Engram or OverEncoding): sparse, read a few rows per token
    engram_dense: int  # memory projections, norms, conv: used by every token

    @property
    def total(self) -> int:
        return (self.embedding + self.head + self.attention + self.norms + self.dense_ffn + self.shared
                + self.routed_total + self.router + self.engram_tables + self.engram_dense)

    @property
    def p_tot(self) -> int:
        """Paper's P_tot: all trainable parameters except the vocabulary embedding and the LM head."""
        return self.total - self.embedding - self.head

    @property
    def p_act(self) -> int:
        """Parameters used per token. The handful of table rows a token reads are not counted (negligible)."""
        return (self.attention + self.norms + self.dense_ffn + self.shared + self.routed_active + self.router
                + self.engram_dense)

    @property
    def p_sparse(self) -> int:
        """Inactive routed experts plus memory tables."""
        return self.p_tot - self.p_act

    @property
    def p_engram(self) -> int:
        return self.engram_tables + self.engram_dense

    @property
    def routed_inactive(self) -> int:
        return self.routed_total - self.routed_active

    @property
    def rho(self) -> float:
        """Share of P_sparse held by inactive routed experts; 1.0 when P_sparse == 0 (nothing to allocate is
        treated as pure MoE, so a model with only top_k experts and no memory sits at rho = 1, not 0/0)."""
        return self.routed_inactive / self.p_sparse if self.p_sparse else 1.0

    def as_dict(self) -> dict[str, float]:
        """Groups and derived quantities, flat (for tables and reports)."""
        out: dict[str, float] = dataclasses.asdict(self)
        for name in ("total", "p_tot", "p_act", "p_sparse", "p_engram", "rho"):
            out[name] = getattr(self, name)
        return out


def swiglu_params(d_model: int, d_hidden: int) -> int:
    return 3 * d_model * d_hidden


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Analytic parameter counts of `EngramMoE(cfg)` by group (no module is built)."""
    D, n_moe = cfg.d_model, cfg.n_moe_layers
    expert = swiglu_params(D, cfg.d_expert)
    tables, mem_dense = memory_param_counts(cfg.memory, D)
    return ParamCounts(
        embedding=cfg.vocab_size * D,
        head=0 if cfg.tie_embeddings else cfg.vocab_size * D,
        attention=cfg.n_layers * 4 * D * D,
        norms=(2 * cfg.n_layers + 1) * D,
        dense_ffn=cfg.n_dense_layers * swiglu_params(D, cfg.d_ff_dense),
        shared=n_moe * swiglu_params(D, cfg.n_shared_experts * cfg.d_expert),
        routed_total=n_moe * cfg.n_routed * expert,
        routed_active=n_moe * cfg.top_k * expert,
        router=n_moe * cfg.n_routed * D,
        engram_tables=tables,
        engram_dense=mem_dense,
    )


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6 * (P_act + d_model * vocab) + 12 * n_layers * d_model * seq_len.

    6 N: forward (2 per multiply-add) plus backward (twice the forward) over every weight a token uses; the LM head
    is counted whether tied or not (it is a matmul either way), the embedding lookup is not. Attention term: PaLM
    (Chowdhery et al. 2022, App. B) counts the score and value matmuls as 2 * 2 * seq_len * d_model per layer
    forward, x3 for training, over the full (not causally halved) window, so 12 * n_layers * d_model * seq_len.
    Beyond 6 per parameter, hashing, softmax and other elementwise work are not counted (standard convention).
    """
    counts = param_counts(cfg)
    return float(6 * (counts.p_act + cfg.d_model * cfg.vocab_size) + 12 * cfg.n_layers * cfg.d_model * cfg.seq_len)


# ---------------------------------------------------------------------------------------------------------------
# Allocation solver


class AllocationError(ValueError):
    """A (P_tot, rho) target that no model of the given shape can realise; the message names the numbers."""


@dataclass(frozen=True)
class Allocation:
    """A resolved allocation: the concrete model, its counts, the targets and the deviations from them."""

    config: ModelConfig
    counts: ParamCounts
    p_tot_target: float
    rho_target: float
    moe_counts: ParamCounts  # the rho = 1 (pure MoE) model of the same P_tot target: the fixed P_act reference

    @property
    def rho(self) -> float:
        return self.counts.rho

    @property
    def n_routed(self) -> int:
        return self.config.n_routed

    @property
    def slots(self) -> int:
        return self.config.memory.slots if self.config.memory.kind != "none" else 0

    @property
    def p_tot_deviation(self) -> float:
        """(achieved P_tot - target) / target."""
        return (self.counts.p_tot - self.p_tot_target) / self.p_tot_target

    @property
    def p_act_deviation(self) -> float:
        """(P_act - P_act of the rho = 1 model) / the latter: what is left of the memory's dense parameters and
        the router change once the dense FFN has paid for them (within half a unit of its width)."""
        return (self.counts.p_act - self.moe_counts.p_act) / self.moe_counts.p_act

    @property
    def p_act_engram_dense(self) -> int:
        """Active parameters of the memory's projections, norms and conv (paid for by a narrower dense FFN)."""
        return self.counts.engram_dense

    @property
    def p_act_router_delta(self) -> int:
        """Router parameters given back with the routed experts (fewer experts, smaller router); <= 0."""
        return self.counts.router - self.moe_counts.router

    @property
    def d_ff_dense_delta(self) -> int:
        """Change of the dense FFN's width that holds P_act (< 0 where the memory's dense part is paid for)."""
        unit = self.config.n_dense_layers * 3 * self.config.d_model
        return (self.counts.dense_ffn - self.moe_counts.dense_ffn) // unit if unit else 0


def _pure_moe(base: ModelConfig, n_routed: int) -> ModelConfig:
    # Default MemoryConfig for "none": identical pure-MoE models get identical configs (and trial ids).
    return dataclasses.replace(base, n_routed=n_routed, memory=MemoryConfig())


def _memory_shape(base: ModelConfig) -> MemoryConfig:
    """base.memory as the memory shape to fill (slots set to the smallest valid count); kind "none" is read as an
    Engram of that shape."""
    kind = "engram" if base.memory.kind == "none" else base.memory.kind
    n_tables = n_memory_tables(dataclasses.replace(base.memory, kind=kind, slots=1 << 40))
    return dataclasses.replace(base.memory, kind=kind, slots=MIN_ROWS_PER_TABLE * n_tables)


def _moe_unit(base: ModelConfig) -> tuple[int, int]:
    """(parameters of one routed expert in every MoE layer, router parameters per routed expert)."""
    n_moe = base.n_moe_layers
    return n_moe * swiglu_params(base.d_model, base.d_expert), n_moe * base.d_model


def moe_model_for_p_tot(base: ModelConfig, p_tot: float) -> ModelConfig:
    """The rho = 1 model: pure MoE with the number of routed experts whose P_tot is nearest to `p_tot`."""
    if base.n_moe_layers == 0:
        raise AllocationError(f"n_dense_layers={base.n_dense_layers} = n_layers: no MoE layer, no routed experts "
                              f"to trade for memory")
    expert, router = _moe_unit(base)
    smallest = param_counts(_pure_moe(base, base.top_k))
    n_routed = base.top_k + round((p_tot - smallest.p_tot) / (expert + router))
    if n_routed < base.top_k:
        raise AllocationError(f"P_tot target {p_tot:.4g} is below P_act = {smallest.p_act} of the backbone with "
                              f"top_k={base.top_k} routed experts and no memory (P_tot {smallest.p_tot})")
    return _pure_moe(base, n_routed)


def p_tot_for_ratio(base: ModelConfig, ratio: float) -> float:
    """P_tot of the pure MoE (the rho = 1 model) whose P_tot / P_act is nearest `ratio`, i.e. ratio * P_act of
    the rho = 1 model up to whole experts.

    Why the realisable P_tot rather than ratio * P_act literally: whole experts cannot hit the literal value (it
    misses by up to half an expert, 1.4% at ratio 3 on the default backbone), while this target is met exactly by
    the rho = 1 model and, up to prime rounding of the tables, by every other rho. P_act depends on the expert
    count only through the router columns.
    """
    if not ratio >= 1:
        raise ValueError(f"ratio: expected P_tot / P_act >= 1, got {ratio}")
    if base.n_moe_layers == 0:
        raise AllocationError(f"n_dense_layers={base.n_dense_layers} = n_layers: no MoE layer, no routed experts")
    expert, router = _moe_unit(base)
    smallest = param_counts(_pure_moe(base, base.top_k))
    # P_tot(n) = P_tot(k) + (n - k)(e + r), P_act(n) = P_act(k) + (n - k) r; solve P_tot(n) = ratio * P_act(n).
    # The smallest MoE has P_tot == P_act (ratio 1); each expert adds e + r to P_tot and r to P_act, so ratios at
    # or beyond (e + r) / r are out of reach.
    per_expert_gain = expert + router - ratio * router
    if per_expert_gain <= 0:
        raise AllocationError(f"ratio {ratio}: P_tot / P_act stays below (expert + router) / router = "
                              f"{(expert + router) / router:.1f} however many experts (each adds {router} router "
                              f"parameters to P_act)")
    extra = (ratio * smallest.p_act - smallest.p_tot) / per_expert_gain  # >= 0: ratio >= 1
    candidates = [param_counts(_pure_moe(base, base.top_k + n)) for n in {math.floor(extra), math.ceil(extra)}]
    best = min(candidates, key=lambda c: (abs(c.p_tot / c.p_act - ratio), c.p_tot))
    return float(best.p_tot)


def solve_allocation(base: ModelConfig, p_tot: float, rho: float) -> Allocation:
    """Model with the share `rho` of its sparse budget in inactive routed experts and the rest in memory tables
    shaped like `base.memory` (base.n_routed and base.memory.slots are ignored; kind "none" means Engram).

    The rho = 1 model is the pure MoE whose P_tot is nearest `p_tot` (whole experts); its P_tot and P_act are
    the fixed budget of every rho, so the models of one U-curve share P_tot exactly (up to prime rounding of the
    tables) and all deviate from `p_tot` alike, by at most half an expert (`Allocation.p_tot_deviation`).
    n_routed(rho) = top_k + round(rho * P_sparse / P_expert_all_layers).

    P_act held: the memory's dense parameters (W_K, W_V, norms, conv) are active, and fewer routed experts give
    back router columns; their net is taken out of the dense FFN's width (whole units of 3 * D * n_dense_layers
    parameters), so P_act matches the rho = 1 model's within half such a unit (docs/fairness.md). The table rows
    take what is left of P_tot after the experts, their router columns, the narrower dense FFN and the memory's
    dense parameters, as distinct primes (engram.memory_layout.table_primes) near an equal share per table. Where
    rounding gives back every expert of the rho = 1 model (rho within half an expert of 1), the result is that
    pure-MoE model, achieved rho 1.0.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho: expected a number in [0, 1], got {rho}")
    if not p_tot > 0:
        raise ValueError(f"p_tot: expected a positive number, got {p_tot}")
    moe_cfg = moe_model_for_p_tot(base, p_tot)
    moe_counts = param_counts(moe_cfg)
    expert, _ = _moe_unit(base)
    n_routed = base.top_k + round(rho * moe_counts.p_sparse / expert)
    if n_routed == moe_cfg.n_routed:
        return Allocation(moe_cfg, moe_counts, float(p_tot), float(rho), moe_counts)
    experts_cfg = _pure_moe(base, n_routed)
    shape = _memory_shape(base)  # at its smallest valid slot count
    # Dense memory parameters do not depend on the slot count; table parameters are rows x a fixed row width.
    min_tables, mem_dense = memory_param_counts(shape, base.d_model)
    row_width = min_tables // sum(memory_table_sizes(shape))
    experts_cfg = _hold_p_act(experts_cfg, param_counts(experts_cfg).p_act + mem_dense - moe_counts.p_act, rho)
    budget = moe_counts.p_tot - param_counts(experts_cfg).p_tot - mem_dense
    rows = budget // row_width
    if rows < shape.slots:
        raise AllocationError(
            f"rho {rho}: {budget} parameters left for memory tables after {n_routed} of {moe_cfg.n_routed} routed "
            f"experts and {mem_dense} dense memory parameters, fewer than the minimum {shape.slots} rows x "
            f"{row_width} = {shape.slots * row_width} ({MIN_ROWS_PER_TABLE} rows per table)")
    cfg = dataclasses.replace(experts_cfg, memory=dataclasses.replace(shape, slots=_nearest_slots(shape, rows)))
    return Allocation(cfg, param_counts(cfg), float(p_tot), float(rho), moe_counts)


def _nearest_slots(shape: MemoryConfig, rows: int) -> int:
    """The slot count near `rows` whose tables (primes near slots / n_tables each) hold nearest `rows` rows.

    Why: the tables of `rows` slots can miss `rows` by a few prime gaps per table, which on a small model is
    more than the 0.5% P_tot tolerance (0.6% with 4 tables of ~290 rows); shifting the per-table share by up to
    `SLOT_SEARCH` rows either way finds primes whose sum is closer."""
    n_tables = n_memory_tables(shape)
    candidates = [rows + k * n_tables for k in range(-SLOT_SEARCH, SLOT_SEARCH + 1)
                  if rows + k * n_tables >= MIN_ROWS_PER_TABLE * n_tables]
    return min(candidates, key=lambda slots: (abs(sum(memory_table_sizes(dataclasses.replace(shape, slots=slots)))
                                                  - rows), abs(slots - rows)))


def _hold_p_act(cfg: ModelConfig, excess: int, rho: float) -> ModelConfig:
    """`cfg` with the dense FFN narrowed by `excess` active parameters (rounded to whole width units)."""
    unit = cfg.n_dense_layers * 3 * cfg.d_model  # one unit of dense FFN width in every dense layer
    if unit == 0:
        raise AllocationError(f"rho {rho}: n_dense_layers=0, no dense FFN to pay for the memory's {excess} active "
                              f"parameters out of; P_act cannot be held (set n_dense_layers >= 1)")
    d_ff = cfg.d_ff_dense - round(excess / unit)
    if d_ff < 1:
        raise AllocationError(f"rho {rho}: the memory's dense parameters ({excess} net active) exceed the dense FFN "
                              f"({cfg.n_dense_layers} x 3 x {cfg.d_model} x {cfg.d_ff_dense}); P_act cannot be held")
    return dataclasses.replace(cfg, d_ff_dense=d_ff)


def check_fair(alloc: Allocation, tolerance: float = FAIR_TOLERANCE) -> None:
    """Raise AllocationError (naming the numbers) when the allocation misses P_tot's target or the rho = 1
    model's P_act by more than `tolerance` (relative)."""
    if abs(alloc.p_tot_deviation) > tolerance:
        nearest = alloc.moe_counts.p_tot
        if abs(nearest / alloc.p_tot_target - 1) > tolerance:
            raise AllocationError(f"P_tot target {alloc.p_tot_target:.6g} is missed by "
                                  f"{100 * alloc.p_tot_deviation:+.2f}% (whole experts: nearest realisable P_tot "
                                  f"{nearest}); tolerance {100 * tolerance:.1f}%: use p_tot: {nearest} or p_tot_ratio")
        raise AllocationError(f"rho {alloc.rho_target:g}: P_tot {alloc.counts.p_tot} misses the target "
                              f"{alloc.p_tot_target:.6g} by {100 * alloc.p_tot_deviation:+.2f}% (prime table sizes "
                              f"of {alloc.slots} slots); tolerance {100 * tolerance:.1f}%: a larger model or fewer "
                              f"memory tables")
    if abs(alloc.p_act_deviation) > tolerance:
        raise AllocationError(f"rho {alloc.rho_target:g}: P_act {alloc.counts.p_act} is "
                              f"{100 * alloc.p_act_deviation:+.2f}% off the rho = 1 model's "
                              f"{alloc.moe_counts.p_act}; tolerance {100 * tolerance:.1f}%")
