"""Data preparation figures: corpus size, documents, tokens, tokenizer training time, first vs cached prepare.

    python benchmarks/bench_data.py [--corpus stdlib] [--vocab 4096] [--max-bytes 16000000] [--cache-dir DIR]

Without --cache-dir a fresh temporary cache is used, so the first prepare really builds. The cached prepare is
timed twice: in this process and in a fresh Python process (what a Ray trial sees), both inside the process
(import time reported apart). Ratios are measured within one run; absolute times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engram.config import DataConfig  # noqa: E402
from engram.data import corpus_fingerprint, prepare_data  # noqa: E402

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from engram.config import DataConfig
from engram.data import prepare_data
t1 = time.perf_counter()
cfg = DataConfig(**json.loads(sys.argv[1]))
d = prepare_data(cfg, int(sys.argv[2]), cache_dir=__import__("pathlib").Path(sys.argv[3]))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "prepare_s": t2 - t1, "cache_hit": d.stats["cache_hit"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="stdlib")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--max-bytes", type=int, default=DataConfig.max_bytes)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    cfg = DataConfig(corpus=args.corpus, max_bytes=args.max_bytes)

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or Path(tmp)
        t0 = time.perf_counter()
        fingerprint = corpus_fingerprint(cfg)
        fp_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        corpus_fingerprint(cfg)
        fp_warm = time.perf_counter() - t0

        t0 = time.perf_counter()
        first = prepare_data(cfg, args.vocab, cache_dir)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached = prepare_data(cfg, args.vocab, cache_dir)
        cached_s = time.perf_counter() - t0
        child = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"corpus": args.corpus,
                                "max_bytes": args.max_bytes}), str(args.vocab), str(cache_dir)],
                               check=True, capture_output=True, text=True, cwd=ROOT,
                               env={"PYTHONPATH": str(ROOT), "PATH": ""})
        fresh = json.loads(child.stdout)

    s = first.stats
    n_bytes = s["bytes_train"] + s["bytes_val"]
    n_tokens = s["tokens_train"] + s["tokens_val"]
    print(f"python {platform.python_version()} ({sys.executable}); corpus {args.corpus!r}, max_bytes {args.max_bytes}")
    print(f"fingerprint            {fingerprint}  (cold {fp_cold * 1e3:.0f} ms, memoised {fp_warm * 1e3:.0f} ms)")
    print(f"documents train / val  {s['documents_train']} / {s['documents_val']}")
    print(f"bytes train / val      {s['bytes_train']:,} / {s['bytes_val']:,}  ({n_bytes / 1e6:.2f} MB)")
    print(f"tokens train / val     {s['tokens_train']:,} / {s['tokens_val']:,}  "
          f"({n_bytes / n_tokens:.2f} bytes/token, dtype {first.train.dtype})")
    print(f"vocab requested/actual {args.vocab} / {first.vocab_size}")
    print(f"tokenizer training     {s['tokenizer_seconds']:.2f} s   encoding {s['encode_seconds']:.2f} s")
    print(f"first prepare          {first_s:.2f} s  (cache_hit={first.stats['cache_hit']})")
    print(f"cached, same process   {cached_s * 1e3:.1f} ms  (cache_hit={cached.stats['cache_hit']}; "
          f"ratio first/cached {first_s / cached_s:.0f}x)")
    print(f"cached, fresh process  {fresh['prepare_s'] * 1e3:.1f} ms  (+ import {fresh['import_s'] * 1e3:.0f} ms; "
          f"cache_hit={fresh['cache_hit']}; ratio first/cached {first_s / fresh['prepare_s']:.0f}x)")


if __name__ == "__main__":
    main()
