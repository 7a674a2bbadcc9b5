"""Corpora, the byte-level BPE tokenizer, the document-level split and the memory-mapped token cache.

A corpus (`DataConfig.corpus`) is one of:
  - "stdlib": the `.py` sources of the running Python's standard library (real text on every machine, no
    download). site-packages / dist-packages and the test suites (`test/`, `tests/`, `idle_test/`) are left out:
    distributions often ship the tests separately or not at all (Debian's libpython3.x-testsuite, trimmed conda
    builds), so including them would give different corpora for the same Python version; and they are ~60% of
    the bytes, dominated by fixtures (escaped binary data, deliberately malformed code) rather than prose-like code.
  - a directory (recursive, hidden entries skipped) or a glob of UTF-8 text files: one document per file;
  - JSONL with a string field `text_field` (one document per line), or Parquet with a string column `text_field`
    (one document per row); a directory or glob of such files is read in sorted order (format "auto" picks
    jsonl / parquet / tokens when every file has that suffix, text otherwise);
  - a pre-tokenised `.npy` 1-D integer array; it is cut into chunks of `TOKEN_CHUNK` tokens, the "documents"
    of the split;
  - "mix": the built-in generated corpus of knowledge and computation text (engram.mixcorpus; no file, no
    download). `max_bytes` is its size; its validation split also stores the kind of every token (`val_kinds`:
    context / knowledge answer / computation answer) for the per-kind validation losses.

`max_bytes` caps the corpus deterministically: files of a collection are taken in a fixed pseudo-random order
(blake2b of their relative path), so a cut corpus samples the whole collection instead of its alphabetical start,
and the last file taken is cut to fill the cap exactly; records of JSONL / Parquet files are taken from the start
(a prefix, so a large file is not read whole); a token file keeps its first `max_bytes // itemsize` tokens.

The split is by document: with `split: documents` a document goes to validation when it ranks among the
`round(val_fraction * n)` smallest blake2b hashes of (split_seed, its name), so the split depends on the seed and
the names only (not on numpy's RNG streams). With `split: folders` the same hash order is walked folder by folder
and each top-level folder holds out about val_fraction of its characters (`_split`), so the validation split
weighs the corpus's folders as training does: a few large documents of one folder (the stdlib's generated codec
tables) cannot fill it (LOG.md, 2026-12-03, D15). A token file's chunks share one folder. The tokenizer
(`tokenizers` BPE over GPT-2 byte-level pre-tokenisation, one end-of-text special token, id 0) is trained on the
training split only. Documents are joined with an end-of-text id after each one. Token ids are cached as `.npy`
files (uint16 when the vocabulary fits) and opened memory-mapped.

Cache entries live in `<cache_dir>/data/<key>/`, key = hash of (corpus fingerprint, split, vocabulary size,
`CACHE_VERSION`). An entry is built in a temporary folder and renamed into place in one step, so concurrent
preparers (Ray trials) never see a partial entry; the loser of a race discards its copy and uses the winner's.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import shutil
import stat
import sysconfig
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from engram.config import MIX_FIELDS, DataConfig

CACHE_VERSION = 1  # bump when the tokenizer recipe or the cache layout changes; part of every cache key
CORPUS_VERSION = 1  # bump when the way documents are read or selected changes; part of every fingerprint
EOT_TOKEN = "<|endoftext|>"
N_BYTE_SYMBOLS = 256
TOKEN_CHUNK = 2048  # tokens per pseudo-document of a .npy token file
MIN_DOCUMENTS = 2  # one for each split
UINT16_VOCAB = 1 << 16
NPY_MAGIC = b"\x93NUMPY"
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
GLOB_CHARS = frozenset("*?[")
SUFFIX_FORMATS = types.MappingProxyType({".jsonl": "jsonl", ".parquet": "parquet", ".npy": "tokens"})


class DataError(ValueError):
    """A corpus that cannot be used; the message is one line naming the file or field and what was expected."""


@dataclass(frozen=True)
class PreparedData:
    train: np.ndarray  # (N_train,) token ids, memory-mapped, documents joined with eot_id
    val: np.ndarray  # (N_val,)
    vocab_size: int  # the tokenizer's actual size (<= requested); the requested size for token files
    token_texts: tuple[str, ...] | None  # decoded text of each id (for Engram's compression); None for .npy tokens
    fingerprint: str
    eot_id: int | None
    stats: dict  # documents / bytes / tokens per split, tokenizer path and training time, cache hit or not
    val_kinds: np.ndarray | None = None  # (N_val,) uint8 mixcorpus kind of each validation token; mix corpus only


@dataclass(frozen=True)
class _File:
    path: str  # absolute
    name: str  # relative to the corpus root: the document's identity for the split and the fingerprint
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class _Source:
    format: str  # resolved: stdlib | text | jsonl | parquet | tokens | mix
    files: tuple[_File, ...]
    takes: tuple[int, ...] | None  # bytes taken from each file (stdlib / text only), after max_bytes


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "engram-sweeps"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# ---------------------------------------------------------------------------------------------------------------
# Resolving a corpus into files


def _resolve(cfg: DataConfig) -> _Source:
    if cfg.is_mix:
        return _Source("mix", (), None)
    if cfg.corpus == "stdlib" or cfg.format == "stdlib":
        if cfg.corpus != "stdlib":
            raise DataError(f"format: 'stdlib' reads the standard library, so corpus must be 'stdlib', "
                            f"got {cfg.corpus!r}")
        if cfg.format not in ("auto", "stdlib"):
            raise DataError(f"format: {cfg.format!r} does not apply to corpus 'stdlib' (expected auto or stdlib)")
        ordered = _hash_order(_stdlib_files())
        return _Source("stdlib", ordered, _take_bytes(ordered, cfg.max_bytes))

    files = _corpus_files(cfg.corpus)
    fmt = cfg.format
    if fmt == "auto":
        formats = {SUFFIX_FORMATS.get(os.path.splitext(f.path)[1].lower(), "text") for f in files}
        fmt = formats.pop() if len(formats) == 1 else "text"
    if fmt == "tokens":
        if len(files) != 1:
            raise DataError(f"corpus: expected one .npy token file, got {len(files)} files from {cfg.corpus!r}")
        return _Source("tokens", files, None)
    if fmt == "text":
        ordered = _hash_order(files)
        return _Source("text", ordered, _take_bytes(ordered, cfg.max_bytes))
    return _Source(fmt, files, None)


def _stdlib_files() -> tuple[_File, ...]:
    root = stdlib_root()
    if not root.is_dir():
        raise DataError(f"corpus: the standard library folder {root} of this Python is missing")
    files, n_root = [], len(str(root)) + 1
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith("."))
        prefix = dirpath[n_root:].replace(os.sep, "/") + "/" if len(dirpath) >= n_root else ""
        # plain strings, not pathlib: the planner fingerprints the ~700 files of the stdlib on every call
        files.extend(_file(os.path.join(dirpath, fname), prefix + fname) for fname in filenames
                     if fname.endswith(".py"))
    return tuple(files)


def _corpus_files(corpus: str) -> tuple[_File, ...]:
    if GLOB_CHARS & set(corpus):
        paths = sorted(p for p in glob.glob(corpus, recursive=True) if not os.path.isdir(p))
        if not paths:
            raise DataError(f"corpus: no files match the glob {corpus!r}")
        root = Path(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]))
        return tuple(_file(p, Path(os.path.abspath(p)).relative_to(root).as_posix()) for p in paths)
    path = Path(corpus).expanduser()
    if path.is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                if not fname.startswith("."):
                    p = Path(dirpath, fname)
                    files.append(_file(p, p.relative_to(path).as_posix()))
        if not files:
            raise DataError(f"corpus: the folder {path} holds no files (expected text, .jsonl, .parquet or .npy)")
        return tuple(sorted(files, key=lambda f: f.name))
    if not os.path.lexists(path):
        raise DataError(f"corpus: no such file or folder {corpus!r} (expected 'stdlib', a folder, a glob or a file)")
    return (_file(path, path.name),)


def _file(path: str | Path, name: str) -> _File:
    try:
        st = os.stat(path)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: not a regular file")
    return _File(os.path.abspath(path), name, st.st_size, st.st_mtime_ns)


def _hash_order(files: tuple[_File, ...]) -> tuple[_File, ...]:
    return tuple(sorted(files, key=lambda f: (_name_hash("order", f.name), f.name)))


def _take_bytes(files: tuple[_File, ...], max_bytes: int | None) -> tuple[int, ...]:
    """Bytes taken from each file so that the total is min(max_bytes, all bytes); later files get 0."""
    takes, left = [], max_bytes if max_bytes is not None else float("inf")
    for f in files:
        take = int(min(f.size, left))
        takes.append(take)
        left -= take
    return tuple(takes)


def _name_hash(salt: str, name: str) -> bytes:
    return hashlib.blake2b(f"{salt}\0{name}".encode(), digest_size=8).digest()


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    # Keyed on (path, size, mtime): a sweep planner fingerprints the same corpus many times per process.
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    return h.hexdigest()


def _digest(f: _File) -> str:
    return _file_digest(f.path, f.size, f.mtime_ns)


def corpus_fingerprint(cfg: DataConfig) -> str:
    """Content hash (hex) of the corpus as selected, with the config fields that change the data.

    Names relative to the corpus root and file contents enter the hash, absolute paths do not: the same data in
    another folder or on another machine has the same fingerprint (hence the same trial ids).
    """
    return _fingerprint(cfg, _resolve(cfg))


def _fingerprint(cfg: DataConfig, src: _Source) -> str:
    # max_bytes enters only where it may cut the data, so a cap above the corpus size (the stdlib under the
    # default 16 MB) keeps the fingerprint, and the trial ids, of the uncapped corpus.
    max_bytes = cfg.max_bytes
    if src.format == "mix":
        from engram.mixcorpus import MIX_VERSION

        record = {"version": CORPUS_VERSION, "format": "mix", "mix_version": MIX_VERSION, "max_bytes": max_bytes,
                  **{f: getattr(cfg, f) for f in MIX_FIELDS}}
        return hashlib.blake2b(json.dumps(record, sort_keys=True).encode(), digest_size=16).hexdigest()
    if src.takes is None:
        files = [[f.name, f.size, _digest(f)] for f in src.files]
        # JSONL text and .npy data are never larger than their files; Parquet is compressed, so no such bound
        if src.format != "parquet" and max_bytes is not None and max_bytes >= sum(f.size for f in src.files):
            max_bytes = None
    else:
        files = [[f.name, take, _digest(f)] for f, take in zip(src.files, src.takes) if take > 0]
        max_bytes = None  # the bytes taken from each file are the selection
    record = {"version": CORPUS_VERSION, "format": src.format, "max_bytes": max_bytes,
              "text_field": cfg.text_field if src.format in ("jsonl", "parquet") else None, "files": files}
    text = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Reading documents: (name, text) pairs in corpus order


def _documents(cfg: DataConfig, src: _Source) -> tuple[list[tuple[str, str]], bool]:
    """The non-empty documents in corpus order, and whether max_bytes cut the corpus."""
    if src.format in ("stdlib", "text"):
        assert src.takes is not None
        docs = [(f.name, _read_text(f, take)) for f, take in zip(src.files, src.takes) if take > 0]
        truncated = sum(src.takes) < sum(f.size for f in src.files)
    else:
        budget = cfg.max_bytes if cfg.max_bytes is not None else float("inf")
        reader = _jsonl_records if src.format == "jsonl" else _parquet_records
        docs, truncated = [], False
        records = (record for f in src.files for record in reader(f, cfg.text_field))
        for name, text in records:
            if budget <= 0:
                truncated = True
                break
            data = text.encode()
            if len(data) > budget:
                text = data[: int(budget)].decode("utf-8", errors="ignore")  # drop a cut multi-byte character
                truncated = True
            budget -= len(data)
            docs.append((name, text))
        records.close()
    return [(name, text) for name, text in docs if text.strip()], truncated


def _read_text(f: _File, take: int) -> str:
    try:
        with open(f.path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise DataError(f"{f.path}: cannot read ({err.strerror or err})") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise DataError(f"{f.path}: looks binary (NUL byte at offset {nul}); expected UTF-8 text")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{f.path}: not UTF-8 text (invalid byte at offset {err.start})") from None
    return data[:take].decode("utf-8", errors="ignore")  # `ignore` only drops a multi-byte character cut at `take`


def _jsonl_records(f: _File, text_field: str) -> Iterator[tuple[str, str]]:
    try:
        fh = open(f.path, "rb")
    except OSError as err:
        raise DataError(f"{f.path}: cannot read ({err.strerror or err})") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DataError(f"{f.path}:{lineno}: not a JSON line ({err}); expected one JSON object per line") \
                    from None
            if not isinstance(record, dict):
                raise DataError(f"{f.path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if text_field not in record:
                keys = ", ".join(sorted(map(str, record))) or "none"
                raise DataError(f"{f.path}:{lineno}: no field {text_field!r} (text_field); the record has: {keys}")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{f.path}:{lineno}: field {text_field!r} (text_field) is "
                                f"{type(text).__name__}, expected a string")
            yield f"{f.name}:{lineno}", text


def _parquet_records(f: _File, text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow as pa  # deferred: only Parquet corpora need it
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{f.path}: not a readable Parquet file ({err})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{f.path}: no column {text_field!r} (text_field); columns: {', '.join(schema.names)}")
    col_type = schema.field(text_field).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)
            or getattr(pa.types, "is_string_view", lambda _: False)(col_type)):  # pyarrow >= 16
        raise DataError(f"{f.path}: column {text_field!r} (text_field) has type {col_type}, expected strings")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield f"{f.name}#{row}", text
            row += 1


# ---------------------------------------------------------------------------------------------------------------
# Split, tokenizer, encoding


def _split(names: list[str], cfg: DataConfig, sizes: list[int] | None = None) -> np.ndarray:
    """Boolean mask of validation documents (`sizes`: their characters, needed by the "folders" split).

    "documents": the round(val_fraction * n) smallest hashes of (seed, name). "folders": within each top-level
    folder (a name's first path component; names without one share a folder), documents in the order of those
    hashes join validation when each brings the folder's validation characters nearer to val_fraction of its
    characters than they are without it (a document that would overshoot by more is skipped, the walk goes on).
    A folder never goes to validation whole (val_fraction < 0.5); when no folder holds a document out, the
    smallest hash does. On the stdlib corpus the folder shares of the validation characters are then within a
    total variation of 0.11 of training's over split seeds 0-19 (documents: 0.31-0.72), leaning to smaller
    documents (LOG.md, 2026-12-03, D15).
    """
    n = len(names)
    order = sorted(range(n), key=lambda i: (_name_hash(str(cfg.split_seed), names[i]), i))
    is_val = np.zeros(n, dtype=bool)
    if cfg.split == "documents":
        is_val[order[:min(max(1, round(cfg.val_fraction * n)), n - 1)]] = True
        return is_val
    assert sizes is not None and len(sizes) == n
    folders: dict[str, list[int]] = {}
    for i in order:
        folders.setdefault(names[i].partition("/")[0] if "/" in names[i] else "", []).append(i)
    for members in folders.values():
        target = cfg.val_fraction * sum(sizes[i] for i in members)
        held = 0
        for i in members:
            if held + sizes[i] / 2 >= target:  # |held + size - target| >= |held - target|
                continue
            is_val[i] = True
            held += sizes[i]
    if not is_val.any():
        is_val[order[0]] = True
    return is_val


def _train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # deferred: heavy import

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def _encode(tokenizer: Any, texts: list[str], eot_id: int, dtype: np.dtype) -> np.ndarray:
    # encode_batch_fast (tokenizers >= 0.20) skips the offsets we do not need
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    ids = encode(texts, add_special_tokens=False)
    n_tokens = sum(len(e.ids) + 1 for e in ids)
    out = np.empty(n_tokens, dtype=dtype)
    pos = 0
    for e in ids:
        out[pos: pos + len(e.ids)] = e.ids
        pos += len(e.ids)
        out[pos] = eot_id
        pos += 1
    return out


def token_texts_of(tokenizer: Any) -> tuple[str, ...]:
    """Text of each id decoded on its own, so byte-level tokens keep their leading space (" the")."""
    return tuple(tokenizer.decode([i], skip_special_tokens=False) for i in range(tokenizer.get_vocab_size()))


def _id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= UINT16_VOCAB else np.uint32)


# ---------------------------------------------------------------------------------------------------------------
# prepare_data


def prepare_data(cfg: DataConfig, vocab_size: int, cache_dir: Path | None = None, *,
                 seq_len: int | None = None) -> PreparedData:
    """Token ids of the training and validation splits, from the cache when this data was prepared before.

    `seq_len`, when given, requires each split to hold at least one training sequence (seq_len + 1 tokens).
    """
    start = time.perf_counter()
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
        raise DataError(f"vocab_size: expected a positive integer, got {vocab_size!r}")
    src = _resolve(cfg)
    if src.format != "tokens" and vocab_size < N_BYTE_SYMBOLS + 1:
        raise DataError(f"vocab_size: expected at least {N_BYTE_SYMBOLS + 1} for a byte-level BPE tokenizer "
                        f"(256 bytes + end-of-text), got {vocab_size}")
    fingerprint = _fingerprint(cfg, src)
    vocab_size = int(vocab_size)
    split = [cfg.val_fraction, cfg.split_seed] + ([cfg.split] if cfg.split != "documents" else [])
    key_text = json.dumps([CACHE_VERSION, fingerprint, *split, vocab_size])
    key = hashlib.blake2b(key_text.encode(), digest_size=12).hexdigest()
    entry = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "data" / key

    cache_hit = (entry / "meta.json").is_file()
    if not cache_hit:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=entry.parent))
        except OSError as err:
            raise DataError(f"{entry.parent}: cannot create the data cache ({err.strerror or err}); "
                            f"expected a writable folder") from None
        try:
            if src.format == "tokens":
                meta = _build_tokens(cfg, src, vocab_size, tmp)
            elif src.format == "mix":
                meta = _build_mix(cfg, vocab_size, tmp)
            else:
                meta = _build_text(cfg, src, vocab_size, tmp)
            meta.update(fingerprint=fingerprint, format=src.format, corpus=cfg.corpus, data=dataclasses.asdict(cfg))
            (tmp / "meta.json").write_text(json.dumps(meta))  # inside tmp: the rename below publishes all at once
            try:
                os.rename(tmp, entry)
            except OSError as err:
                if not (entry / "meta.json").is_file():  # not a lost race to another preparer
                    raise DataError(f"{entry}: cannot store the prepared data ({err.strerror or err}); "
                                    f"expected a writable cache folder without a broken entry") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    meta = json.loads((entry / "meta.json").read_text())
    train = np.load(entry / "train.npy", mmap_mode="r")
    val = np.load(entry / "val.npy", mmap_mode="r")
    val_kinds = np.load(entry / "val_kinds.npy", mmap_mode="r") if src.format == "mix" else None
    if seq_len is not None:
        for split, arr in (("training", train), ("validation", val)):
            if len(arr) < seq_len + 1:
                raise DataError(f"corpus: the {split} split of {cfg.corpus!r} holds {len(arr)} tokens, fewer than "
                                f"one sequence of seq_len + 1 = {seq_len + 1}; use more data or a larger "
                                f"val_fraction")
    stats = dict(meta["stats"], cache_hit=cache_hit, cache_path=str(entry),
                 tokenizer_path=str(entry / "tokenizer.json") if src.format != "tokens" else None,
                 seconds=time.perf_counter() - start)
    texts = meta.get("token_texts")
    return PreparedData(train=train, val=val, vocab_size=meta["vocab_size"],
                        token_texts=tuple(texts) if texts is not None else None,
                        fingerprint=fingerprint, eot_id=meta["eot_id"], stats=stats, val_kinds=val_kinds)


def _too_few(cfg: DataConfig, n_docs: int, what: str) -> DataError:
    return DataError(f"corpus: {cfg.corpus!r} holds {n_docs} {what}, expected at least {MIN_DOCUMENTS} "
                     f"(one per split)")


def _fit_tokenizer(train_texts: list[str], vocab_size: int) -> tuple[Any, int, int, np.dtype, float]:
    """The BPE tokenizer trained on the training split: (tokenizer, end-of-text id, its vocabulary size, the id
    dtype, seconds taken)."""
    t0 = time.perf_counter()
    tokenizer = _train_tokenizer(train_texts, vocab_size)
    seconds = time.perf_counter() - t0
    eot_id = tokenizer.token_to_id(EOT_TOKEN)
    actual_vocab = tokenizer.get_vocab_size()
    assert eot_id is not None and actual_vocab <= vocab_size
    return tokenizer, eot_id, actual_vocab, _id_dtype(actual_vocab), seconds


def _build_text(cfg: DataConfig, src: _Source, vocab_size: int, out: Path) -> dict:
    docs, truncated = _documents(cfg, src)
    if len(docs) < MIN_DOCUMENTS:
        hint = " (a single text file is one document: pass a folder or a glob)" if src.format == "text" else ""
        raise DataError(str(_too_few(cfg, len(docs), "non-empty documents")) + hint)
    is_val = _split([name for name, _ in docs], cfg, [len(text) for _, text in docs])
    train_texts = [text for (_, text), v in zip(docs, is_val) if not v]
    val_texts = [text for (_, text), v in zip(docs, is_val) if v]

    tokenizer, eot_id, actual_vocab, dtype, tokenizer_seconds = _fit_tokenizer(train_texts, vocab_size)
    t0 = time.perf_counter()
    train = _encode(tokenizer, train_texts, eot_id, dtype)
    val = _encode(tokenizer, val_texts, eot_id, dtype)
    encode_seconds = time.perf_counter() - t0
    tokenizer.save(str(out / "tokenizer.json"))
    np.save(out / "train.npy", train)
    np.save(out / "val.npy", val)
    stats = {"documents_train": len(train_texts), "documents_val": len(val_texts),
             "bytes_train": sum(len(t.encode()) for t in train_texts),
             "bytes_val": sum(len(t.encode()) for t in val_texts),
             "tokens_train": int(len(train)), "tokens_val": int(len(val)),
             "tokenizer_seconds": tokenizer_seconds, "encode_seconds": encode_seconds, "truncated": truncated}
    return {"vocab_size": actual_vocab, "eot_id": eot_id, "token_texts": list(token_texts_of(tokenizer)),
            "stats": stats}


def _build_tokens(cfg: DataConfig, src: _Source, vocab_size: int, out: Path) -> dict:
    (f,) = src.files
    try:
        with open(f.path, "rb") as fh:
            magic = fh.read(len(NPY_MAGIC))
        if magic != NPY_MAGIC:  # np.load would fall back to pickle and blame that instead
            raise DataError(f"{f.path}: not a .npy file (no NUMPY header); expected a 1-D integer array saved "
                            f"with numpy.save")
        ids = np.load(f.path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{f.path}: not a readable .npy array ({err})") from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise DataError(f"{f.path}: expected a 1-D integer array of token ids, got {ids.ndim}-D {ids.dtype}")
    n_keep = len(ids) if cfg.max_bytes is None else min(len(ids), cfg.max_bytes // ids.dtype.itemsize)
    truncated = n_keep < len(ids)
    ids = ids[:n_keep]
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
        raise DataError(f"{f.path}: token id {bad} is outside the vocabulary [0, {vocab_size}) of the model "
                        f"(vocab_size)")
    n_chunks = -(-len(ids) // TOKEN_CHUNK)
    if n_chunks < MIN_DOCUMENTS:
        raise DataError(f"{f.path}: holds {len(ids)} tokens, expected at least {TOKEN_CHUNK + 1} "
                        f"({MIN_DOCUMENTS} chunks of {TOKEN_CHUNK}, one per split)")
    is_val = _split([f"chunk{i}" for i in range(n_chunks)], cfg,
                    [min(TOKEN_CHUNK, len(ids) - i * TOKEN_CHUNK) for i in range(n_chunks)])
    dtype = _id_dtype(vocab_size)
    chunks = [np.asarray(ids[i * TOKEN_CHUNK: (i + 1) * TOKEN_CHUNK], dtype=dtype) for i in range(n_chunks)]
    train = np.concatenate([c for c, v in zip(chunks, is_val) if not v])
    val = np.concatenate([c for c, v in zip(chunks, is_val) if v])
    np.save(out / "train.npy", train)
    np.save(out / "val.npy", val)
    stats = {"documents_train": int((~is_val).sum()), "documents_val": int(is_val.sum()),
             "bytes_train": None, "bytes_val": None, "tokens_train": int(len(train)), "tokens_val": int(len(val)),
             "tokenizer_seconds": None, "encode_seconds": None, "truncated": truncated}
    return {"vocab_size": vocab_size, "eot_id": None, "token_texts": None, "stats": stats}


def _build_mix(cfg: DataConfig, vocab_size: int, out: Path) -> dict:
    """The generated mix corpus: split by document name as any corpus, tokenizer trained on the training split,
    and the kind of every validation token (from the tokenizer's offsets) saved beside the ids."""
    from engram import mixcorpus

    assert cfg.max_bytes is not None  # DataConfig requires a size for the mix corpus
    is_val = _split(mixcorpus.document_names(cfg.max_bytes), cfg)
    docs = mixcorpus.generate(cfg.knowledge_share, cfg.mix_entities, cfg.max_bytes, cfg.mix_seed, is_val)
    train_texts = [d.text for d, v in zip(docs, is_val) if not v]
    val_docs = [d for d, v in zip(docs, is_val) if v]

    tokenizer, eot_id, actual_vocab, dtype, tokenizer_seconds = _fit_tokenizer(train_texts, vocab_size)
    t0 = time.perf_counter()
    train = _encode(tokenizer, train_texts, eot_id, dtype)
    # Validation with offsets (encode_batch, not the fast path): each token's kind is that of the answer span
    # its characters overlap; the end-of-text id after each document is context.
    encoded = tokenizer.encode_batch([d.text for d in val_docs], add_special_tokens=False)
    val = np.concatenate([np.append(np.asarray(e.ids, dtype=dtype), dtype.type(eot_id)) for e in encoded])
    val_kinds = np.concatenate([np.append(mixcorpus.token_kinds(e.offsets, d.spans), np.uint8(mixcorpus.CONTEXT))
                                for e, d in zip(encoded, val_docs)])
    assert len(val_kinds) == len(val)
    encode_seconds = time.perf_counter() - t0
    tokenizer.save(str(out / "tokenizer.json"))
    np.save(out / "train.npy", train)
    np.save(out / "val.npy", val)
    np.save(out / "val_kinds.npy", val_kinds)
    n_chars = [sum(getattr(d, f) for d in docs) for f in ("knowledge_chars", "computation_chars")]
    stats = {"documents_train": len(train_texts), "documents_val": len(val_docs),
             "bytes_train": sum(len(t.encode()) for t in train_texts),
             "bytes_val": sum(len(d.text.encode()) for d in val_docs),
             "tokens_train": int(len(train)), "tokens_val": int(len(val)),
             "tokenizer_seconds": tokenizer_seconds, "encode_seconds": encode_seconds, "truncated": False,
             "knowledge_share_achieved": n_chars[0] / max(1, sum(n_chars)),
             "val_tokens_by_kind": {name: int((val_kinds == k).sum()) for k, name in enumerate(mixcorpus.KIND_NAMES)}}
    return {"vocab_size": actual_vocab, "eot_id": eot_id, "token_texts": list(token_texts_of(tokenizer)),
            "stats": stats}
