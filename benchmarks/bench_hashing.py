"""Throughput of Engram's n-gram hashing (compression lookup, all orders and heads) on CPU, single thread.

Prints hashing tokens/s at the default trial batch (16 x 128) and its share of one full training step of the
default model with Engram memory (forward + backward + AdamW + SparseAdam), both measured in the same process
so the share does not depend on the machine's speed (the goal is < 5%). Also times the table lookup and the
whole Engram module, and, with --tokenizer, the compression ratio V'/V of the default data's BPE tokenizer
(prepares the default data set on first use: about a minute).

    python -m benchmarks.bench_hashing [--batch 16] [--seq 128] [--slots 100000] [--repeats 50] [--tokenizer]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from engram.config import DataConfig, MemoryConfig, ModelConfig
from engram.memory import Engram, build_compression, compression_ratio


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def train_step_seconds(cfg: ModelConfig, compression: torch.Tensor, batch: int, repeats: int) -> float:
    from engram.model import EngramMoE  # only the step comparison needs the backbone

    torch.manual_seed(0)
    model = EngramMoE(cfg, compression)
    tables = {id(p) for p in model.table_parameters()}
    dense = torch.optim.AdamW([p for p in model.parameters() if id(p) not in tables], lr=1e-3, foreach=True)
    sparse = torch.optim.SparseAdam(model.table_parameters(), lr=5e-3)
    idx_BT = torch.randint(cfg.vocab_size, (batch, cfg.seq_len))
    tgt_BT = torch.randint(cfg.vocab_size, (batch, cfg.seq_len))

    def step() -> None:
        _, loss = model(idx_BT, tgt_BT)
        loss.backward()
        dense.step()
        sparse.step()
        dense.zero_grad(set_to_none=True)
        sparse.zero_grad(set_to_none=True)
        model.update_router_biases()

    return median_seconds(step, max(5, repeats // 5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=ModelConfig().seq_len)
    parser.add_argument("--slots", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokenizer", action="store_true", help="also measure the default tokenizer's compression")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_cfg = ModelConfig(seq_len=args.seq, memory=MemoryConfig(kind="engram", slots=args.slots))
    mem = model_cfg.memory
    # A surjection like a real tokenizer's: ~23% of ids merged into others (the paper's figure).
    rng = np.random.default_rng(0)
    compression = torch.as_tensor(rng.integers(0, int(0.77 * model_cfg.vocab_size), model_cfg.vocab_size))
    engram = Engram(mem, model_cfg.d_model, mem.layers[0], compression)
    ids_BT = torch.randint(model_cfg.vocab_size, (args.batch, args.seq))
    h_BTD = torch.randn(args.batch, args.seq, model_cfg.d_model)
    n_tokens = args.batch * args.seq
    n_tables = (mem.max_ngram - 1) * mem.n_heads

    with torch.no_grad():
        t_hash = median_seconds(lambda: engram.hasher(ids_BT), args.repeats)
        t_lookup = median_seconds(lambda: engram.lookup(ids_BT), args.repeats)

    def engram_fwd_bwd() -> None:
        engram(h_BTD, ids_BT).sum().backward()
        engram.zero_grad(set_to_none=True)

    t_engram = median_seconds(engram_fwd_bwd, args.repeats)
    t_step = train_step_seconds(model_cfg, compression, args.batch, args.repeats)

    print(f"threads {torch.get_num_threads()}, batch {args.batch} x {args.seq} = {n_tokens} tokens, "
          f"{n_tables} tables per Engram layer (orders 2..{mem.max_ngram} x {mem.n_heads} heads), "
          f"slots {args.slots}, d_model {model_cfg.d_model}")
    print(f"hashing (compression + all orders and heads): {t_hash * 1e3:8.3f} ms/batch  "
          f"{n_tokens / t_hash / 1e6:8.2f} M tokens/s")
    print(f"hashing + table lookup:                       {t_lookup * 1e3:8.3f} ms/batch  "
          f"{n_tokens / t_lookup / 1e6:8.2f} M tokens/s")
    print(f"one Engram layer forward + backward:          {t_engram * 1e3:8.3f} ms/batch")
    n_layers = len(mem.layers)
    print(f"training step, default model + Engram:        {t_step * 1e3:8.3f} ms/batch")
    print(f"hashing share of a training step:             {n_layers * t_hash / t_step:8.2%}  "
          f"({n_layers} Engram layer(s); goal < 5%)")
    print(f"Engram layer (fwd + bwd) share of the step:   {n_layers * t_engram / t_step:8.2%}")

    if args.tokenizer:
        from engram.data import prepare_data

        data = prepare_data(DataConfig(), model_cfg.vocab_size)
        mapping = build_compression(data.token_texts)
        ratio = compression_ratio(mapping)
        print(f"tokenizer compression (default data, vocab {len(mapping)}): V'/V = {ratio:.4f}, "
              f"a {1 - ratio:.1%} reduction (paper: 23% on a 128k vocabulary)")


if __name__ == "__main__":
    main()
