"""Cost of the per-step table-read counting (engram.trial.TableUsage.record) against a default training step.

    PYTHONPATH=$PWD python -m benchmarks.bench_diagnostics [--slots 100000] [--steps 10]

Prints the median seconds of a default-size training step with Engram memory and of one `record` call on the
same batch, and their ratio (measured in one run, one thread).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engram.config import MemoryConfig, ModelConfig, TrainConfig
from engram.model import EngramMoE
from engram.trial import TableUsage, build_optimizers, train_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(memory=MemoryConfig(kind="engram", slots=args.slots))
    train = TrainConfig(steps=args.steps)
    model = EngramMoE(cfg)
    dense, sparse = build_optimizers(model, train)
    params = [p for p in model.parameters() if p.requires_grad]
    usage = TableUsage(model)
    step_s, record_s = [], []
    for _ in range(args.steps):
        batch = torch.randint(0, cfg.vocab_size, (train.batch_size, cfg.seq_len + 1))
        t0 = time.perf_counter()
        train_step(model, batch, dense, sparse, params, lr=train.lr, train=train)
        t1 = time.perf_counter()
        usage.record(batch[:, :-1])
        t2 = time.perf_counter()
        step_s.append(t1 - t0)
        record_s.append(t2 - t1)
    step, record = statistics.median(step_s), statistics.median(record_s)
    print(f"slots {args.slots}: train step {step * 1e3:.1f} ms, record {record * 1e3:.2f} ms, "
          f"ratio {record / step:.4f}")


if __name__ == "__main__":
    main()
