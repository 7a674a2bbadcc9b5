"""Conditional memory: tokenizer compression, multi-head n-gram hashing, the Engram module and the OverEncoding
baseline. Their table sizes and parameter counts are plain arithmetic in `engram.memory_layout` (no torch).

References: DeepSeek / PKU, "Conditional Memory via Scalable Lookup" (arXiv 2601.07372, section 2) and its demo
code (deepseek-ai/Engram, engram_demo_v1.py); Huang et al., "Over-Tokenized Transformer" (arXiv 2501.16975) for
the OverEncoding baseline. docs/paper.md ("Engram", "OverEncoding") lists the facts followed here.

Hashing. Token ids are first mapped through the compression P (or used as they are), giving ids x' < PAD_ID;
positions before the start of the sequence read PAD_ID. For a layer with odd multipliers m_0..m_{N-1},
    mix_n(t) = XOR_{j<n} (x'_{t-j} * m_j)        (int64)        and head k of order n reads mix_n(t) mod p_{n,k}.
Overflow: ids are < 2**20 and multipliers < 2**40, so every product is < 2**60 and every XOR of them is a
non-negative int64 below 2**60. No multiplication ever wraps, so the indices are the same on every platform
and device (no reliance on two's-complement wrap-around, no negative remainders). Multipliers come from numpy's
PCG64 bit generator, whose raw output is stable across numpy versions and machines (unlike Generator methods),
seeded by (memory.hash_seed, stream, layer id); never Python's `hash()`.

Tables. Every Engram table is a distinct prime number of rows near slots / n_tables, the primes of all Engram
layers together are distinct (as in the demo code); OverEncoding's are m + 2 * index rows (Algorithm 1); both
sizes come from `engram.memory_layout`. The tables of one module live in ONE
`nn.Embedding(sum(primes), width, sparse=True)` addressed through per-table offsets, so the optimiser (SparseAdam
or a lazy Adam) pays for the rows touched, not for the table size.

Shape legend: B batch, T time, D d_model, H tables of one module ((N-1) * K), E d_head, M d_mem = H * E.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engram.config import MemoryConfig
from engram.memory_layout import (d_mem, layer_primes, overencoding_n_slices, overencoding_table_sizes,
                                  overencoding_width)

HASH_ID_LIMIT = 1 << 20  # compressed ids (and the pad id) must be below this: products stay below 2**60
PAD_ID = HASH_ID_LIMIT - 1  # read at positions before the sequence start; no real (compressed) id may equal it
MULTIPLIER_BITS = 40  # multipliers are odd and below 2**40
# Defaults of memory.table_init_std (None). Engram: rows feed W_K / W_V like a normalised activation (the demo
# code's nn.Embedding default, N(0, 1)). OverEncoding: its tables extend the token embedding, so they start at the
# token embedding's init.
ENGRAM_TABLE_INIT_STD = 1.0
OVERENCODING_TABLE_INIT_STD = 0.02
PROJ_INIT_STD = 0.02

# Stream of the multiplier generator (a second stream, 1, was OverEncoding's before it read exact n-gram ids).
_ENGRAM_STREAM = 0

_REPLACEMENT_CHAR = "\ufffd"
_WHITESPACE_RUN = re.compile(r"[ \t\r\n]+")  # as the reference normaliser; NFKC maps other spaces to " "


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer compression


def normalize_token_text(text: str) -> str:
    """The paper's normaliser: NFKC, NFD, strip accents, lowercase, collapse whitespace runs, strip.

    A whitespace-only token stays " " (so space, newline and tab runs merge into one id rather than vanish).
    Whitespace means space, tab, CR and LF, as in the demo code's normaliser; NFKC has already turned the other
    Unicode spaces (no-break, ideographic, thin, ...) into " ". Control characters such as form feed stay apart.
    """
    text = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    text = _WHITESPACE_RUN.sub(" ", text.lower())
    return " " if text == " " else text.strip(" ")


def build_compression(token_texts: Sequence[str]) -> np.ndarray:
    """Surjection id -> compressed id merging ids whose normalised text is equal; (V,) int64.

    Compressed ids are numbered in order of first appearance, so they are dense in [0, V'). Texts holding a
    replacement character (partial UTF-8 bytes of a byte-level BPE token decoded alone) and texts that normalise
    to nothing are never merged: their decoded text does not identify the bytes they stand for.
    """
    if isinstance(token_texts, str) or len(token_texts) == 0:
        raise ValueError("token_texts: expected a non-empty sequence of strings (one per token id)")
    key_to_new: dict[object, int] = {}
    mapping_V = np.empty(len(token_texts), dtype=np.int64)
    for token_id, text in enumerate(token_texts):
        if not isinstance(text, str):
            raise ValueError(f"token_texts[{token_id}]: expected a string, got {type(text).__name__}")
        norm = normalize_token_text(text)
        key: object = norm if norm and _REPLACEMENT_CHAR not in text else ("unmerged", token_id)
        mapping_V[token_id] = key_to_new.setdefault(key, len(key_to_new))
    if len(key_to_new) >= PAD_ID:
        raise ValueError(f"token_texts: {len(key_to_new)} compressed ids, expected fewer than {PAD_ID}")
    return mapping_V


def compression_ratio(mapping: np.ndarray | torch.Tensor) -> float:
    """V' / V, compressed ids over original ids (the paper reports 0.77, i.e. a 23% reduction, on 128k ids)."""
    mapping = np.asarray(mapping)
    if mapping.ndim != 1 or mapping.size == 0:
        raise ValueError(f"mapping: expected a non-empty 1-D array, got shape {mapping.shape}")
    return float(np.unique(mapping).size / mapping.size)


# ---------------------------------------------------------------------------------------------------------------
# Hashing


def hash_multipliers(cfg: MemoryConfig, stream: int, layer_id: int) -> np.ndarray:
    """(max_ngram,) int64 odd multipliers m_j < 2**40 of one module, from (hash_seed, stream, layer_id)."""
    seed = np.random.SeedSequence([cfg.hash_seed, stream, layer_id])
    raw = np.random.PCG64(seed).random_raw(cfg.max_ngram)  # uint64, stable across numpy versions
    return ((raw >> np.uint64(64 - MULTIPLIER_BITS)) | np.uint64(1)).astype(np.int64)


class NgramHasher(nn.Module):
    """ids (B, T) -> per-table row indices (B, T, H), head k of order n below its prime p_{n,k}.

    Holds only derived, non-persistent buffers (compression, multipliers, primes): they follow `.to(device)` but
    stay out of state dicts, since they are recomputed from the config and the data.
    """

    def __init__(self, cfg: MemoryConfig, primes: Sequence[int], multipliers: np.ndarray,
                 compression: torch.Tensor | np.ndarray | None):
        super().__init__()
        assert len(primes) == (cfg.max_ngram - 1) * cfg.n_heads and len(multipliers) == cfg.max_ngram
        self.max_ngram = cfg.max_ngram
        self.n_heads = cfg.n_heads
        if compression is not None:
            compression = torch.as_tensor(compression, dtype=torch.int64, device="cpu")
            if compression.ndim != 1 or compression.numel() == 0:
                raise ValueError(f"compression: expected a non-empty 1-D id map, got shape {tuple(compression.shape)}")
            if int(compression.min()) < 0 or int(compression.max()) >= PAD_ID:
                raise ValueError(f"compression: expected compressed ids in [0, {PAD_ID}), got "
                                 f"[{int(compression.min())}, {int(compression.max())}]")
        self.register_buffer("compression", compression, persistent=False)
        self.register_buffer("multipliers", torch.as_tensor(multipliers, dtype=torch.int64), persistent=False)
        self.register_buffer("primes", torch.tensor(list(primes), dtype=torch.int64), persistent=False)

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        if self.compression is not None:
            x_BT = self.compression[ids_BT]
        else:
            # Without a compression map the raw ids must leave room for the pad id (one reduction per call).
            if ids_BT.numel() and (int(ids_BT.min()) < 0 or int(ids_BT.max()) >= PAD_ID):
                raise ValueError(f"ids: expected token ids in [0, {PAD_ID}) when no compression is given")
            x_BT = ids_BT.long()
        T = x_BT.shape[1]
        mix_BT = x_BT * self.multipliers[0]
        idx_per_order = []
        for j in range(1, self.max_ngram):
            shifted_BT = F.pad(x_BT, (j, 0), value=PAD_ID)[:, :T]  # x'_{t-j}, PAD_ID before the start
            mix_BT = mix_BT ^ (shifted_BT * self.multipliers[j])  # now mix_{j+1}: the suffix (j+1)-gram
            primes_K = self.primes[(j - 1) * self.n_heads:j * self.n_heads]
            idx_per_order.append(torch.remainder(mix_BT.unsqueeze(-1), primes_K))
        return torch.cat(idx_per_order, dim=-1)  # (B, T, H)


class _MultiTableEmbedding(nn.Module):
    """Several hash tables stored as one sparse-gradient embedding; (B, T, H) row indices -> (B, T, H, width)."""

    def __init__(self, primes: Sequence[int], width: int, init_std: float):
        super().__init__()
        offsets = np.concatenate([[0], np.cumsum(primes)[:-1]]).astype(np.int64)
        self.register_buffer("offsets", torch.as_tensor(offsets), persistent=False)
        self.table = nn.Embedding(int(sum(primes)), width, sparse=True)
        nn.init.normal_(self.table.weight, std=init_std)

    def forward(self, idx_BTH: torch.Tensor) -> torch.Tensor:
        return self.table(idx_BTH + self.offsets)


def _signed_sqrt(s: torch.Tensor) -> torch.Tensor:
    # The clamp keeps the gradient of sqrt finite at 0 (as the demo code does).
    return s.abs().clamp_min(1e-6).sqrt() * s.sign()


# ---------------------------------------------------------------------------------------------------------------
# Engram


class Engram(nn.Module):
    """One Engram layer: hashed n-gram lookup, context-aware gate, short causal conv.

    e_t = concat of the (N-1) * K head rows; k_t = W_K e_t, v_t = W_V e_t;
    alpha_t = sigmoid(ssqrt(RMSNorm(h_t) . RMSNorm(k_t) / sqrt(D))) (ssqrt = sign * sqrt|.|, when signed_sqrt);
    Y = SiLU(Conv1D(RMSNorm(alpha * v))) + alpha * v, the conv depthwise, causal, dilation N, zero-initialised.
    The caller adds Y to the residual stream before the block's attention.
    """

    def __init__(self, cfg: MemoryConfig, d_model: int, layer_id: int,
                 compression: torch.Tensor | np.ndarray | None = None):
        super().__init__()
        if cfg.kind != "engram":
            raise ValueError(f"memory.kind: expected 'engram', got {cfg.kind!r}")
        if d_model <= 0:
            raise ValueError(f"d_model: expected a positive integer, got {d_model}")
        primes = layer_primes(cfg, layer_id)
        self.layer_id = layer_id
        self.signed_sqrt = cfg.signed_sqrt
        self.max_ngram = cfg.max_ngram
        self.hasher = NgramHasher(cfg, primes, hash_multipliers(cfg, _ENGRAM_STREAM, layer_id), compression)
        init_std = ENGRAM_TABLE_INIT_STD if cfg.table_init_std is None else cfg.table_init_std
        self.tables = _MultiTableEmbedding(primes, cfg.d_head, init_std)
        width = d_mem(cfg)
        self.key_proj = nn.Linear(width, d_model, bias=False)
        self.value_proj = nn.Linear(width, d_model, bias=False)
        nn.init.normal_(self.key_proj.weight, std=PROJ_INIT_STD)  # scale is irrelevant: k is RMS-normalised
        # v joins the residual stream: start it at the token-embedding scale (RMS ~0.02) for unit-RMS e_t.
        nn.init.normal_(self.value_proj.weight, std=PROJ_INIT_STD / math.sqrt(width))
        self.norm_h = nn.RMSNorm(d_model, eps=1e-6)
        self.norm_k = nn.RMSNorm(d_model, eps=1e-6)
        self.norm_conv = nn.RMSNorm(d_model, eps=1e-6)
        self.conv = nn.Conv1d(d_model, d_model, cfg.conv_kernel, groups=d_model, dilation=cfg.max_ngram, bias=False)
        nn.init.zeros_(self.conv.weight)  # Y == alpha * v at init

    def table_parameters(self) -> list[nn.Parameter]:
        return [self.tables.table.weight]

    def rows_read(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """Row of the layer's embedding (offsets applied) read by every position and table: (B * T * H,)."""
        return (self.hasher(ids_BT) + self.tables.offsets).flatten()

    def lookup(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """e_t for every position: (B, T, M)."""
        e_BTHE = self.tables(self.hasher(ids_BT))
        return e_BTHE.flatten(start_dim=2)

    def gate(self, h_BTD: torch.Tensor, k_BTD: torch.Tensor) -> torch.Tensor:
        """alpha_t in (0, 1): (B, T, 1)."""
        score_BT = (self.norm_h(h_BTD) * self.norm_k(k_BTD)).sum(dim=-1) / math.sqrt(h_BTD.shape[-1])
        if self.signed_sqrt:
            score_BT = _signed_sqrt(score_BT)
        return torch.sigmoid(score_BT).unsqueeze(-1)

    def forward(self, h_BTD: torch.Tensor, ids_BT: torch.Tensor) -> torch.Tensor:
        if h_BTD.shape[:2] != ids_BT.shape:
            raise ValueError(f"ids_BT: expected shape {tuple(h_BTD.shape[:2])} to match h_BTD, "
                             f"got {tuple(ids_BT.shape)}")
        e_BTM = self.lookup(ids_BT)
        # Under bf16 autocast the projections run in bf16; the gate (norms, dot product, sigmoid), the gated value
        # and the conv stay in the residual stream's dtype: the norms then keep their fused kernels, and the
        # depthwise conv's bf16 kernel is slower than its fp32 one on CPU (12.2 vs 11.1 ms, fwd + bwd, one thread).
        k_BTD = self.key_proj(e_BTM).to(h_BTD.dtype)
        gated_BTD = self.gate(h_BTD, k_BTD) * self.value_proj(e_BTM).to(h_BTD.dtype)
        x_BDT = self.norm_conv(gated_BTD).transpose(1, 2)
        left_pad = (self.conv.kernel_size[0] - 1) * self.conv.dilation[0]  # causal: only past positions
        with torch.autocast(h_BTD.device.type, enabled=False):
            conv_BTD = self.conv(F.pad(x_BDT, (left_pad, 0))).transpose(1, 2)
        return F.silu(conv_BTD) + gated_BTD


# ---------------------------------------------------------------------------------------------------------------
# OverEncoding baseline


def ngram_ids_mod(ids_BT: torch.Tensor, n: int, vocab_size: int, sizes_S: torch.Tensor) -> torch.Tensor:
    """(B, T, S): the n-gram id f(t) = sum_{i<n} x_{t-i} * V^i modulo each of the S table sizes (OverEncoding's
    index, Algorithm 1). Positions before the start read id 0, as the algorithm's zero padding does.

    Horner's rule modulo each size keeps every intermediate below size * V (< 2**60 for sizes < 2**40 and
    V < 2**20), so the result is exact for any n, unlike computing V^(n-1) * x first.
    """
    T = ids_BT.shape[1]
    x_BT = ids_BT.long()
    r_BTS = torch.zeros(*x_BT.shape, len(sizes_S), dtype=torch.int64, device=x_BT.device)
    for i in range(n - 1, -1, -1):  # most significant digit x_{t-n+1} first
        shifted_BT = F.pad(x_BT, (i, 0), value=0)[:, :T]  # x_{t-i}, 0 before the start
        r_BTS = torch.remainder(r_BTS * vocab_size + shifted_BT.unsqueeze(-1), sizes_S)
    return r_BTS


class OverEncoding(nn.Module):
    """Over-Encoding (Huang et al. 2025, "Over-Tokenized Transformer", arXiv 2501.16975, Appendix A, Algorithm 1).

    For each order n = 2..N and slice j = 1..k (k = memory.n_heads), table index = (n-2)k + j holds
    m + 2 * index rows of width w = D / (k(N-1)) and is read at the n-gram id modulo its size (exact ids in base
    V over raw token ids, no tokenizer compression, no hashing); each slice goes through its own
    Linear(w -> D); the input embedding becomes token embedding + sum of the slices' projections, divided by
    1 + k(N-1) as Algorithm 1 writes it only with `memory.overencoding_mean` (why not by default: forward).

    The k(N-1) projections are stored side by side as one bias-free Linear(k(N-1) * w -> D): applying it to the
    concatenated slices is exactly the sum of the per-slice Linears (slice h is `proj.weight[:, h*w:(h+1)*w]`),
    in one matmul. Bias-free like every projection of this project. Tables start at the token embedding's
    init (std 0.02, `memory.table_init_std` overrides it) and train like the embedding they extend: Adam at the
    base learning rate, no weight decay (engram.trial.build_optimizers), lazily so that a step costs O(rows read).
    """

    def __init__(self, cfg: MemoryConfig, d_model: int, vocab_size: int):
        super().__init__()
        if cfg.kind != "overencoding":
            raise ValueError(f"memory.kind: expected 'overencoding', got {cfg.kind!r}")
        if vocab_size <= 0 or vocab_size >= HASH_ID_LIMIT:
            raise ValueError(f"vocab_size: expected 1..{HASH_ID_LIMIT - 1}, got {vocab_size}")
        self.max_ngram, self.n_heads, self.vocab_size = cfg.max_ngram, cfg.n_heads, vocab_size
        self.mean = cfg.overencoding_mean
        self.n_slices = overencoding_n_slices(cfg)
        self.width = overencoding_width(cfg, d_model)
        sizes = overencoding_table_sizes(cfg)
        self.register_buffer("sizes", torch.tensor(sizes, dtype=torch.int64), persistent=False)
        init_std = OVERENCODING_TABLE_INIT_STD if cfg.table_init_std is None else cfg.table_init_std
        self.tables = _MultiTableEmbedding(sizes, self.width, init_std)
        self.proj = nn.Linear(self.n_slices * self.width, d_model, bias=False)
        nn.init.normal_(self.proj.weight, std=PROJ_INIT_STD)

    def table_parameters(self) -> list[nn.Parameter]:
        return [self.tables.table.weight]

    def table_indices(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """(B, T, H) row of each table (before offsets): slice (n, j) reads f_n(t) mod (m + 2 * index)."""
        if ids_BT.numel() and (int(ids_BT.min()) < 0 or int(ids_BT.max()) >= self.vocab_size):
            raise ValueError(f"ids: expected token ids in [0, {self.vocab_size})")
        per_order = [ngram_ids_mod(ids_BT, n, self.vocab_size,
                                   self.sizes[(n - 2) * self.n_heads:(n - 1) * self.n_heads])
                     for n in range(2, self.max_ngram + 1)]
        return torch.cat(per_order, dim=-1)

    def rows_read(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """Row of the module's embedding (offsets applied) read by every position and table: (B * T * H,)."""
        return (self.table_indices(ids_BT) + self.tables.offsets).flatten()

    def forward(self, ids_BT: torch.Tensor, tok_emb_BTD: torch.Tensor) -> torch.Tensor:
        if tok_emb_BTD.shape[:2] != ids_BT.shape:
            raise ValueError(f"ids_BT: expected shape {tuple(tok_emb_BTD.shape[:2])} to match tok_emb_BTD, "
                             f"got {tuple(ids_BT.shape)}")
        rows_BTHW = self.tables(self.table_indices(ids_BT))
        ngram_BTD = self.proj(rows_BTHW.flatten(start_dim=2).to(tok_emb_BTD.dtype))
        # The plain sum by default: Algorithm 1's division by 1 + k(N-1) (`memory.overencoding_mean`) starts the
        # input 9x smaller than the blocks' outputs at the default shape; a short trial never recovered from it
        # (LOG.md, issue 7: 5.77 nats divided, 4.87 summed, 5.46 without memory).
        x_BTD = tok_emb_BTD + ngram_BTD
        return x_BTD / (1 + self.n_slices) if self.mean else x_BTD
