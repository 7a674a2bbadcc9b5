"""Tests of engram/data.py: corpus formats, the document-level split, the BPE tokenizer, the token cache, errors."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tokenizers import Tokenizer

from engram.config import DataConfig
from engram.data import (DataError, TOKEN_CHUNK, _documents, _resolve, _split, _stdlib_files, corpus_fingerprint,
                         prepare_data, stdlib_root)

VOCAB = 300
WORDS = ("the cat sat on a mat while dogs ran past quick brown foxes jumping over lazy rivers and "
         "mountains under grey skies with rain falling softly café naïve ünïcode").split()


def _doc_text(i: int, n_words: int = 120) -> str:
    rng = random.Random(i)
    body = " ".join(rng.choice(WORDS) for _ in range(n_words))
    return f"marker{i:03d}x {body}\n"


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(30):
        (root / ("sub" if i % 3 else "") / f"doc{i:03d}.txt").write_text(_doc_text(i), encoding="utf-8")
    return root


def _decoded(data, arr: np.ndarray) -> str:
    tok = Tokenizer.from_file(data.stats["tokenizer_path"])
    return tok.decode([int(i) for i in arr], skip_special_tokens=False)


def _markers(text: str) -> set[str]:
    return set(re.findall(r"marker\d{3}x", text))


# ---------------------------------------------------------------------------------------------------------------
# formats


def test_text_dir_loads_joined_with_eot(text_dir, tmp_path):
    data = prepare_data(DataConfig(corpus=str(text_dir)), VOCAB, tmp_path / "cache")
    assert data.stats["documents_train"] + data.stats["documents_val"] == 30
    assert data.train.dtype == np.uint16 and data.val.dtype == np.uint16
    assert 257 <= data.vocab_size <= VOCAB and len(data.token_texts) == data.vocab_size
    assert data.token_texts[data.eot_id] == "<|endoftext|>"
    # one end-of-text id after each document
    assert int((data.train == data.eot_id).sum()) == data.stats["documents_train"]
    assert int((data.val == data.eot_id).sum()) == data.stats["documents_val"]
    assert data.train[-1] == data.eot_id and data.val[-1] == data.eot_id
    assert int(data.train.max()) < data.vocab_size
    assert not data.stats["truncated"]


def test_glob_selects_only_matching_files(text_dir, tmp_path):
    (text_dir / "notes.md").write_text("not part of the glob " * 20)
    data = prepare_data(DataConfig(corpus=str(text_dir / "**" / "*.txt")), VOCAB, tmp_path / "cache")
    assert data.stats["documents_train"] + data.stats["documents_val"] == 30
    assert "not part of the glob" not in _decoded(data, data.train) + _decoded(data, data.val)


def test_jsonl_loads_with_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"body": _doc_text(i), "id": i}) for i in range(12)]
    path.write_text("\n".join(lines[:6]) + "\n\n" + "\n".join(lines[6:]) + "\n")  # a blank line is skipped
    data = prepare_data(DataConfig(corpus=str(path), text_field="body"), VOCAB, tmp_path / "cache")
    assert data.stats["documents_train"] + data.stats["documents_val"] == 12
    assert _markers(_decoded(data, data.train) + _decoded(data, data.val)) == {f"marker{i:03d}x" for i in range(12)}


def test_jsonl_max_bytes_takes_a_prefix(tmp_path):
    path = tmp_path / "docs.jsonl"
    texts = [_doc_text(i) for i in range(12)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    max_bytes = len("".join(texts[:4]).encode()) + 10  # four records and 10 bytes of the fifth
    data = prepare_data(DataConfig(corpus=str(path), max_bytes=max_bytes), VOCAB, tmp_path / "cache")
    assert data.stats["truncated"]
    assert data.stats["bytes_train"] + data.stats["bytes_val"] == max_bytes
    assert _markers(_decoded(data, data.train) + _decoded(data, data.val)) == {f"marker{i:03d}x" for i in range(5)}
    whole = prepare_data(DataConfig(corpus=str(path), max_bytes=None), VOCAB, tmp_path / "cache")
    assert not whole.stats["truncated"] and whole.fingerprint != data.fingerprint
    assert corpus_fingerprint(DataConfig(corpus=str(path), max_bytes=path.stat().st_size)) == whole.fingerprint
    # A prefix is read as one: records past the cap are never parsed (a broken line there is not an error).
    broken = tmp_path / "broken.jsonl"
    broken.write_text(path.read_text() + "{not json\n")
    capped = prepare_data(DataConfig(corpus=str(broken), max_bytes=max_bytes), VOCAB, tmp_path / "cache")
    assert capped.stats["bytes_train"] + capped.stats["bytes_val"] == max_bytes


def test_parquet_loads_with_text_column(tmp_path):
    path = tmp_path / "docs.parquet"
    texts = [_doc_text(i) for i in range(10)] + [None]  # a null row is skipped
    pd.DataFrame({"content": texts, "n": range(11)}).to_parquet(path)
    data = prepare_data(DataConfig(corpus=str(path), text_field="content"), VOCAB, tmp_path / "cache")
    assert data.stats["documents_train"] + data.stats["documents_val"] == 10
    assert _markers(_decoded(data, data.train) + _decoded(data, data.val)) == {f"marker{i:03d}x" for i in range(10)}


def test_npy_tokens_split_into_whole_chunks(tmp_path):
    ids = np.random.default_rng(0).integers(0, 500, size=10 * TOKEN_CHUNK + 100).astype(np.int64)
    path = tmp_path / "tokens.npy"
    np.save(path, ids)
    data = prepare_data(DataConfig(corpus=str(path)), 500, tmp_path / "cache")
    assert data.token_texts is None and data.eot_id is None and data.vocab_size == 500
    assert data.train.dtype == np.uint16
    assert len(data.train) + len(data.val) == len(ids)
    chunks = {ids[i: i + TOKEN_CHUNK].tobytes() for i in range(0, len(ids), TOKEN_CHUNK)}
    val = np.asarray(data.val, dtype=np.int64)
    assert len(val) in (TOKEN_CHUNK, 100)  # round(0.05 * 11 chunks) = one whole chunk of the original stream
    assert val.tobytes() in chunks
    assert np.array_equal(np.sort(np.concatenate([data.train, data.val])), np.sort(ids))


def test_stdlib_default_respects_max_bytes(tmp_path):
    max_bytes = 150_000
    cfg = DataConfig(max_bytes=max_bytes)
    names = [f.name for f in _stdlib_files()]
    assert "os.py" in names and "json/decoder.py" in names
    assert not any(part in ("test", "tests", "idle_test", "site-packages")
                   for name in names for part in name.split("/"))
    data = prepare_data(cfg, 400, tmp_path / "cache")
    n_bytes = data.stats["bytes_train"] + data.stats["bytes_val"]
    assert max_bytes - 4 <= n_bytes <= max_bytes  # the last file is cut at max_bytes (a cut character is dropped)
    assert data.stats["truncated"]
    assert "def " in _decoded(data, data.train)
    assert corpus_fingerprint(cfg) == data.fingerprint
    assert corpus_fingerprint(DataConfig(max_bytes=max_bytes + 1)) != data.fingerprint
    # a cap above the size of the stdlib selects all of it: the same data, the same fingerprint
    assert corpus_fingerprint(DataConfig(max_bytes=10**10)) == corpus_fingerprint(DataConfig(max_bytes=None))
    assert stdlib_root().is_dir()


# ---------------------------------------------------------------------------------------------------------------
# split, cache, tokenizer, fingerprint


def test_split_is_document_level_deterministic_and_seeded(text_dir, tmp_path):
    cfg = DataConfig(corpus=str(text_dir), val_fraction=0.2)
    a = prepare_data(cfg, VOCAB, tmp_path / "a")
    b = prepare_data(cfg, VOCAB, tmp_path / "b")  # a fresh cache: rebuilt from scratch
    assert not b.stats["cache_hit"]
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    train_docs, val_docs = _markers(_decoded(a, a.train)), _markers(_decoded(a, a.val))
    assert len(val_docs) == 6 and len(train_docs) == 24 and not train_docs & val_docs
    other = prepare_data(DataConfig(corpus=str(text_dir), val_fraction=0.2, split_seed=1), VOCAB, tmp_path / "a")
    assert _markers(_decoded(other, other.val)) != val_docs


def test_folders_split_holds_out_each_folders_share_of_characters(tmp_path):
    # Three folders: a few large generated tables (as the stdlib's encodings/), many small files, and top-level
    # files. The folder split holds out val_fraction of each folder's characters, within half a document.
    root = tmp_path / "corpus"
    sizes = {"tables": [6000] * 8, "code": [300 + 37 * i for i in range(40)], "": [900] * 20}
    for folder, lengths in sizes.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, n in enumerate(lengths):
            (root / folder / f"{folder or 'top'}{i:03d}.txt").write_text(("w%d " % i * n)[:n], encoding="utf-8")
    for seed in range(6):
        cfg = DataConfig(corpus=str(root), val_fraction=0.1, split_seed=seed, split="folders")
        docs, _ = _documents(cfg, _resolve(cfg))
        names, lengths = [n for n, _ in docs], [len(t) for _, t in docs]
        is_val = _split(names, cfg, lengths)
        assert np.array_equal(is_val, _split(names, cfg, lengths))  # deterministic
        for folder, folder_sizes in sizes.items():
            member = [(n.partition("/")[0] if "/" in n else "") == folder for n in names]
            held = sum(s for s, v, m in zip(lengths, is_val, member) if v and m)
            assert abs(held - 0.1 * sum(folder_sizes)) <= max(folder_sizes) / 2, (seed, folder)
            assert 0 < held < sum(folder_sizes)
    other = _split(names, DataConfig(corpus=str(root), val_fraction=0.1, split_seed=1, split="folders"), lengths)
    assert not np.array_equal(is_val, other)  # seeded
    # The tables' share of the validation characters stays nearer their corpus share than by document count.
    corpus_share = sum(sizes["tables"]) / sum(lengths)
    off = {split: max(abs(_tables_share(names, lengths, _split(names, DataConfig(
        corpus=str(root), val_fraction=0.1, split_seed=seed, split=split), lengths)) - corpus_share)
        for seed in range(6)) for split in ("documents", "folders")}
    assert off["folders"] < off["documents"], off


def _tables_share(names, lengths, is_val) -> float:
    held = sum(s for s, v in zip(lengths, is_val) if v)
    return sum(s for s, v, n in zip(lengths, is_val, names) if v and n.startswith("tables/")) / held


def test_folders_split_prepares_its_own_cache_entry(text_dir, tmp_path):
    by_docs = prepare_data(DataConfig(corpus=str(text_dir), val_fraction=0.2), VOCAB, tmp_path / "cache")
    by_folders = prepare_data(DataConfig(corpus=str(text_dir), val_fraction=0.2, split="folders"), VOCAB,
                              tmp_path / "cache")
    assert not by_folders.stats["cache_hit"] and by_folders.stats["cache_path"] != by_docs.stats["cache_path"]
    train_docs, val_docs = _markers(_decoded(by_folders, by_folders.train)), _markers(_decoded(by_folders,
                                                                                                by_folders.val))
    assert len(train_docs | val_docs) == 30 and not train_docs & val_docs
    # text_dir: 10 top-level documents and 20 in sub/, all of one size: 2 and 4 held out
    assert sorted(int(m[6:9]) % 3 == 0 for m in val_docs) == [False] * 4 + [True] * 2
    tokens = np.arange(3 * TOKEN_CHUNK, dtype=np.int32) % 50
    np.save(tmp_path / "ids.npy", tokens)
    chunks = prepare_data(DataConfig(corpus=str(tmp_path / "ids.npy"), val_fraction=0.3, split="folders"), 50,
                          tmp_path / "cache")
    assert len(chunks.val) == TOKEN_CHUNK and len(chunks.train) == 2 * TOKEN_CHUNK  # one folder of three chunks


def test_second_prepare_is_a_cache_hit_with_identical_memmaps(text_dir, tmp_path):
    cfg = DataConfig(corpus=str(text_dir))
    first = prepare_data(cfg, VOCAB, tmp_path / "cache")
    second = prepare_data(cfg, VOCAB, tmp_path / "cache")
    assert not first.stats["cache_hit"] and second.stats["cache_hit"]
    assert isinstance(second.train, np.memmap) and isinstance(second.val, np.memmap)
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert first.token_texts == second.token_texts and first.fingerprint == second.fingerprint
    assert second.stats["tokens_train"] == len(second.train)
    assert len(list((tmp_path / "cache" / "data").iterdir())) == 1
    third = prepare_data(cfg, VOCAB + 20, tmp_path / "cache")  # another vocabulary is another entry
    assert not third.stats["cache_hit"]


def test_tokenizer_round_trips_and_keeps_leading_spaces(text_dir, tmp_path):
    data = prepare_data(DataConfig(corpus=str(text_dir)), VOCAB, tmp_path / "cache")
    tok = Tokenizer.from_file(data.stats["tokenizer_path"])
    text = "the quick café sat on ünïcode mats\n\tWITH unseen ∑ symbols 🙂 and  spaces"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    # merged words keep their leading space when decoded on their own (" the" is "Ġthe" in the vocabulary)
    spaced = [t for t in data.token_texts if len(t) > 2 and t[0] == " " and t[1:].isalpha()]
    assert spaced and all(tok.encode(t, add_special_tokens=False).ids == [data.token_texts.index(t)]
                          for t in spaced)
    assert tok.decode([int(i) for i in data.train[:50]]) in _doc_text(0) + "".join(_doc_text(i) for i in range(30))


def test_tokenizer_is_trained_on_training_split_only(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    words = [f"q{c}z{c}w" for c in "abcdefghij"]  # one word per document, repeated: each merges into one token
    for i, word in enumerate(words):
        (root / f"{i}.txt").write_text(" ".join([word] * 300) + "\n")
    data = prepare_data(DataConfig(corpus=str(root), val_fraction=0.1), 400, tmp_path / "cache")
    val_text = _decoded(data, data.val)
    (val_word,) = [w for w in words if w in val_text]
    assert all(f" {w}" in data.token_texts for w in words if w != val_word)
    assert f" {val_word}" not in data.token_texts  # as frequent as the others, but never seen in training


def test_fingerprint_changes_with_content_and_fields(text_dir, tmp_path):
    cfg = DataConfig(corpus=str(text_dir))
    before = corpus_fingerprint(cfg)
    assert corpus_fingerprint(cfg) == before
    assert corpus_fingerprint(DataConfig(corpus=str(text_dir), max_bytes=1000)) != before
    assert corpus_fingerprint(DataConfig(corpus=str(text_dir), max_bytes=None)) == before  # 16 MB cuts nothing
    assert corpus_fingerprint(DataConfig(corpus=str(text_dir), format="text")) == before  # "auto" resolves to text
    target = text_dir / "doc000.txt"
    target.write_text(target.read_text().replace("marker000x", "marker999x"))  # same size, new content
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 1_000_000))
    changed = corpus_fingerprint(cfg)
    assert changed != before
    data = prepare_data(cfg, VOCAB, tmp_path / "cache")
    assert data.fingerprint == changed
    # the same data in another folder has the same fingerprint: content, not location
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in text_dir.rglob("*.txt"):
        (copy / f.relative_to(text_dir)).parent.mkdir(parents=True, exist_ok=True)
        (copy / f.relative_to(text_dir)).write_bytes(f.read_bytes())
    assert corpus_fingerprint(DataConfig(corpus=str(copy))) == changed


def test_jsonl_fingerprint_depends_on_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"a": _doc_text(i), "b": "x"}) + "\n" for i in range(4)))
    assert corpus_fingerprint(DataConfig(corpus=str(path), text_field="a")) != \
        corpus_fingerprint(DataConfig(corpus=str(path), text_field="b"))


def test_concurrent_preparers_share_one_complete_entry(text_dir, tmp_path):
    for i in range(30, 200):  # enough text that both processes are still building when the other starts
        (text_dir / f"more{i}.txt").write_text(_doc_text(i, n_words=400))
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import os, sys, time
        import numpy as np
        from pathlib import Path
        from engram.config import DataConfig
        from engram.data import prepare_data
        while not os.path.exists({str(go)!r}):
            time.sleep(0.005)
        d = prepare_data(DataConfig(corpus={str(text_dir)!r}), 1000, Path({str(tmp_path / "cache")!r}))
        np.save(sys.argv[1], np.concatenate([d.train, d.val]))
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    outs = [tmp_path / f"out{i}.npy" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(out)], env=env, stderr=subprocess.PIPE)
             for out in outs]
    go.write_text("")
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
    assert np.array_equal(np.load(outs[0]), np.load(outs[1]))
    entries = list((tmp_path / "cache" / "data").iterdir())
    assert len(entries) == 1 and sorted(p.name for p in entries[0].iterdir()) == \
        ["meta.json", "tokenizer.json", "train.npy", "val.npy"]  # no temporary folders left behind


# ---------------------------------------------------------------------------------------------------------------
# errors: one line, naming the file or field


def _error(cfg: DataConfig, tmp_path: Path, vocab: int = VOCAB, **kw) -> str:
    with pytest.raises(DataError) as info:
        prepare_data(cfg, vocab, tmp_path / "cache", **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_empty_dir_and_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "holds no files" in _error(DataConfig(corpus=str(tmp_path / "empty")), tmp_path)
    assert "no such file or folder" in _error(DataConfig(corpus=str(tmp_path / "nope")), tmp_path)
    assert "no files match" in _error(DataConfig(corpus=str(tmp_path / "nope" / "*.txt")), tmp_path)


def test_binary_and_unreadable_files(text_dir, tmp_path):
    (text_dir / "blob.bin").write_bytes(bytes(range(256)))
    message = _error(DataConfig(corpus=str(text_dir)), tmp_path)
    assert "blob.bin" in message and "binary" in message
    (text_dir / "blob.bin").write_bytes(b"caf\xe9 latin-1 text")
    message = _error(DataConfig(corpus=str(text_dir)), tmp_path)
    assert "blob.bin" in message and "not UTF-8" in message
    (text_dir / "blob.bin").unlink()
    (text_dir / "gone.txt").symlink_to(tmp_path / "deleted.txt")
    message = _error(DataConfig(corpus=str(text_dir)), tmp_path)
    assert "gone.txt" in message and "cannot read" in message


def test_jsonl_without_field_or_invalid(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "a b c"}) + "\n" + json.dumps({"body": "d e f"}) + "\n")
    message = _error(DataConfig(corpus=str(path)), tmp_path)
    assert "docs.jsonl:2" in message and "'text'" in message and "text_field" in message and "body" in message
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert "docs.jsonl:2" in _error(DataConfig(corpus=str(path)), tmp_path)
    path.write_text('{"text": 3}\n')
    assert "expected a string" in _error(DataConfig(corpus=str(path)), tmp_path)


def test_parquet_without_column(tmp_path):
    path = tmp_path / "docs.parquet"
    pd.DataFrame({"body": ["a b c", "d e f"]}).to_parquet(path)
    message = _error(DataConfig(corpus=str(path)), tmp_path)
    assert "docs.parquet" in message and "'text'" in message and "body" in message
    pd.DataFrame({"text": [1, 2]}).to_parquet(path)
    assert "expected strings" in _error(DataConfig(corpus=str(path)), tmp_path)


def test_corrupt_parquet_and_npy(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet" * 10)
    message = _error(DataConfig(corpus=str(tmp_path / "bad.parquet")), tmp_path)
    assert "bad.parquet" in message and "Parquet" in message
    (tmp_path / "bad.npy").write_bytes(b"not an array" * 10)
    message = _error(DataConfig(corpus=str(tmp_path / "bad.npy")), tmp_path)
    assert "bad.npy" in message and "not a .npy file" in message


def test_too_small_corpora(tmp_path):
    single = tmp_path / "one.txt"
    single.write_text(_doc_text(0))
    message = _error(DataConfig(corpus=str(single)), tmp_path)
    assert "1 non-empty documents" in message and "at least 2" in message
    root = tmp_path / "two"
    root.mkdir()
    (root / "a.txt").write_text(_doc_text(1, n_words=5))
    (root / "b.txt").write_text(_doc_text(2, n_words=5))
    (root / "blank.txt").write_text(" \n\n")  # whitespace-only files are not documents
    assert prepare_data(DataConfig(corpus=str(root)), VOCAB, tmp_path / "cache").stats["documents_val"] == 1
    message = _error(DataConfig(corpus=str(root)), tmp_path, seq_len=128)
    assert "seq_len" in message and "split" in message
    np.save(tmp_path / "few.npy", np.arange(100))
    assert "few.npy" in _error(DataConfig(corpus=str(tmp_path / "few.npy")), tmp_path)


def test_token_file_checks(tmp_path):
    path = tmp_path / "tokens.npy"
    np.save(path, np.arange(3 * TOKEN_CHUNK) % 1000)
    message = _error(DataConfig(corpus=str(path)), tmp_path, vocab=512)
    assert "tokens.npy" in message and "999" in message and "vocab_size" in message
    np.save(path, np.arange(3 * TOKEN_CHUNK, dtype=np.float32))
    assert "integer" in _error(DataConfig(corpus=str(path)), tmp_path, vocab=1 << 14)
    np.save(path, np.zeros((2, 3 * TOKEN_CHUNK), dtype=np.int32))
    assert "1-D" in _error(DataConfig(corpus=str(path)), tmp_path, vocab=512)


def test_vocab_too_small_for_byte_level(text_dir, tmp_path):
    assert "vocab_size" in _error(DataConfig(corpus=str(text_dir)), tmp_path, vocab=200)
