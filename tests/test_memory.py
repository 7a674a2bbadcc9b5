"""Tests of engram/memory.py (compression, hashing, the Engram module, OverEncoding) and engram/memory_layout.py
(primes, table sizes, parameter counts against the modules)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.config import ConfigError, MemoryConfig, ModelConfig
from engram.memory import (
    HASH_ID_LIMIT,
    MULTIPLIER_BITS,
    PAD_ID,
    Engram,
    NgramHasher,
    OverEncoding,
    build_compression,
    compression_ratio,
    hash_multipliers,
    ngram_ids_mod,
)
from engram.memory_layout import (
    d_mem,
    engram_param_counts,
    memory_param_counts,
    memory_primes,
    n_memory_tables,
    overencoding_param_counts,
    overencoding_table_sizes,
    table_primes,
)

REPO = Path(__file__).resolve().parents[1]


def _engram_cfg(**kw) -> MemoryConfig:
    return MemoryConfig(**{"kind": "engram", "slots": 20_000, "layers": (1,), **kw})


def _is_prime_slow(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _hasher(cfg: MemoryConfig, layer_id: int = 1, compression=None) -> NgramHasher:
    return Engram(cfg, 32, layer_id, compression).hasher


# ---------------------------------------------------------------------------------------------------------------
# Compression


def test_compression_merges_case_and_leading_space_variants():
    texts = ["The", " the", "THE", "the ", "then", " Then", "\tTHE\n"]
    mapping = build_compression(texts)
    assert mapping.dtype == np.int64 and mapping.shape == (len(texts),)
    assert len({mapping[i] for i in (0, 1, 2, 3, 6)}) == 1
    assert mapping[4] == mapping[5] != mapping[0]


def test_compression_whitespace_accents_nfkc_and_replacement_chars():
    texts = [" ", "\n\n", "\t ", "   ", "é", "E", "\ufb01", "fi", "\ufffd", "\ufffd", " \ufffd", "", "\u0301", "ä",
             "\xa0", "\u3000\r\n", "\x0c", " x\n", "X"]
    mapping = build_compression(texts)
    assert len({mapping[i] for i in (0, 1, 2, 3, 14, 15)}) == 1  # whitespace-only tokens merge into " "
    assert mapping[16] not in mapping[:16]  # a form feed is a control character, not collapsed whitespace
    assert mapping[17] == mapping[18]
    assert mapping[4] == mapping[5]  # accent stripped, lowercased
    assert mapping[6] == mapping[7]  # NFKC folds the ligature
    # Partial-byte tokens decode to replacement chars: never merged with each other or anything else.
    unmerged = [mapping[i] for i in (8, 9, 10, 11, 12)]
    assert len(set(unmerged)) == 5 and not set(unmerged) & set(mapping[:8])
    # Dense ids in order of first appearance, so the map is a surjection onto range(V').
    assert sorted(set(mapping.tolist())) == list(range(mapping.max() + 1)) and mapping[0] == 0


def test_compression_ratio_and_bad_inputs():
    mapping = build_compression(["a", "A", " a", "b", "B", "c"])
    assert compression_ratio(mapping) == pytest.approx(3 / 6)
    with pytest.raises(ValueError, match=r"token_texts\[1\]"):
        build_compression(["a", None])
    with pytest.raises(ValueError, match="token_texts"):
        build_compression([])


# ---------------------------------------------------------------------------------------------------------------
# Primes


@pytest.mark.parametrize("layers,max_ngram,n_heads,slots", [((1,), 3, 4, 20_000), ((0, 2), 4, 2, 10**6),
                                                            ((1,), 2, 1, 16), ((0, 1, 3), 3, 8, 123_457)])
def test_memory_primes_distinct_prime_and_near_the_per_table_size(layers, max_ngram, n_heads, slots):
    cfg = MemoryConfig(kind="engram", slots=slots, layers=layers, max_ngram=max_ngram, n_heads=n_heads)
    primes = memory_primes(cfg)
    n_tables = len(layers) * (max_ngram - 1) * n_heads
    assert len(primes) == n_memory_tables(cfg) == n_tables
    assert len(set(primes)) == n_tables
    assert all(_is_prime_slow(p) for p in primes)
    rows = slots // n_tables
    # Nearest primes on both sides: the total stays within ~1% of slots beyond tiny tables.
    assert abs(sum(primes) - slots) <= max(0.01 * slots, 4 * n_tables)
    assert all(abs(p - rows) <= max(0.05 * rows, 4 * n_tables) for p in primes)


def test_table_primes_validates_its_arguments():
    cfg = _engram_cfg()
    assert table_primes(cfg, 8, 1000) == sorted(table_primes(cfg, 8, 1000))
    with pytest.raises(ValueError, match="n_tables"):
        table_primes(cfg, 7, 1000)
    with pytest.raises(ValueError, match="rows_per_table"):
        table_primes(cfg, 8, 1)


# ---------------------------------------------------------------------------------------------------------------
# Hashing


def test_multipliers_are_odd_bounded_and_differ_by_layer_and_stream():
    cfg = _engram_cfg(max_ngram=4)
    m1, m2, m_oe = hash_multipliers(cfg, 0, 1), hash_multipliers(cfg, 0, 2), hash_multipliers(cfg, 1, 1)
    for m in (m1, m2, m_oe):
        assert m.dtype == np.int64 and m.shape == (4,)
        assert np.all(m % 2 == 1) and np.all(m > 0) and np.all(m < 2**MULTIPLIER_BITS)
    assert not np.array_equal(m1, m2) and not np.array_equal(m1, m_oe)
    assert not np.array_equal(m1, hash_multipliers(MemoryConfig(kind="engram", slots=20_000, hash_seed=1), 0, 1)[:4])


def test_multipliers_and_primes_are_pinned():
    # Golden values: a change here silently changes every Engram model (and makes old results incomparable).
    cfg = _engram_cfg()
    assert hash_multipliers(cfg, 0, 1).tolist() == [493943304931, 429954828295, 634383888325]
    assert memory_primes(cfg) == [2459, 2467, 2473, 2477, 2503, 2521, 2531, 2539]  # nearest to 20000 / 8


def test_hash_equals_the_formula_in_exact_integer_arithmetic():
    cfg = _engram_cfg(max_ngram=4, n_heads=3)
    hasher = _hasher(cfg)
    m = [int(v) for v in hasher.multipliers]
    primes = [int(p) for p in hasher.primes]
    gen = torch.Generator().manual_seed(0)
    ids_BT = torch.randint(0, PAD_ID, (2, 9), generator=gen)
    idx_BTH = hasher(ids_BT)
    for b in range(2):
        x = [int(v) for v in ids_BT[b]]
        for t in range(9):
            for n in range(2, 5):
                mix = 0
                for j in range(n):  # Python ints never overflow: this is the reference
                    mix ^= (x[t - j] if t - j >= 0 else PAD_ID) * m[j]
                for k in range(3):
                    h = (n - 2) * 3 + k
                    assert int(idx_BTH[b, t, h]) == mix % primes[h]


def test_hash_indices_in_range_below_each_prime():
    cfg = _engram_cfg(slots=5_000, max_ngram=4, n_heads=4)
    compression = torch.as_tensor(build_compression([f"tok{i % 700}" for i in range(1000)]))
    hasher = _hasher(cfg, compression=compression)
    idx_BTH = hasher(torch.randint(0, 1000, (8, 200)))
    assert idx_BTH.shape == (8, 200, 12) and idx_BTH.dtype == torch.int64
    assert bool((idx_BTH >= 0).all()) and bool((idx_BTH < hasher.primes).all())
    # every table is actually used across its range
    assert bool((idx_BTH.amax(dim=(0, 1)) > hasher.primes // 2).all())


@pytest.mark.slow
def test_hash_is_deterministic_in_a_fresh_process():
    cfg = _engram_cfg(slots=50_000, max_ngram=3, n_heads=4, hash_seed=7)
    ids_BT = torch.arange(3 * 50).reshape(3, 50) * 37 % 5000
    here = _hasher(cfg, layer_id=1)(ids_BT)
    script = (
        "import json, torch\n"
        "from engram.config import MemoryConfig\n"
        "from engram.memory import Engram\n"
        "cfg = MemoryConfig(kind='engram', slots=50_000, layers=(1,), max_ngram=3, n_heads=4, hash_seed=7)\n"
        "ids = torch.arange(3 * 50).reshape(3, 50) * 37 % 5000\n"
        "print(json.dumps(Engram(cfg, 32, 1).hasher(ids).tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": "", "PYTHONPATH": str(REPO)})
    assert json.loads(out.stdout) == here.tolist()


def test_collisions_of_random_ngrams_are_near_uniform():
    # Chi-square of bucket counts over many distinct random trigrams, per table, against the uniform law.
    cfg = _engram_cfg(slots=2 * 4 * 1009, max_ngram=3, n_heads=4)
    hasher = _hasher(cfg)
    gen = torch.Generator().manual_seed(1)
    n_samples = 40_000
    ids_BT = torch.randint(0, 50_000, (n_samples, 3), generator=gen)
    idx_SH = hasher(ids_BT)[:, -1, :]  # last position: its 2-gram and 3-gram are random, no padding
    for h, p in enumerate(hasher.primes.tolist()):
        counts = np.bincount(idx_SH[:, h].numpy(), minlength=p)
        expected = n_samples / p
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        dof = p - 1
        assert abs(chi2 - dof) < 6 * np.sqrt(2 * dof), (h, p, chi2)


def test_structured_bigrams_fill_buckets_as_a_random_function_would():
    # All bigrams of small consecutive ids (the hard case for multiplicative hashing): occupancy as expected.
    cfg = _engram_cfg(slots=2 * 2 * 4001, max_ngram=3, n_heads=2)
    hasher = _hasher(cfg)
    a, b = torch.meshgrid(torch.arange(120), torch.arange(120), indexing="ij")
    ids_BT = torch.stack([a.flatten(), b.flatten()], dim=1)
    idx_SH = hasher(ids_BT)[:, -1, :2]  # the 2-gram heads at the last position
    n = ids_BT.shape[0]
    for h in range(2):
        p = int(hasher.primes[h])
        occupied = np.unique(idx_SH[:, h].numpy()).size
        expected = p * (1 - (1 - 1 / p) ** n)
        assert abs(occupied - expected) < 0.03 * expected, (occupied, expected)
    # Heads collide independently: n-grams sharing a row in head 0 rarely share one in head 1 (~1/p).
    i0, i1 = idx_SH[:, 0].numpy(), idx_SH[:, 1].numpy()
    pairs_both = n - np.unique(i0 * 10**6 + i1).size
    pairs_head0 = n - np.unique(i0).size
    assert pairs_both <= max(5, 0.01 * pairs_head0)


def test_padding_marks_the_sequence_start():
    cfg = _engram_cfg()
    hasher = _hasher(cfg)
    ids = torch.tensor([[5, 6, 7, 8]])
    shifted = torch.tensor([[9, 5, 6, 7]])
    # Same suffix n-grams at the same content, but position 0 of `ids` sees the pad where `shifted` sees 9.
    assert torch.equal(hasher(ids)[0, 2], hasher(shifted)[0, 3])
    assert not torch.equal(hasher(ids)[0, 0], hasher(shifted)[0, 1])


def test_hasher_rejects_out_of_range_ids_and_compressions():
    cfg = _engram_cfg()
    with pytest.raises(ValueError, match="ids"):
        _hasher(cfg)(torch.tensor([[1, PAD_ID]]))
    with pytest.raises(ValueError, match="compression"):
        _hasher(cfg, compression=torch.tensor([0, PAD_ID]))
    with pytest.raises(ValueError, match="layer_id"):
        Engram(cfg, 32, 0)


# ---------------------------------------------------------------------------------------------------------------
# Engram module


def test_engram_output_is_gated_value_at_init():
    cfg = _engram_cfg(slots=4_000)
    torch.manual_seed(0)
    module = Engram(cfg, 64, 1)
    h_BTD = torch.randn(2, 12, 64)
    ids_BT = torch.randint(0, 500, (2, 12))
    e_BTM = module.lookup(ids_BT)
    assert e_BTM.shape == (2, 12, d_mem(cfg))
    alpha_BT1 = module.gate(h_BTD, module.key_proj(e_BTM))
    assert bool(((alpha_BT1 > 0) & (alpha_BT1 < 1)).all())
    expected_BTD = alpha_BT1 * module.value_proj(e_BTM)
    y_BTD = module(h_BTD, ids_BT)
    torch.testing.assert_close(y_BTD, expected_BTD, rtol=0, atol=0)
    assert float(y_BTD.detach().abs().max()) > 0
    # With trained (non-zero) conv weights the conv branch contributes.
    torch.nn.init.normal_(module.conv.weight)
    assert not torch.allclose(module(h_BTD, ids_BT), expected_BTD)


def test_signed_sqrt_changes_the_gate_score():
    torch.manual_seed(0)
    on, off = Engram(_engram_cfg(), 32, 1), Engram(_engram_cfg(signed_sqrt=False), 32, 1)
    off.load_state_dict(on.state_dict())
    h_BTD, k_BTD = torch.randn(1, 20, 32) * 3, torch.randn(1, 20, 32)
    s_BT = (on.norm_h(h_BTD) * on.norm_k(k_BTD)).sum(-1) / 32**0.5
    torch.testing.assert_close(off.gate(h_BTD, k_BTD)[..., 0], torch.sigmoid(s_BT))
    torch.testing.assert_close(on.gate(h_BTD, k_BTD)[..., 0], torch.sigmoid(s_BT.sign() * s_BT.abs().sqrt()))


def test_engram_is_causal():
    cfg = _engram_cfg(max_ngram=3, conv_kernel=4)
    torch.manual_seed(0)
    module = Engram(cfg, 32, 1)
    torch.nn.init.normal_(module.conv.weight)  # a zero conv would hide a non-causal padding bug
    T, t = 24, 13
    h_BTD = torch.randn(2, T, 32)
    ids_BT = torch.randint(0, 300, (2, T))
    h2_BTD, ids2_BT = h_BTD.clone(), ids_BT.clone()
    h2_BTD[:, t + 1:] = torch.randn(2, T - t - 1, 32)
    ids2_BT[:, t + 1:] = torch.randint(300, 600, (2, T - t - 1))
    y, y2 = module(h_BTD, ids_BT), module(h2_BTD, ids2_BT)
    torch.testing.assert_close(y[:, :t + 1], y2[:, :t + 1], rtol=0, atol=0)
    assert not torch.allclose(y[:, t + 1:], y2[:, t + 1:])
    # The conv reaches back (kernel - 1) * dilation = 9 positions: a change there does move position t.
    ids3_BT = ids_BT.clone()
    ids3_BT[:, t - 9] += 300
    assert not torch.allclose(module(h_BTD, ids3_BT)[:, t], y[:, t])


def test_engram_tables_get_sparse_gradients_on_touched_rows_only():
    cfg = _engram_cfg(slots=8_000)
    module = Engram(cfg, 32, 1)
    ids_BT = torch.randint(0, 100, (2, 10))
    module(torch.randn(2, 10, 32), ids_BT).square().sum().backward()
    (table,) = module.table_parameters()
    assert table.grad is not None and table.grad.is_sparse
    touched = (module.hasher(ids_BT) + module.tables.offsets).unique()
    grad = table.grad.coalesce()
    assert set(grad.indices()[0].tolist()) <= set(touched.tolist())
    assert len(touched) < table.shape[0] // 10
    assert float(grad.values().abs().sum()) > 0


@pytest.mark.parametrize("kw,d_model", [({}, 64), ({"layers": (0, 2), "max_ngram": 4, "n_heads": 2, "d_head": 8}, 48),
                                        ({"signed_sqrt": False, "conv_kernel": 2, "slots": 100_003}, 32)])
def test_engram_param_counts_equal_module_parameters(kw, d_model):
    cfg = _engram_cfg(**kw)
    modules = [Engram(cfg, d_model, layer) for layer in cfg.layers]
    tables = sum(p.numel() for m in modules for p in m.table_parameters())
    total = sum(p.numel() for m in modules for p in m.parameters())
    assert engram_param_counts(cfg, d_model) == (tables, total - tables)
    assert memory_param_counts(cfg, d_model) == (tables, total - tables)
    assert tables == sum(memory_primes(cfg)) * cfg.d_head
    # tables of different layers never share a prime
    rows = [m.hasher.primes.tolist() for m in modules]
    assert len({p for r in rows for p in r}) == sum(len(r) for r in rows)


def test_overencoding_param_counts_equal_module_parameters():
    cfg = MemoryConfig(kind="overencoding", slots=30_000, max_ngram=3, n_heads=2)
    module = OverEncoding(cfg, 48, vocab_size=500)
    tables = sum(p.numel() for p in module.table_parameters())
    n_params = sum(p.numel() for p in module.parameters())
    assert overencoding_param_counts(cfg, 48) == memory_param_counts(cfg, 48) == (tables, n_params - tables)
    assert tables == sum(overencoding_table_sizes(cfg)) * 48 // 4
    assert n_params - tables == 4 * 12 * 48  # k(N-1) = 4 projections Linear(12 -> 48), no bias
    assert memory_param_counts(MemoryConfig(), 48) == (0, 0)
    with pytest.raises(ValueError, match="memory.kind"):
        engram_param_counts(cfg, 48)


def test_overencoding_shapes_and_moduli_follow_algorithm_1():
    # k = 2 slices per order, N = 4: tables index = (n-2)k + j = 1..6 of m + 2 * index rows, width D / (k(N-1)).
    cfg = MemoryConfig(kind="overencoding", slots=6 * 100 + 6 * 7, max_ngram=4, n_heads=2)
    V, D = 50, 24
    module = OverEncoding(cfg, D, vocab_size=V)
    assert overencoding_table_sizes(cfg) == [102, 104, 106, 108, 110, 112]
    assert module.width == D // 6 == 4 and module.tables.table.weight.shape == (sum(range(102, 113, 2)), 4)
    assert module.proj.weight.shape == (D, 6 * 4)
    ids_BT = torch.randint(0, V, (2, 9))
    idx_BTH = module.table_indices(ids_BT)
    x = ids_BT.tolist()
    for b in range(2):
        for t in range(9):
            for n in (2, 3, 4):
                # the exact n-gram id in base V, zero before the start, then modulo each slice's size
                ngram_id = sum((x[b][t - i] if t - i >= 0 else 0) * V ** i for i in range(n))
                for j in range(2):
                    h = (n - 2) * 2 + j
                    assert int(idx_BTH[b, t, h]) == ngram_id % (100 + 2 * (h + 1))
    # output: token embedding + sum of each slice's own projection; divided by 1 + k(N-1) = 7 only with
    # overencoding_mean (Algorithm 1 as written; off by default, docs/fairness.md)
    tok_BTD = torch.randn(2, 9, D)
    rows_BTHW = module.tables.table.weight[idx_BTH + module.tables.offsets]
    slices = [rows_BTHW[:, :, h] @ module.proj.weight[:, h * 4:(h + 1) * 4].T for h in range(6)]
    torch.testing.assert_close(module(ids_BT, tok_BTD), tok_BTD + sum(slices))
    module.mean = True
    torch.testing.assert_close(module(ids_BT, tok_BTD), (tok_BTD + sum(slices)) / 7)
    module(ids_BT, tok_BTD).sum().backward()
    assert module.tables.table.weight.grad.is_sparse
    assert OverEncoding(dataclasses.replace(cfg, overencoding_mean=True), D, vocab_size=V).mean


def test_overencoding_keeps_the_token_embedding_at_its_scale():
    """The default form passes the token embedding through unshrunk (the divided form scaled it by 1/9 at the
    default shape, and a default-size trial scored worse than no memory)."""
    cfg = MemoryConfig(kind="overencoding", slots=10_000, max_ngram=3, n_heads=4)
    module = OverEncoding(cfg, 128, vocab_size=4096)
    tok_BTD = torch.randn(2, 16, 128) * 0.02
    with torch.no_grad():
        module.proj.weight.zero_()  # no n-gram signal: the output is the token embedding as the model gets it
        torch.testing.assert_close(module(torch.randint(0, 4096, (2, 16)), tok_BTD), tok_BTD)


def test_ngram_ids_mod_is_exact_where_v_to_the_n_overflows_int64():
    ids_BT = torch.tensor([[HASH_ID_LIMIT - 2] * 6])
    sizes = torch.tensor([1_000_003, 999_983])
    got = ngram_ids_mod(ids_BT, 5, HASH_ID_LIMIT - 1, sizes)
    exact = sum((HASH_ID_LIMIT - 2) * (HASH_ID_LIMIT - 1) ** i for i in range(5))  # ~2**100: Python ints
    assert got[0, -1].tolist() == [exact % 1_000_003, exact % 999_983]


def test_overencoding_config_checks_width_and_rows():
    with pytest.raises(ConfigError, match="d_model"):
        ModelConfig(d_model=100, n_heads=4, memory=MemoryConfig(kind="overencoding", slots=10_000))
    with pytest.raises(ConfigError, match="slots"):
        MemoryConfig(kind="overencoding", slots=16 * 16, max_ngram=5, n_heads=4)  # 16 tables need 16 * 18 rows


def test_table_init_std_knob_sets_the_tables_init():
    cfg = _engram_cfg(slots=50_000, table_init_std=0.1)
    torch.manual_seed(0)
    assert abs(float(Engram(cfg, 32, 1).tables.table.weight.detach().std()) - 0.1) < 0.005
    assert abs(float(Engram(_engram_cfg(slots=50_000), 32, 1).tables.table.weight.detach().std()) - 1.0) < 0.05
    with pytest.raises(ConfigError, match="table_init_std"):
        _engram_cfg(table_init_std=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hash_and_forward_on_cuda_match_cpu():
    cfg = _engram_cfg(slots=50_000)
    torch.manual_seed(0)
    module = Engram(cfg, 64, 1, torch.arange(5000) // 3)
    ids_BT, h_BTD = torch.randint(0, 5000, (4, 64)), torch.randn(4, 64, 64)
    cpu_idx, cpu_y = module.hasher(ids_BT), module(h_BTD, ids_BT)
    module.cuda()
    assert torch.equal(module.hasher(ids_BT.cuda()).cpu(), cpu_idx)
    torch.testing.assert_close(module(h_BTD.cuda(), ids_BT.cuda()).cpu(), cpu_y, rtol=1e-4, atol=1e-5)
