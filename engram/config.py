"""Typed, frozen configuration of one trial: model, memory, data and training.

Everything a trial needs is one `TrialConfig`. It is validated once, when built (`from_dict` turns plain
mappings, e.g. parsed YAML, into these objects and names the field path of any mistake); after that nothing
reads YAML or environment variables. "Off" is `None`, never `-1`.

What follows from a config without torch is here too: a trial's identity (`trial_id`: the config's content hash,
its data and RESULTS_VERSION) and its length in optimiser steps (`horizon_steps`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping

MEMORY_KINDS = ("engram", "overencoding", "none")
DATA_FORMATS = ("auto", "stdlib", "text", "jsonl", "parquet", "tokens")
DATA_SPLITS = ("documents", "folders")
SCHEDULES = ("cosine", "wsd")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
MIX_CORPUS = "mix"
MAX_SEED = 2 ** 32          # seeds (trial, hash, search) below this: numpy's legacy seeding and Optuna's limit
# DataConfig fields that only the mix corpus reads: left out of the content hash of other corpora, so adding
# them kept the trial ids of every stored trial on a file corpus or the stdlib.
MIX_FIELDS = ("knowledge_share", "mix_entities", "mix_seed")
# Part of every trial id and checkpoint key (engram.trial): bump it whenever a change to the model, data or
# training code makes new losses incomparable with stored ones, so a sweep re-runs those trials instead of mixing
# two code versions.
RESULTS_VERSION = 4  # 2: validation windows spread over the whole validation split; 3: P_act held across rho
                     # (narrower dense FFN), equal tokens per experiment, OverEncoding as Algorithm 1, train.precision;
                     # 4: bf16 on CPU rounds differently (fused loss chunks, rotary and expert casts; LOG.md, issue 9)
# ModelConfig fields added after trials were stored, whose None (off) is what every earlier trial ran: left out
# of the content hash while None, so adding them kept those trials' ids.
HASH_OMITTED_AT_NONE = ("balance_aux", "balance_moments")
# MemoryConfig fields that only OverEncoding reads: in the content hash of OverEncoding configs only, so adding
# them kept the ids of every Engram and memory-free trial (and changed those of OverEncoding, whose model changed).
OVERENCODING_FIELDS = ("overencoding_mean",)


class ConfigError(ValueError):
    """A configuration mistake; the message is one line that starts with the field path."""


def _positive(name: str, value: int | float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{name}: expected a positive number, got {value!r}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class MemoryConfig:
    """Conditional memory attached to the backbone.

    `slots` is the total number of table rows over all Engram layers, n-gram orders and heads; each of the
    (max_ngram - 1) * n_heads tables of a layer gets a distinct prime near slots / (layers * (max_ngram - 1) * n_heads).
    `layers` are 0-based block indices: the default (1,) is the paper's "layer 2".
    """

    kind: Literal["engram", "overencoding", "none"] = "none"
    slots: int = 0
    layers: tuple[int, ...] = (1,)
    max_ngram: int = 3
    n_heads: int = 4
    d_head: int = 16
    signed_sqrt: bool = True
    conv_kernel: int = 4
    hash_seed: int = 0
    # Std of the tables' N(0, std) init; None: the paper's value for the kind (Engram 1.0, as the demo code's
    # nn.Embedding; OverEncoding 0.02, the token embedding's). engram.memory holds both defaults.
    table_init_std: float | None = None
    # OverEncoding only: True divides (token embedding + slices) by 1 + k(N-1), as Algorithm 1 of arXiv 2501.16975
    # writes it; False (default): their plain sum. Why the sum: with the division the input embedding starts 9x
    # smaller than the blocks' outputs and a laptop trial scored worse than no memory (docs/fairness.md). Enters
    # the content hash of OverEncoding configs only (OVERENCODING_FIELDS).
    overencoding_mean: bool = False

    def __post_init__(self) -> None:
        _choice("kind", self.kind, MEMORY_KINDS)
        _positive("table_init_std", self.table_init_std, allow_none=True)
        if not 0 <= self.hash_seed < MAX_SEED:
            raise ConfigError(f"hash_seed: expected an integer in 0..2^32-1, got {self.hash_seed!r}")
        if self.kind == "none":
            return
        _positive("slots", self.slots)
        if self.max_ngram < 2:
            raise ConfigError(f"max_ngram: expected an integer >= 2, got {self.max_ngram!r}")
        _positive("n_heads", self.n_heads)
        _positive("d_head", self.d_head)
        _positive("conv_kernel", self.conv_kernel)
        if self.kind == "engram" and not self.layers:
            raise ConfigError("layers: expected at least one layer index for memory kind 'engram'")
        if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
            raise ConfigError(f"layers: expected distinct non-negative layer indices, got {list(self.layers)}")
        n_tables = len(self.layers if self.kind == "engram" else (0,)) * (self.max_ngram - 1) * self.n_heads
        if self.slots < 16 * n_tables:
            raise ConfigError(f"slots: expected at least {16 * n_tables} (16 rows per table), got {self.slots}")
        if self.kind == "overencoding" and self.slots < n_tables * (n_tables + 2):
            raise ConfigError(f"slots: expected at least {n_tables * (n_tables + 2)} (tables of m + 2 * index rows, "
                              f"m >= 1), got {self.slots}")


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only Engram+MoE transformer. Every FFN after the first `n_dense_layers` is a DeepSeekMoE layer."""

    vocab_size: int = 4096
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_dense_layers: int = 1
    d_ff_dense: int = 384
    n_shared_experts: int = 1
    d_expert: int = 64
    n_routed: int = 16
    top_k: int = 2
    balance_rate: float = 1e-3
    # Bias travel the balancing may make over a whole trial: the per-step rate is max(balance_rate,
    # balance_travel / steps), so a short trial balances too (engram.moe.effective_balance_rate); None: the fixed
    # balance_rate alone (DeepSeek-V3's setting for long runs).
    balance_travel: float | None = 1.0
    # Alpha of DeepSeek-V3's complementary sequence-wise balance loss, added to the training loss of every MoE
    # layer (engram.moe.sequence_balance_loss); None: off, the bias alone balances. Left out of the content hash
    # while None (HASH_OMITTED_AT_NONE), so configs written before it keep their trial ids.
    balance_aux: float | None = None
    # Beta of the router-moment loss (engram.moe.router_moment_loss: the spread across experts of the router
    # logit's batch mean and batch std), added to the training loss of every MoE layer; None: off. Left out of the
    # content hash while None, as balance_aux.
    balance_moments: float | None = None
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_ff_dense", "d_expert", "top_k",
                     "rope_theta"):
            _positive(name, getattr(self, name))
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"n_heads: expected a divisor of d_model={self.d_model} with an even head size, "
                              f"got {self.n_heads}")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ConfigError(f"n_dense_layers: expected 0..{self.n_layers}, got {self.n_dense_layers}")
        if self.n_shared_experts < 0:
            raise ConfigError(f"n_shared_experts: expected >= 0, got {self.n_shared_experts}")
        if self.n_routed < self.top_k:
            raise ConfigError(f"n_routed: expected at least top_k={self.top_k}, got {self.n_routed}")
        if self.balance_rate < 0:
            raise ConfigError(f"balance_rate: expected >= 0, got {self.balance_rate}")
        _positive("balance_travel", self.balance_travel, allow_none=True)
        _positive("balance_aux", self.balance_aux, allow_none=True)
        _positive("balance_moments", self.balance_moments, allow_none=True)
        n_slices = (self.memory.max_ngram - 1) * self.memory.n_heads
        if self.memory.kind == "overencoding" and self.d_model % n_slices:
            raise ConfigError(f"d_model: expected a multiple of (memory.max_ngram - 1) * memory.n_heads = "
                              f"{n_slices} (OverEncoding rows are d_model / that wide), got {self.d_model}")
        if self.memory.kind == "engram" and max(self.memory.layers) >= self.n_layers:
            raise ConfigError(f"memory.layers: expected indices below n_layers={self.n_layers}, "
                              f"got {list(self.memory.layers)}")

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is split. The tokenizer's size is `ModelConfig.vocab_size`.

    corpus: "stdlib" (the running Python's standard library sources, no download), a directory or glob of text
    files, a .jsonl file with `text_field`, a .parquet file with a `text_field` column, a .npy token array, or
    "mix": the built-in generated corpus of knowledge and computation text (engram.mixcorpus), about `max_bytes`
    characters of it, `knowledge_share` of them knowledge, over a table of `mix_entities` entities drawn from
    `mix_seed`. The three mix fields apply to the mix corpus only (and enter trial ids only there: MIX_FIELDS).

    split: "documents" holds out the round(val_fraction * n) documents with the smallest seeded hashes; "folders"
    holds out about val_fraction of the characters of every top-level folder (engram.data: a validation split that
    weighs the corpus's folders as training does).
    """

    corpus: str = "stdlib"
    format: Literal["auto", "stdlib", "text", "jsonl", "parquet", "tokens"] = "auto"
    text_field: str = "text"
    val_fraction: float = 0.05
    split_seed: int = 0
    split: Literal["documents", "folders"] = "documents"
    max_bytes: int | None = 16_000_000
    knowledge_share: float = 0.5
    mix_entities: int = 2000
    mix_seed: int = 0

    def __post_init__(self) -> None:
        _choice("format", self.format, DATA_FORMATS)
        _choice("split", self.split, DATA_SPLITS)
        if not self.corpus:
            raise ConfigError("corpus: expected 'stdlib', 'mix' or a path, got an empty string")
        if not 0 < self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction: expected a number in (0, 0.5), got {self.val_fraction!r}")
        _positive("max_bytes", self.max_bytes, allow_none=True)
        if not 0 <= self.knowledge_share <= 1:
            raise ConfigError(f"knowledge_share: expected a number in [0, 1], got {self.knowledge_share!r}")
        if self.mix_entities < 2:
            raise ConfigError(f"mix_entities: expected an integer >= 2 (a mentor is another entity), "
                              f"got {self.mix_entities!r}")
        if self.mix_seed < 0:
            raise ConfigError(f"mix_seed: expected a non-negative integer, got {self.mix_seed!r}")
        if self.corpus == MIX_CORPUS:
            if self.format != "auto":
                raise ConfigError(f"format: the generated corpus 'mix' takes format auto, got {self.format!r}")
            if self.max_bytes is None:
                raise ConfigError("max_bytes: the generated corpus 'mix' needs a size in characters, got null")
            if self.split != "documents":
                raise ConfigError(f"split: the generated corpus 'mix' is split by documents, got {self.split!r}")

    @property
    def is_mix(self) -> bool:
        return self.corpus == MIX_CORPUS


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of one trial. The horizon is exactly one of `steps`, `tokens` or `flops`."""

    steps: int | None = None
    tokens: int | None = None
    flops: float | None = None
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    engram_lr_mult: float = 5.0
    grad_clip: float | None = 1.0
    eval_interval: int | None = 50
    eval_tokens: int = 65_536
    checkpoint_interval: int | None = 100
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Mixed precision: "bf16" runs matmuls in bf16 with fp32 master weights, optimiser state, loss and softmax;
    # "auto" is bf16 where the device multiplies bf16 natively (engram.trial.resolve_precision), else fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    def __post_init__(self) -> None:
        set_horizons = [n for n in ("steps", "tokens", "flops") if getattr(self, n) is not None]
        if len(set_horizons) != 1:
            raise ConfigError(f"steps/tokens/flops: expected exactly one horizon, got "
                              f"{', '.join(set_horizons) if set_horizons else 'none'}")
        _positive(set_horizons[0], getattr(self, set_horizons[0]))
        for name in ("batch_size", "lr", "engram_lr_mult", "eval_tokens"):
            _positive(name, getattr(self, name))
        for name in ("grad_clip", "eval_interval", "checkpoint_interval"):
            _positive(name, getattr(self, name), allow_none=True)
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: expected >= 0, got {self.warmup_steps}")
        if not 0 <= self.seed < MAX_SEED:
            raise ConfigError(f"seed: expected an integer in 0..2^32-1, got {self.seed}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio: expected a number in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction: expected a number in (0, 1], got {self.decay_fraction}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: expected >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a number in [0, 1), got {getattr(self, name)}")
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("device", self.device, DEVICES)
        _choice("precision", self.precision, PRECISIONS)


@dataclass(frozen=True)
class TrialConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200))


# ---------------------------------------------------------------------------------------------------------------
# Plain mappings <-> config objects


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build the frozen dataclass `cls` from a mapping, checking keys and types; errors name the field path."""
    where = path or cls.__name__
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    check_keys(data, sorted(f.name for f in fields), path,
               required=[f.name for f in fields
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING])
    kwargs = {name: _coerce(hints[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(_join(path, str(err))) from None


def check_keys(data: dict, allowed: Iterable[str], path: str, required: Iterable[str] = (), note: str = "",
               elsewhere: Mapping[str, str] | None = None) -> None:
    """The keys of the mapping `data` at `path` against those it may hold (listed in the given order): the first
    unknown key, with the allowed key closest to it (a misspelt required key is named as written and as meant),
    then the first missing `required` key (`note` ends that message). `elsewhere` maps keys that exist but may not
    be set here to a sentence saying why: a misspelling closest to one of them is pointed there with it."""
    allowed = list(allowed)
    elsewhere = dict(elsewhere or {})
    unknown = sorted(str(k) for k in set(data) - set(allowed))
    if unknown:
        close = difflib.get_close_matches(unknown[0], allowed + list(elsewhere), n=1)
        hint = ""
        if close:
            hint = f"; did you mean {close[0]!r}?" + (f" {elsewhere[close[0]]}" if close[0] in elsewhere else "")
        raise ConfigError(f"{_join(path, unknown[0])}: unknown key{hint} (expected one of {', '.join(allowed)})")
    for key in required:
        if key not in data:
            raise ConfigError(f"{_join(path, key)}: required{note}")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain, JSON-able mapping of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_hash(config: Any, *extra: str) -> str:
    """Content hash of a config (and extra strings such as a data fingerprint): stable across processes."""
    text = json.dumps(_hashed(to_dict(config)), sort_keys=True, separators=(",", ":")) + "|" + "|".join(extra)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def trial_id(config: TrialConfig, data_fingerprint: str) -> str:
    """A trial's identity: content hash of its resolved config, its data and the results version."""
    return config_hash(config, data_fingerprint, f"v{RESULTS_VERSION}")


def horizon_steps(train: TrainConfig, flops_per_token: float, seq_len: int) -> int:
    """Optimiser steps of a trial: train.steps, or tokens / (batch * seq_len), or flops / (fpt * batch * seq_len)."""
    tokens_per_step = train.batch_size * seq_len
    if train.steps is not None:
        return train.steps
    if train.tokens is not None:
        return max(1, round(train.tokens / tokens_per_step))
    assert train.flops is not None  # TrainConfig guarantees exactly one horizon
    return max(1, round(train.flops / (flops_per_token * tokens_per_step)))


def _hashed(plain: dict[str, Any]) -> dict[str, Any]:
    """The mapping `config_hash` hashes: a DataConfig (on its own or as a TrialConfig's `data`) without the
    MIX_FIELDS unless its corpus is the mix corpus and without `split` while it is "documents" (the only split
    before 2026-12-03, so earlier trial ids stand); a ModelConfig (on its own or as `model`) without the
    HASH_OMITTED_AT_NONE fields that are None; a MemoryConfig (anywhere) without the OVERENCODING_FIELDS unless its
    kind is OverEncoding."""
    data = plain.get("data") if isinstance(plain.get("data"), dict) else plain
    if "corpus" in data and all(f in data for f in MIX_FIELDS):
        stripped = {k: v for k, v in data.items()
                    if not (k in MIX_FIELDS and data["corpus"] != MIX_CORPUS
                            or k == "split" and v == "documents")}
        plain = stripped if data is plain else {**plain, "data": stripped}
    model = plain.get("model") if isinstance(plain.get("model"), dict) else plain
    if "memory" in model and isinstance(model["memory"], dict):
        stripped = {k: v for k, v in model.items() if not (k in HASH_OMITTED_AT_NONE and v is None)}
        stripped["memory"] = _hashed_memory(model["memory"])
        plain = stripped if model is plain else {**plain, "model": stripped}
    elif "kind" in plain and "slots" in plain:  # a MemoryConfig on its own
        plain = _hashed_memory(plain)
    return plain


def _hashed_memory(memory: dict[str, Any]) -> dict[str, Any]:
    """A MemoryConfig's mapping without the OVERENCODING_FIELDS unless its kind is OverEncoding."""
    if memory.get("kind") == "overencoding":
        return memory
    return {k: v for k, v in memory.items() if k not in OVERENCODING_FIELDS}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        assert len(inner) == 1, f"unsupported union {tp}"
        return _coerce(inner[0], value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):  # YAML 1.1 reads 1e6 as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (isinstance(value, float) and not math.isfinite(value)) or value != int(value)):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e20 as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(float(value)):   # inf / nan: no setting of this project means either
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {_type_name(tp)} at {path}")
