"""Model FLOPs utilisation of one training step (forward + backward + AdamW) on CPU, single thread.

MFU = flops_per_token(cfg) * tokens per second / FLOP/s of a large fp32 matmul measured in the same process and
thread, so the ratio does not depend on the machine's absolute speed (the target is >= 0.5 at the default trial
size: ModelConfig defaults, batch 16, seq_len 128). Times are this thread's CPU time (time.thread_time), so that
other processes competing for the cores inflate neither the step nor the matmul; with one torch thread all the
work runs on this thread. The wall-clock figure is printed too.

Cases: the default model, with Engram and with OverEncoding memory, with 83 routed experts, and the default and
83-expert models with the MoE's grouped-expert kernel replaced by a plain autograd loop over expert slices (what
the hand-written backward in engram.moe saves: little at 16 experts, ~30% of the step at 83, 5x at 256).
Last, the default model again after telling glibc malloc to keep freed memory (mallopt): by default every
(B*T, V) logits-sized buffer is a fresh mmap whose pages fault in on first touch, ~10% of a step. That setting is
process-wide, so it belongs to whoever starts the trial process (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
in its environment), not to the model.

    python -m benchmarks.bench_model [--steps 10] [--batch 16] [--threads 1]     (from the repository root)
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from engram.accounting import flops_per_token, param_counts
from engram.config import MemoryConfig, ModelConfig
from engram.model import EngramMoE
from engram.moe import MoE

MATMUL_N = 2048


def matmul_flops_per_second(n: int = MATMUL_N, repeats: int = 5) -> float:
    """Best of `repeats` (thread CPU time) for an n x n x n fp32 matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        a @ b
        best = min(best, time.thread_time() - t0)
    return 2 * n ** 3 / best


class AutogradLoopMoE(MoE):
    """Reference: the same routing, experts run by autograd on slices of the stacked weights."""

    def forward(self, x_BTD: Tensor) -> Tensor:
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        expert_TK, weight_TK = self.route(x_TD)
        flat_expert_S = expert_TK.flatten()
        order_S = flat_expert_S.argsort(stable=True)
        token_S = order_S // self.top_k
        counts = torch.bincount(flat_expert_S, minlength=self.n_routed).tolist()
        outs = []
        for e, x_nD in enumerate(x_TD[token_S].split(counts)):
            if counts[e]:
                gate_nH, up_nH = F.linear(x_nD, self.w_in[e]).chunk(2, dim=1)
                outs.append(F.linear(F.silu(gate_nH) * up_nH, self.w_out[e]))
        y_SD = torch.cat(outs) * weight_TK.flatten()[order_S].unsqueeze(1)
        y_TD = torch.zeros_like(x_TD).index_add_(0, token_S, y_SD)
        return (y_TD + self.shared(x_TD)).view(x_BTD.shape)


class Stepper:
    """A model, its optimisers and one fixed batch; `step()` times one training step."""

    def __init__(self, cfg: ModelConfig, batch: int, *, loop_moe: bool = False):
        torch.manual_seed(0)
        self.cfg = cfg
        self.model = EngramMoE(cfg)
        if loop_moe:
            for moe in self.model.moe_layers():
                moe.__class__ = AutogradLoopMoE
        tables = {id(p) for p in self.model.table_parameters()}
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if id(p) not in tables], lr=1e-3,
                                     foreach=True)
        self.sparse = torch.optim.SparseAdam(self.model.table_parameters(), lr=1e-3) if tables else None
        self.idx_BT = torch.randint(cfg.vocab_size, (batch, cfg.seq_len))
        self.tgt_BT = torch.randint(cfg.vocab_size, (batch, cfg.seq_len))
        self.cpu_times: list[float] = []
        self.wall_times: list[float] = []

    def step(self, record: bool = True) -> None:
        t0, w0 = time.thread_time(), time.perf_counter()
        _, loss = self.model(self.idx_BT, self.tgt_BT)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.sparse is not None:
            self.sparse.step()
            self.sparse.zero_grad(set_to_none=True)
        self.model.update_router_biases()
        if record:
            self.cpu_times.append(time.thread_time() - t0)
            self.wall_times.append(time.perf_counter() - w0)

    def medians(self) -> tuple[float, float]:
        return statistics.median(self.cpu_times), statistics.median(self.wall_times)


def glibc_mallopt():
    """glibc's mallopt, or None where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return None


def keep_freed_memory(mallopt) -> None:
    """Serve large allocations from the heap and never trim it (as MALLOC_MMAP_THRESHOLD_=1GiB,
    MALLOC_TRIM_THRESHOLD_=2GiB, MALLOC_TOP_PAD_=256MiB in the environment would)."""
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # malloc.h
    for opt, value in ((m_mmap_threshold, 1 << 30), (m_trim_threshold, 1 << 31), (m_top_pad, 1 << 28)):
        assert mallopt(opt, value) == 1, f"mallopt({opt}, {value}) failed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    peak = matmul_flops_per_second()
    print(f"fp32 matmul {MATMUL_N}^3, {args.threads} thread(s): {peak / 1e9:.1f} GFLOP/s")
    base = ModelConfig()
    cases = {
        "default (memory none)": base,
        "engram, 1e5 slots": dataclasses.replace(base, memory=MemoryConfig(kind="engram", slots=100_000)),
        "overencoding, 1e5 slots": dataclasses.replace(base, memory=MemoryConfig(kind="overencoding",
                                                                                 slots=100_000)),
        # The rho = 1 model at P_tot / P_act = 10 on this backbone (accounting.p_tot_for_ratio) has 83 experts.
        "83 routed experts": dataclasses.replace(base, n_routed=83),
        "default, autograd expert loop": base,
        "83 routed, autograd loop": dataclasses.replace(base, n_routed=83),
    }
    print(f"batch {args.batch} x seq {base.seq_len}, median of {args.steps} steps, cases interleaved step by step")
    steppers = {name: Stepper(cfg, args.batch, loop_moe="loop" in name) for name, cfg in cases.items()}
    for st in steppers.values():
        st.step(record=False)  # warm-up
    for _ in range(args.steps):
        for st in steppers.values():
            st.step()
    mallopt = glibc_mallopt()
    if mallopt is not None:  # last, and not interleaved: the setting cannot be undone
        keep_freed_memory(mallopt)
        steppers["default, mallopt"] = st = Stepper(base, args.batch)
        for i in range(args.steps + 1):
            st.step(record=i > 0)
    for name, st in steppers.items():
        sec, wall = st.medians()
        tokens = args.batch * st.cfg.seq_len
        achieved = flops_per_token(st.cfg) * tokens / sec
        print(f"{name:29s} P_act {param_counts(st.cfg).p_act / 1e6:6.3f}M  {sec * 1e3:6.1f} ms/step CPU "
              f"({wall * 1e3:6.1f} wall)  {tokens / sec / 1e3:5.1f}k tok/s  {achieved / 1e9:6.1f} GFLOP/s  "
              f"MFU {achieved / peak:.2f}")
    peak_after = matmul_flops_per_second()
    print(f"fp32 matmul again: {peak_after / 1e9:.1f} GFLOP/s ({peak_after / peak - 1:+.1%} from the first)")


if __name__ == "__main__":
    main()
