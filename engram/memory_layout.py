"""The memory's layout in plain arithmetic (no torch): how many tables, their sizes, their widths, and the
parameter counts that follow. `engram.memory` builds its tables from these sizes and `engram.accounting` counts
with them, so a count and a module can never disagree on a table's size (tests compare them).

Engram (arXiv 2601.07372, section 2; docs/paper.md "Engram"): (N-1) * K tables per Engram layer, each a
distinct prime number of rows near slots / n_tables (`memory_primes`; the primes of all layers together are
distinct, as in the demo code), d_head wide. OverEncoding (arXiv 2501.16975, Algorithm 1; docs/paper.md
"OverEncoding"): k(N-1) tables of m + 2 * index rows, d_model / (k(N-1)) wide (`overencoding_table_sizes`).
"""

from __future__ import annotations

from engram.config import MemoryConfig


# ---------------------------------------------------------------------------------------------------------------
# Tables


def _is_prime(n: int) -> bool:
    # Deterministic Miller-Rabin: these bases are exact for n < 3.3e24, far beyond any table size.
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in bases:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def n_memory_tables(cfg: MemoryConfig) -> int:
    """Tables over the whole model: (N-1) * K per Engram layer; (N-1) * K for OverEncoding; 0 for none."""
    if cfg.kind == "none":
        return 0
    n_modules = len(cfg.layers) if cfg.kind == "engram" else 1
    return n_modules * (cfg.max_ngram - 1) * cfg.n_heads  # OverEncoding: k(N-1) slices


def table_primes(cfg: MemoryConfig, n_tables: int, rows_per_table: int) -> list[int]:
    """The `n_tables` distinct primes nearest to `rows_per_table` (ties to the smaller), ascending.

    Taking the nearest primes on both sides keeps their sum within a few prime gaps of n_tables * rows_per_table,
    so `slots` is met closely. `cfg` fixes the table group size: n_tables must be whole groups of (N-1) * K.
    """
    group = (cfg.max_ngram - 1) * cfg.n_heads
    if n_tables <= 0 or n_tables % group:
        raise ValueError(f"n_tables: expected a positive multiple of (max_ngram - 1) * n_heads = {group}, "
                         f"got {n_tables}")
    if rows_per_table < 2:
        raise ValueError(f"rows_per_table: expected at least 2, got {rows_per_table}")
    primes: list[int] = []
    below, above = rows_per_table, rows_per_table + 1
    while len(primes) < n_tables:
        # Walk outwards one step on each side; the lower candidate first, so ties go to the smaller prime.
        if below >= 2 and rows_per_table - below <= above - rows_per_table:
            if _is_prime(below):
                primes.append(below)
            below -= 1
        else:
            if _is_prime(above):
                primes.append(above)
            above += 1
    return sorted(primes)


def memory_primes(cfg: MemoryConfig) -> list[int]:
    """Rows of every memory table of the model, in module order (Engram layers as listed), order-major then head."""
    n_tables = n_memory_tables(cfg)
    if n_tables == 0:
        return []
    return table_primes(cfg, n_tables, cfg.slots // n_tables)


def layer_primes(cfg: MemoryConfig, layer_id: int) -> list[int]:
    if layer_id not in cfg.layers:
        raise ValueError(f"layer_id: expected one of memory.layers {list(cfg.layers)}, got {layer_id}")
    per_layer = (cfg.max_ngram - 1) * cfg.n_heads
    start = cfg.layers.index(layer_id) * per_layer
    return memory_primes(cfg)[start:start + per_layer]


def d_mem(cfg: MemoryConfig) -> int:
    """Width of the concatenated Engram lookup e_t: (N-1) * K * d_head."""
    return (cfg.max_ngram - 1) * cfg.n_heads * cfg.d_head


def overencoding_n_slices(cfg: MemoryConfig) -> int:
    """k(N-1): one table (and one projection) per order n = 2..N and slice j = 1..k (k = memory.n_heads)."""
    return (cfg.max_ngram - 1) * cfg.n_heads


def overencoding_width(cfg: MemoryConfig, d_model: int) -> int:
    """Row width of every OverEncoding table, D / (k(N-1)) (Algorithm 1 splits the width over the slices)."""
    n_slices = overencoding_n_slices(cfg)
    if d_model % n_slices:
        raise ValueError(f"d_model: expected a multiple of (max_ngram - 1) * n_heads = {n_slices} for "
                         f"OverEncoding, got {d_model}")
    return d_model // n_slices


def overencoding_table_sizes(cfg: MemoryConfig) -> list[int]:
    """Rows of the OverEncoding tables, in slice order: m + 2 * index for index = (n-2)k + j = 1..k(N-1).

    `slots` is the total: k(N-1) * m + k(N-1)(k(N-1) + 1), so m = (slots - H(H + 1)) // H (H = k(N-1)); the
    division's remainder (< H rows) is dropped. Distinct sizes, as in Algorithm 1, so that two slices of one
    order do not collide on the same n-grams.
    """
    n_slices = overencoding_n_slices(cfg)
    m = (cfg.slots - n_slices * (n_slices + 1)) // n_slices
    if m < 1:
        raise ValueError(f"slots: expected at least {n_slices * (n_slices + 2)} for OverEncoding with "
                         f"{n_slices} tables, got {cfg.slots}")
    return [m + 2 * index for index in range(1, n_slices + 1)]


def memory_table_sizes(cfg: MemoryConfig) -> list[int]:
    """Rows of every memory table of the model: Engram's primes, OverEncoding's m + 2 * index; [] for none."""
    if cfg.kind == "overencoding":
        return overencoding_table_sizes(cfg)
    return memory_primes(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts and reads per row


def engram_param_counts(cfg: MemoryConfig, d_model: int) -> tuple[int, int]:
    """(tables, dense) parameters of all Engram layers of a model with this memory config.

    tables: sum of table rows * d_head. dense per layer: W_K and W_V (d_mem x d_model, no bias), the RMSNorm
    weights of h, k and the conv input (3 * d_model), and the depthwise conv (d_model * conv_kernel, no bias).
    """
    if cfg.kind != "engram":
        raise ValueError(f"memory.kind: expected 'engram', got {cfg.kind!r}")
    tables = sum(memory_primes(cfg)) * cfg.d_head
    dense_per_layer = 2 * d_mem(cfg) * d_model + 3 * d_model + d_model * cfg.conv_kernel
    return tables, len(cfg.layers) * dense_per_layer


def overencoding_param_counts(cfg: MemoryConfig, d_model: int) -> tuple[int, int]:
    """(tables, dense) parameters of the OverEncoding module: rows * D / (k(N-1)), and the k(N-1) slice
    projections Linear(D / (k(N-1)) -> D), no bias: k(N-1) * w * D (used by every token, so dense)."""
    if cfg.kind != "overencoding":
        raise ValueError(f"memory.kind: expected 'overencoding', got {cfg.kind!r}")
    width = overencoding_width(cfg, d_model)
    return sum(overencoding_table_sizes(cfg)) * width, overencoding_n_slices(cfg) * width * d_model


def memory_param_counts(cfg: MemoryConfig, d_model: int) -> tuple[int, int]:
    """(tables, dense) parameters of whatever memory `cfg` describes; (0, 0) for kind "none"."""
    if cfg.kind == "engram":
        return engram_param_counts(cfg, d_model)
    if cfg.kind == "overencoding":
        return overencoding_param_counts(cfg, d_model)
    return 0, 0


def expected_lookups_per_row(cfg: MemoryConfig, tokens: int) -> float | None:
    """Mean reads per table row over a trial of `tokens` training tokens: tokens x tables read per token / rows
    (every token reads one row of every table); None without memory. The real counts are skewed (Zipf):
    `engram.trial` records what happened."""
    sizes = memory_table_sizes(cfg)
    if not sizes:
        return None
    return tokens * len(sizes) / sum(sizes)
