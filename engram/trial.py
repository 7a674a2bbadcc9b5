"""One training trial: `run_trial(TrialConfig) -> TrialResult`.

Holds the optimisers, the learning-rate schedule, the fixed validation set, divergence detection and
checkpoint/resume of one trial. Knows nothing of Ray or YAML; a launcher calls `run_trial` and receives typed
records (`Progress` at each evaluation, a `TrialResult` at the end).

Optimisation (docs/paper.md "Engram", item 7; Engram paper arXiv 2601.07372 §2):
- backbone: AdamW; weight decay on matrices only (ndim >= 2), NOT on norms, biases or embeddings (the token
  embedding, hence a tied LM head, and any other `nn.Embedding`), following nanoGPT / DeepSeek practice;
- memory tables (`model.table_parameters()`, sparse gradients): `torch.optim.SparseAdam` at
  `train.engram_lr_mult` x the base learning rate and no weight decay. SparseAdam is "lazy": only the rows
  touched in a step have their moments and values updated, so an update costs O(rows touched), not O(slots);
- one schedule for both: linear warmup, then cosine (or warmup-stable-decay) down to `min_lr_ratio` x lr;
- gradient clipping by the global norm over ALL gradients, sparse ones included (norm of coalesced values).

Precision (`train.precision`, `resolve_precision`): fp32, or bf16 mixed precision, the forward under
`torch.autocast(bfloat16)` with fp32 master weights, gradients, optimiser state (dense and sparse), loss and
softmax. Validation always runs in fp32 (`evaluate`), so losses compare across precisions.
Diagnostics (`TrialResult.diagnostics`, docs/fairness.md): reads per memory-table row and how far read rows moved
(`TableUsage`), the expert load of the last validation pass (`router_diagnostics`), the balance rate used.
OverEncoding tables train at the base learning rate (`table_lr_mult`).

Horizon: exactly one of train.steps / tokens / flops (`engram.config.horizon_steps`). Validation: the first
`train.eval_tokens` tokens of the validation split cut into non-overlapping windows, the same for every trial
of a corpus; on the mix corpus (engram.mixcorpus) the final evaluation also scores knowledge and computation
answer tokens separately (`evaluate_by_kind`). Train batches: random windows drawn by a generator seeded with
`train.seed`. On CPU a seed gives bitwise-identical losses; a checkpointed-and-resumed trial gives the same
losses as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from engram.accounting import ParamCounts, flops_per_token, param_counts
from engram.config import RESULTS_VERSION, TrainConfig, TrialConfig, config_hash, horizon_steps
from engram.data import prepare_data
from engram.memory import build_compression
from engram.mixcorpus import COMPUTATION, KNOWLEDGE
from engram.model import EngramMoE
from engram.moe import effective_balance_rate
from engram.util import atomic_write, cpuinfo, format_duration, format_si

STATE_FILE = "state.pt"
RESULT_FILE = "result.json"
# Train-loss points kept per curve (besides the evaluations): enough for a smooth plot, small in Parquet.
N_CURVE_POINTS = 100
KINDS_SCORED = (KNOWLEDGE, COMPUTATION)  # token kinds with their own final validation loss (evaluate_by_kind)


def keep_large_buffers_in_heap() -> bool:
    """Ask glibc to serve large buffers from the heap and keep them there; True if it took the settings.

    Why: by default glibc maps every buffer over its mmap threshold (the 32 MB logits of a default step, the
    expert activations) afresh and returns it on free, so each step pays page faults for them again. Raising
    the mmap and trim thresholds (as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ would) made the default
    step 14% faster (MFU 0.587 -> 0.667, benchmarks/bench_trial.py). Process-wide, so only a process that
    exists to train (a sweep's trial worker, `engram-sweep train`) calls it; elsewhere (not glibc) a no-op.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))


@dataclass(frozen=True)
class CurvePoint:
    step: int
    tokens: int
    train_loss: float  # mean training loss over the steps since the previous point
    val_loss: float | None  # None where no evaluation ran
    lr: float  # base learning rate at this step (the tables use engram_lr_mult x this)
    elapsed: float  # seconds of this trial so far, summed over resumes


@dataclass(frozen=True)
class Progress:
    """Reported at each evaluation (`on_progress`)."""

    step: int
    total_steps: int
    tokens: int
    train_loss: float
    val_loss: float | None
    lr: float
    elapsed: float


@dataclass(frozen=True)
class TrialResult:
    status: str  # "ok" | "diverged"  ("failed" is what a launcher records when run_trial raises)
    final_val_loss: float | None
    best_val_loss: float | None
    train_loss: float | None  # mean training loss over the last curve segment (the last ~1% of the steps)
    steps: int  # optimiser steps applied (a diverged trial: those before the non-finite one)
    tokens: int
    flops_per_token: float
    compute: float  # flops_per_token * tokens trained
    wall_seconds: float  # training loop incl. evaluation and checkpoints, summed over resumes
    tokens_per_second: float  # training tokens over the time spent in training steps only
    device: str
    precision: str  # "fp32" | "bf16": train.precision resolved on the trial's device
    counts: ParamCounts
    curve: tuple[CurvePoint, ...]
    error: str | None
    # What the trial's tables and routers went through (TableUsage.summary, router_diagnostics, the balance
    # rate); {} for results stored before them.
    diagnostics: dict[str, float | int | None] = dataclasses.field(default_factory=dict)
    # Final validation loss over the tokens of each kind (engram.mixcorpus answer spans); None for corpora
    # without token kinds, and for a kind the validation windows do not contain.
    final_val_loss_knowledge: float | None = None
    final_val_loss_computation: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able mapping (for transport between processes); inverse of `from_dict`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["counts"] = dataclasses.asdict(self.counts)
        out["curve"] = [dataclasses.asdict(p) for p in self.curve]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        fields = dict(data)
        fields["counts"] = ParamCounts(**fields["counts"])
        fields["curve"] = tuple(CurvePoint(**p) for p in fields["curve"])
        return cls(**fields)


def format_progress(p: Progress) -> str:
    """One line for a CLI: `step 120/400 (30%) | 245.8k tok | train 4.123 | val 4.456 | lr 2.70e-03 | 12s, eta 29s`."""
    val = "  -  " if p.val_loss is None else f"{p.val_loss:.3f}"
    eta = p.elapsed / p.step * (p.total_steps - p.step) if p.step else float("nan")
    return (f"step {p.step}/{p.total_steps} ({100 * p.step / max(p.total_steps, 1):.0f}%) | "
            f"{format_si(p.tokens)} tok | train {p.train_loss:.3f} | val {val} | lr {p.lr:.2e} | "
            f"{format_duration(p.elapsed)}, eta {format_duration(eta)}")


def lr_factor(train: TrainConfig, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate for (1-based) optimiser step `step` of `total_steps`."""
    if step <= train.warmup_steps:
        return step / train.warmup_steps
    floor = train.min_lr_ratio
    if train.schedule == "cosine":
        span = max(total_steps - train.warmup_steps, 1)
        progress = min((step - train.warmup_steps) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # WSD: constant after warmup, then a linear decay over the last decay_fraction of the steps.
    decay_start = total_steps - train.decay_fraction * total_steps
    if step <= decay_start:
        return 1.0
    progress = min((step - decay_start) / max(total_steps - decay_start, 1e-9), 1.0)
    return 1.0 - (1 - floor) * progress


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: 'cuda' requested but no CUDA device is available")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"fp32" or "bf16" for train.precision on `device`: "auto" is bf16 where the device multiplies bf16 natively
    (a CUDA device that supports it; a CPU with AVX512_BF16 or AMX), fp32 elsewhere. bf16 on a CPU without them
    still runs, emulated and slowly; on a CUDA device without bf16 it is refused."""
    if precision == "fp32":
        return "fp32"
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
    if precision == "bf16" and device.type == "cuda" and not native:
        raise ValueError(f"train.precision: 'bf16' requested but {_device_name(device)} does not support bf16")
    return "bf16" if precision == "bf16" or native else "fp32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512_BF16 or AMX-BF16; Linux's /proc/cpuinfo flags).

    Without them torch's bf16 matmuls are emulated, slower than fp32; with them a bf16 matmul ran at 4x the
    fp32 rate on this project's machine (benchmarks/bench_trial.py)."""
    return bool(set(cpuinfo().get("flags", "").split()) & {"avx512_bf16", "amx_bf16"})


# ---------------------------------------------------------------------------------------------------------------
# Optimisers


def build_optimizers(model: EngramMoE, train: TrainConfig) -> tuple[torch.optim.AdamW, torch.optim.SparseAdam | None]:
    """AdamW for the backbone (decay on matrices, not norms/biases/embeddings); SparseAdam for memory tables."""
    table_ids = {id(p) for p in model.table_parameters()}
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() deduplicates, so a tied head is seen once
        if not p.requires_grad or id(p) in table_ids:
            continue
        (decay if p.ndim >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all tensors, ~2.5x faster than foreach on CPU for our many small tensors.
    dense = torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr, betas=(train.beta1, train.beta2),
                              fused=True)
    tables = model.table_parameters()
    sparse = None
    if tables:
        mult = table_lr_mult(model.cfg.memory.kind, train)
        sparse = torch.optim.SparseAdam([{"params": tables, "lr_mult": mult}], lr=train.lr * mult,
                                        betas=(train.beta1, train.beta2))
    return dense, sparse


def table_lr_mult(kind: str, train: TrainConfig) -> float:
    """Learning-rate multiplier of the memory tables: Engram's `train.engram_lr_mult` (paper: 5); OverEncoding's
    tables train with the baseline's settings (arXiv 2501.16975): the base learning rate."""
    return train.engram_lr_mult if kind == "engram" else 1.0


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Global L2 norm of all gradients (sparse ones from their coalesced values); scale them down to max_norm.

    `torch.nn.utils.clip_grad_norm_` does not take sparse gradients; an uncoalesced sparse gradient repeats a row
    once per occurrence, so its values must be summed per row (coalesced) before taking the norm.
    """
    dense = [p for p in params if p.grad is not None and not p.grad.is_sparse]
    sparse = [p for p in params if p.grad is not None and p.grad.is_sparse]
    sq_norms = []
    if dense:
        sq_norms.append(torch.nn.utils.get_total_norm([p.grad for p in dense], foreach=True).float().square())
    for p in sparse:
        p.grad = p.grad.coalesce()
        sq_norms.append(p.grad._values().float().square().sum())
    if not sq_norms:
        return torch.zeros(())
    total = torch.stack(sq_norms).sum().sqrt()
    if max_norm is not None:
        if dense:
            torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total, foreach=True)
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # the same factor clip_grads_with_norm_ applies
        for p in sparse:
            p.grad._values().mul_(coef.to(p.grad.dtype))
    return total


# ---------------------------------------------------------------------------------------------------------------
# Data


def validation_windows(val_tokens: np.ndarray, seq_len: int, eval_tokens: int) -> torch.Tensor:
    """The fixed validation set: (n, seq_len + 1) non-overlapping windows spread evenly over the whole split.

    Spreading them matters: the first `eval_tokens` of the split cover only its first few documents, which scored
    0.36 nats easier than random windows of the same split at the end of a default-size trial (LOG.md).
    """
    n_windows = min(eval_tokens // seq_len, (len(val_tokens) - 1) // seq_len)
    if n_windows < 1:
        raise ValueError(f"data.val_fraction: the validation split has {len(val_tokens)} tokens, fewer than "
                         f"seq_len + 1 = {seq_len + 1}")
    # Evenly spaced starts; the spacing is at least seq_len because n_windows * seq_len <= len - 1.
    starts = np.linspace(0, len(val_tokens) - seq_len - 1, n_windows).round().astype(np.int64)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(np.asarray(val_tokens[idx], dtype=np.int64))


def sample_batch(train_tokens: np.ndarray, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """(batch_size, seq_len + 1) random windows of the train split, drawn with `gen`."""
    n_starts = len(train_tokens) - seq_len
    if n_starts < 1:
        raise ValueError(f"data: the train split has {len(train_tokens)} tokens, fewer than seq_len + 1")
    starts = torch.randint(0, n_starts, (batch_size,), generator=gen).numpy()
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(np.asarray(train_tokens[idx], dtype=np.int64))


def train_step(model: EngramMoE, batch_BT: torch.Tensor, dense_opt: torch.optim.Optimizer,
               sparse_opt: torch.optim.Optimizer | None, params: list[nn.Parameter], *, lr: float,
               train: TrainConfig, precision: str | None = None) -> tuple[float, float]:
    """One optimiser step on `batch_BT` (B, T + 1) at base learning rate `lr`: (training loss, gradient norm).

    `precision` ("fp32" | "bf16"; None: train.precision resolved for the batch's device): under bf16 the forward
    runs in `torch.autocast(bfloat16)` (engram.model: which parts stay fp32); parameters, gradients, optimiser
    state and the loss stay fp32 either way.
    A non-finite loss or gradient norm is returned WITHOUT updating the weights (the trial ends as diverged).
    """
    if precision is None:
        precision = resolve_precision(train.precision, batch_BT.device)
    with _autocast(batch_BT.device, precision):
        _, loss = model(batch_BT[:, :-1], batch_BT[:, 1:])
    loss_value = float(loss.detach())  # the language-model loss; a balance loss (model.balance_aux) only trains
    aux = model.balance_loss()
    if not math.isfinite(loss_value):
        return loss_value, float("nan")
    (loss if aux is None else loss + aux).backward()
    grad_norm = float(clip_grad_norm(params, train.grad_clip))
    if not math.isfinite(grad_norm):
        return loss_value, grad_norm
    for group in dense_opt.param_groups:
        group["lr"] = lr
    dense_opt.step()
    dense_opt.zero_grad(set_to_none=True)
    if sparse_opt is not None:
        for group in sparse_opt.param_groups:
            group["lr"] = lr * group["lr_mult"]
        sparse_opt.step()
        sparse_opt.zero_grad(set_to_none=True)
    model.update_router_biases()  # after the step: this step's training-token counts steer the next selection
    return loss_value, grad_norm


@torch.no_grad()
def evaluate(model: EngramMoE, windows_NT: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token cross-entropy over the fixed validation windows (every window has seq_len targets).

    Always in fp32, whatever the training precision: the weights are fp32 either way, so the validation loss is
    the same function of them in every trial, and trials trained in bf16 and fp32 stay comparable.
    """
    was_training = model.training
    model.eval()  # eval mode: the MoE gathers balancing counts in training only
    total = 0.0
    for i in range(0, len(windows_NT), batch_size):
        batch_BT = windows_NT[i:i + batch_size].to(device)
        _, loss = model(batch_BT[:, :-1], batch_BT[:, 1:])
        total += float(loss) * len(batch_BT)
    model.train(was_training)
    return total / len(windows_NT)


@torch.no_grad()
def evaluate_by_kind(model: EngramMoE, windows_NT: torch.Tensor, kinds_NT: torch.Tensor, batch_size: int,
                     device: torch.device) -> tuple[float, dict[int, float | None]]:
    """The mean validation loss (as `evaluate`) and the mean over the targets of each kind in `KINDS_SCORED`.

    `kinds_NT` holds the kind of each window token (the same windows over the kind array); target t + 1 of a
    window is scored with its kind. One pass: the logits are scored per token here instead of by the model's
    fused mean, so only corpora with kinds (the mix corpus) pay for it, once per trial, at the final evaluation.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(KINDS_SCORED) + 1, dtype=torch.float64)
    counts = torch.zeros(len(KINDS_SCORED) + 1, dtype=torch.float64)
    for i in range(0, len(windows_NT), batch_size):
        batch_BT = windows_NT[i:i + batch_size].to(device)
        logits_BTV, _ = model(batch_BT[:, :-1])  # fp32, as `evaluate`
        loss_BT = nn.functional.cross_entropy(logits_BTV.float().flatten(0, 1), batch_BT[:, 1:].flatten(),
                                              reduction="none").double().cpu().view(len(batch_BT), -1)
        kinds_BT = kinds_NT[i:i + batch_size, 1:]
        sums[0] += loss_BT.sum()
        counts[0] += loss_BT.numel()
        for j, kind in enumerate(KINDS_SCORED, 1):
            mask_BT = kinds_BT == kind
            sums[j] += loss_BT[mask_BT].sum()
            counts[j] += mask_BT.sum()
    model.train(was_training)
    by_kind = {kind: float(sums[j] / counts[j]) if counts[j] else None for j, kind in enumerate(KINDS_SCORED, 1)}
    return float(sums[0] / counts[0]), by_kind


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    assert precision == "fp32", precision
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# Diagnostics: did the tables train, did the routers balance (docs/fairness.md)


class TableUsage:
    """Reads of every memory-table row over the trial's training batches, and the tables' initial values.

    Off the hot path: per step, the batch's row indices are recomputed (hashing is a few integer ops per
    position) and added into a per-row counter with one index_add; measured at under 1% of a default step
    (benchmarks/bench_diagnostics.py, LOG.md issue 7). The initial values are copied when the model is built,
    before any checkpoint is loaded: init is seeded, so a resumed trial copies the same values. The counters
    travel in checkpoints (`state`).
    """

    def __init__(self, model: EngramMoE) -> None:
        self.modules = model.memory_modules()
        self.reads = [torch.zeros(m.tables.table.num_embeddings, dtype=torch.int64,
                                  device=m.tables.table.weight.device) for m in self.modules]
        self.init = [m.tables.table.weight.detach().to("cpu", copy=True) for m in self.modules]

    @torch.no_grad()
    def record(self, ids_BT: torch.Tensor) -> None:
        for module, reads in zip(self.modules, self.reads):
            idx = module.rows_read(ids_BT)
            reads.index_add_(0, idx, torch.ones_like(idx))

    def state(self) -> list[torch.Tensor]:
        return [r.cpu() for r in self.reads]

    def load_state(self, state: list[torch.Tensor]) -> None:
        assert len(state) == len(self.reads)
        for reads, saved in zip(self.reads, state):
            reads.copy_(saved)

    @torch.no_grad()
    def summary(self) -> dict[str, float | None]:
        """rows_read_share: rows read at least once / all rows; lookups_median, lookups_p10: median and 10th
        percentile of reads per row read; table_update_rms: mean over read rows of the RMS of (now - init);
        table_init_rms: the same rows' mean RMS at init (the scale the update is to be read against)."""
        if not self.modules:
            return dict.fromkeys(("rows_read_share", "lookups_median", "lookups_p10", "table_update_rms",
                                  "table_init_rms"))
        reads, update, init = [], [], []
        for module, n_reads, w0 in zip(self.modules, self.reads, self.init):
            n_reads = n_reads.cpu()
            read = n_reads > 0
            w = module.tables.table.weight.detach().cpu().float()
            update.append((w[read] - w0[read]).square().mean(dim=1).sqrt())
            init.append(w0[read].float().square().mean(dim=1).sqrt())
            reads.append(n_reads)
        all_reads = torch.cat(reads).numpy()
        read_counts = all_reads[all_reads > 0]
        upd, ini = torch.cat(update), torch.cat(init)
        return {
            "rows_read_share": float(len(read_counts) / len(all_reads)),
            "lookups_median": float(np.median(read_counts)) if len(read_counts) else None,
            "lookups_p10": float(np.percentile(read_counts, 10)) if len(read_counts) else None,
            "table_update_rms": float(upd.mean()) if len(upd) else None,
            "table_init_rms": float(ini.mean()) if len(ini) else None,
        }


def set_balance_rate(model: EngramMoE, total_steps: int) -> float:
    """Give every MoE layer the per-step bias rate that follows the trial's length; returns it."""
    rate = effective_balance_rate(model.cfg.balance_rate, model.cfg.balance_travel, total_steps)
    for moe in model.moe_layers():
        moe.balance_rate = rate
    return rate


# The trained-on expert load is counted over this share of a trial's last steps (at least one step).
TRAINED_LOAD_TAIL = 0.1


def trained_load_tail_steps(total_steps: int) -> int:
    return max(1, math.ceil(TRAINED_LOAD_TAIL * total_steps))


def router_diagnostics_empty() -> dict[str, None]:
    return {"expert_load_max": None, "expert_load_min": None, "experts_starved": None,
            "expert_train_load_max": None, "expert_train_load_min": None}


def router_diagnostics(model: EngramMoE) -> dict[str, float | int | None]:
    """Expert load, worst MoE layer, two ways (docs/fairness.md, "Two loads"):
    - of the last evaluation (validation windows under the final router and bias): expert_load_max /
      expert_load_min (max / mean and min / mean), experts_starved (below STARVED_LOAD x mean, summed over layers);
    - of the training tokens over the trial's last TRAINED_LOAD_TAIL of steps, under the bias as it moved: what
      the experts trained on (expert_train_load_max / expert_train_load_min).
    None where the model has no MoE layer, or no evaluation followed the last step (the first three)."""
    out: dict[str, float | int | None] = router_diagnostics_empty()
    stats = [s for s in (moe.load_stats() for moe in model.moe_layers()) if s is not None]
    if stats:
        out.update(expert_load_max=max(s[0] for s in stats), expert_load_min=min(s[1] for s in stats),
                   experts_starved=sum(s[2] for s in stats))
    trained = [s for s in (moe.trained_load_stats() for moe in model.moe_layers()) if s is not None]
    if trained:
        out.update(expert_train_load_max=max(s[0] for s in trained), expert_train_load_min=min(s[1] for s in trained))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The trial


def run_trial(config: TrialConfig, *, cache_dir: Path | None = None, checkpoint_dir: Path | None = None,
              on_progress: Callable[[Progress], None] | None = None,
              on_checkpoint: Callable[[Path], None] | None = None) -> TrialResult:
    """Train one model to its horizon and return its validation losses, curve and costs.

    With `checkpoint_dir`, resume from the state saved there (if any), save state atomically every
    train.checkpoint_interval steps and at the end (then call `on_checkpoint(checkpoint_dir)`); a trial whose
    saved state is complete returns its stored result without training.
    """
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    key = config_hash(config, f"v{RESULTS_VERSION}")
    if checkpoint_dir is not None and (checkpoint_dir / RESULT_FILE).exists():
        stored = json.loads((checkpoint_dir / RESULT_FILE).read_text())
        _check_key(stored, key, checkpoint_dir / RESULT_FILE)
        return TrialResult.from_dict(stored["result"])

    # The trial owns the global RNG while it runs (model init, anything in the model drawing from it); fork so
    # that the caller's RNG state is left as it was.
    device = resolve_device(config.train.device)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        return _Trial(config, device, key, cache_dir, checkpoint_dir, on_progress, on_checkpoint).run()


class _Trial:
    """The mutable state of one running trial (model, optimisers, generator, curve); `run` trains it."""

    def __init__(self, config: TrialConfig, device: torch.device, key: str, cache_dir: Path | None,
                 checkpoint_dir: Path | None, on_progress: Callable[[Progress], None] | None,
                 on_checkpoint: Callable[[Path], None] | None) -> None:
        self.config, self.device, self.key = config, device, key
        self.checkpoint_dir, self.on_progress, self.on_checkpoint = checkpoint_dir, on_progress, on_checkpoint
        mcfg, tcfg = config.model, config.train

        data = prepare_data(config.data, mcfg.vocab_size, cache_dir, seq_len=mcfg.seq_len)
        if data.vocab_size > mcfg.vocab_size:
            raise ValueError(f"model.vocab_size: {mcfg.vocab_size} is smaller than the data's vocabulary "
                             f"({data.vocab_size})")
        self.train_tokens = data.train
        self.val_windows_NT = validation_windows(data.val, mcfg.seq_len, tcfg.eval_tokens)
        # Per-kind losses (mix corpus): the same windows over the kind array, scored at the final evaluation.
        self.val_kinds_NT = None if data.val_kinds is None else \
            validation_windows(data.val_kinds, mcfg.seq_len, tcfg.eval_tokens)
        self.kind_losses: dict[int, float | None] = {}

        torch.manual_seed(tcfg.seed)
        compression = None
        if data.token_texts:
            compression = torch.as_tensor(build_compression(data.token_texts))
        self.model = EngramMoE(mcfg, compression).to(device)
        self.precision = resolve_precision(tcfg.precision, device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.usage = TableUsage(self.model)  # before any checkpoint is loaded: copies the initial tables
        self.dense_opt, self.sparse_opt = build_optimizers(self.model, tcfg)
        self.gen = torch.Generator().manual_seed(tcfg.seed)

        self.counts = param_counts(mcfg)
        self.fpt = flops_per_token(mcfg)
        self.tokens_per_step = tcfg.batch_size * mcfg.seq_len
        self.total_steps = horizon_steps(tcfg, self.fpt, mcfg.seq_len)
        self.balance_rate = set_balance_rate(self.model, self.total_steps)
        self.trained_load_from = self.total_steps - trained_load_tail_steps(self.total_steps)  # count after this step
        self.log_every = max(1, math.ceil(self.total_steps / N_CURVE_POINTS))

        self.step = 0  # optimiser steps completed
        self.curve: list[CurvePoint] = []
        self.loss_sum, self.loss_n = 0.0, 0  # training losses since the last curve point
        self.best_val: float | None = None
        self.elapsed = 0.0  # seconds in previous runs of this trial (resumes)
        self.train_seconds = 0.0  # seconds in training steps only
        if checkpoint_dir is not None:
            # Temporary files of a save that was killed before its rename: never read, only in the way.
            for stale in [*checkpoint_dir.glob(f".{STATE_FILE}.*"), *checkpoint_dir.glob(f".{RESULT_FILE}.*")]:
                stale.unlink(missing_ok=True)
            if (checkpoint_dir / STATE_FILE).exists():
                self._load(checkpoint_dir / STATE_FILE)

    # -- training ---------------------------------------------------------------------------------------------

    def run(self) -> TrialResult:
        tcfg, seq_len = self.config.train, self.config.model.seq_len
        self.model.train()
        t_start, elapsed_before = time.perf_counter(), self.elapsed
        while self.step < self.total_steps:
            step = self.step + 1
            lr = tcfg.lr * lr_factor(tcfg, step, self.total_steps)
            t_step = time.perf_counter()
            batch_BT = sample_batch(self.train_tokens, tcfg.batch_size, seq_len, self.gen)
            loss, grad_norm = train_step(self.model, batch_BT.to(self.device), self.dense_opt, self.sparse_opt,
                                         self.params, lr=lr, train=tcfg, precision=self.precision)
            self.elapsed = elapsed_before + time.perf_counter() - t_start
            if not math.isfinite(loss):
                return self._finish("diverged", f"non-finite loss at step {step}")
            if not math.isfinite(grad_norm):
                return self._finish("diverged", f"non-finite gradient norm at step {step}")
            self.usage.record(batch_BT[:, :-1].to(self.device))
            if step == self.trained_load_from:
                for moe in self.model.moe_layers():
                    moe.reset_trained_counts()
            self.step = step
            self.loss_sum += loss
            self.loss_n += 1
            self.train_seconds += time.perf_counter() - t_step

            is_last = step == self.total_steps
            do_eval = is_last or (tcfg.eval_interval is not None and step % tcfg.eval_interval == 0)
            if do_eval or step % self.log_every == 0:
                if do_eval and is_last and self.val_kinds_NT is not None:
                    val, self.kind_losses = evaluate_by_kind(self.model, self.val_windows_NT, self.val_kinds_NT,
                                                             tcfg.batch_size, self.device)
                else:
                    val = evaluate(self.model, self.val_windows_NT, tcfg.batch_size, self.device) if do_eval else None
                if val is not None and not math.isfinite(val):
                    return self._finish("diverged", f"non-finite validation loss at step {step}")
                self.elapsed = elapsed_before + time.perf_counter() - t_start
                point = CurvePoint(step, step * self.tokens_per_step, self.loss_sum / self.loss_n, val, lr,
                                   self.elapsed)
                self.curve.append(point)
                self.loss_sum, self.loss_n = 0.0, 0
                if val is not None:
                    self.best_val = val if self.best_val is None else min(self.best_val, val)
                    if self.on_progress is not None:
                        self.on_progress(Progress(step, self.total_steps, point.tokens, point.train_loss, val, lr,
                                                  self.elapsed))
            if (self.checkpoint_dir is not None and not is_last and tcfg.checkpoint_interval is not None
                    and step % tcfg.checkpoint_interval == 0):
                self._save()
        return self._finish("ok", None)

    def _finish(self, status: str, error: str | None) -> TrialResult:
        tokens = self.step * self.tokens_per_step
        final_val = self.curve[-1].val_loss if status == "ok" else None
        last_train = self.curve[-1].train_loss if self.curve else None
        if status == "ok":
            assert final_val is not None and self.curve[-1].step == self.step
        result = TrialResult(
            status=status, final_val_loss=final_val, best_val_loss=self.best_val, train_loss=last_train,
            steps=self.step, tokens=tokens, flops_per_token=self.fpt, compute=self.fpt * tokens,
            wall_seconds=self.elapsed, tokens_per_second=tokens / self.train_seconds if self.train_seconds else 0.0,
            device=_device_name(self.device), precision=self.precision, counts=self.counts, curve=tuple(self.curve),
            error=error, diagnostics=self._diagnostics(status),
            final_val_loss_knowledge=self.kind_losses.get(KNOWLEDGE) if status == "ok" else None,
            final_val_loss_computation=self.kind_losses.get(COMPUTATION) if status == "ok" else None)
        if self.checkpoint_dir is not None:
            if status == "ok":  # final weights stay next to the result; a diverged state is of no use
                self._save(notify=False)
            atomic_write(self.checkpoint_dir / RESULT_FILE,
                         json.dumps({"key": self.key, "result": result.to_dict()}).encode())
            if self.on_checkpoint is not None:
                self.on_checkpoint(self.checkpoint_dir)
        return result

    def _diagnostics(self, status: str) -> dict[str, float | int | None]:
        router = router_diagnostics(self.model) if status == "ok" else router_diagnostics_empty()
        rate = self.balance_rate if self.model.moe_layers() else None
        return {**self.usage.summary(), **router, "balance_rate": rate}

    # -- checkpoints ------------------------------------------------------------------------------------------

    def _save(self, notify: bool = True) -> None:
        assert self.checkpoint_dir is not None
        state = {
            "key": self.key, "step": self.step, "model": self.model.state_dict(),
            "dense_opt": self.dense_opt.state_dict(),
            "sparse_opt": self.sparse_opt.state_dict() if self.sparse_opt is not None else None,
            "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "curve": [dataclasses.asdict(p) for p in self.curve], "loss_sum": self.loss_sum, "loss_n": self.loss_n,
            "best_val": self.best_val, "elapsed": self.elapsed, "train_seconds": self.train_seconds,
            "table_reads": self.usage.state(),
            "trained_counts": [moe.trained_counts.cpu() for moe in self.model.moe_layers()],
        }
        atomic_write(self.checkpoint_dir / STATE_FILE, lambda f: torch.save(state, f))
        if notify and self.on_checkpoint is not None:
            self.on_checkpoint(self.checkpoint_dir)

    def _load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        _check_key(state, self.key, path)
        self.model.load_state_dict(state["model"])
        self.dense_opt.load_state_dict(state["dense_opt"])
        if self.sparse_opt is not None:
            self.sparse_opt.load_state_dict(state["sparse_opt"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step = state["step"]
        self.curve = [CurvePoint(**p) for p in state["curve"]]
        self.loss_sum, self.loss_n = state["loss_sum"], state["loss_n"]
        self.best_val, self.elapsed, self.train_seconds = state["best_val"], state["elapsed"], state["train_seconds"]
        self.usage.load_state(state["table_reads"])
        for moe, counts in zip(self.model.moe_layers(), state.get("trained_counts", [])):
            moe.trained_counts.copy_(counts)


def _check_key(state: dict[str, Any], key: str, path: Path) -> None:
    if state.get("key") != key:
        raise ValueError(f"checkpoint_dir: {path} belongs to another trial config (key {state.get('key')!r}, "
                         f"expected {key!r})")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return "cpu"
