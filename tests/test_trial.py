"""Tests of one training trial (engram/trial.py) with the real model, data and optimisers on tiny sizes."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engram.accounting import flops_per_token
from engram.config import DataConfig, MemoryConfig, ModelConfig, TrainConfig, TrialConfig, horizon_steps
from engram.model import EngramMoE
from engram.trial import (
    RESULT_FILE,
    STATE_FILE,
    Progress,
    TrialResult,
    build_optimizers,
    clip_grad_norm,
    cpu_has_native_bf16,
    format_progress,
    lr_factor,
    resolve_precision,
    run_trial,
    sample_batch,
    train_step,
    validation_windows,
)

VOCAB = 512
SEQ_LEN = 32
BATCH = 8
MEMORY = MemoryConfig(kind="engram", slots=4096, layers=(1,), max_ngram=3, n_heads=2, d_head=8)
MODEL = ModelConfig(vocab_size=VOCAB, seq_len=SEQ_LEN, d_model=32, n_layers=2, n_heads=2, n_dense_layers=1,
                    d_ff_dense=64, d_expert=16, n_routed=4, top_k=2, memory=MEMORY)
DATA = DataConfig(corpus="stdlib", max_bytes=2_000_000)
TRAIN = TrainConfig(steps=20, batch_size=BATCH, lr=3e-3, warmup_steps=4, eval_interval=4, eval_tokens=1024,
                    checkpoint_interval=5, device="cpu")


def trial(**train: object) -> TrialConfig:
    return TrialConfig(model=MODEL, data=DATA, train=dataclasses.replace(TRAIN, **train))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def losses(result: TrialResult) -> list[tuple[int, float, float | None]]:
    return [(p.step, p.train_loss, p.val_loss) for p in result.curve]


class Interrupt(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------------
# A whole trial


@pytest.mark.slow
def test_tiny_trial_learns_well_below_uniform(cache_dir: Path) -> None:
    config = trial(steps=400, eval_interval=200, warmup_steps=10, lr=1e-2)
    seen: list[Progress] = []
    result = run_trial(config, cache_dir=cache_dir, on_progress=seen.append)
    assert result.status == "ok" and result.error is None
    assert result.steps == 400 and result.tokens == 400 * BATCH * SEQ_LEN
    assert result.compute == pytest.approx(result.flops_per_token * result.tokens)
    assert result.final_val_loss is not None and result.final_val_loss < math.log(VOCAB) - 1.25
    assert result.best_val_loss is not None and result.best_val_loss <= result.final_val_loss
    assert [p.step for p in seen] == [200, 400]
    assert result.curve[-1].val_loss == result.final_val_loss
    assert result.curve[0].train_loss > result.curve[-1].train_loss + 1.0
    assert result.counts.total == sum(p.numel() for p in EngramMoE(MODEL).parameters())


@pytest.mark.slow
def test_same_seed_gives_bitwise_same_losses_and_another_seed_differs(cache_dir: Path) -> None:
    a = run_trial(trial(steps=8), cache_dir=cache_dir)
    b = run_trial(trial(steps=8), cache_dir=cache_dir)
    c = run_trial(trial(steps=8, seed=1), cache_dir=cache_dir)
    assert losses(a) == losses(b)
    assert losses(a) != losses(c)


@pytest.mark.parametrize("kind", ["none", "overencoding"])
def test_other_memory_kinds_train(cache_dir: Path, kind: str) -> None:
    memory = MemoryConfig() if kind == "none" else dataclasses.replace(MEMORY, kind=kind)
    config = TrialConfig(model=dataclasses.replace(MODEL, memory=memory), data=DATA, train=TRAIN)
    result = run_trial(config, cache_dir=cache_dir)
    assert result.status == "ok" and result.final_val_loss is not None
    assert result.final_val_loss < math.log(VOCAB)
    assert (result.counts.engram_tables > 0) == (kind == "overencoding")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_trial_runs_under_bf16_autocast(cache_dir: Path) -> None:
    result = run_trial(trial(steps=20, device="auto"), cache_dir=cache_dir)
    assert result.status == "ok" and result.device.startswith("cuda")
    assert result.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert result.final_val_loss is not None and result.final_val_loss < math.log(VOCAB)


# ---------------------------------------------------------------------------------------------------------------
# Data windows


def test_validation_windows_spread_over_the_split_without_overlap() -> None:
    val = np.arange(1000, dtype=np.uint16)
    windows_NT = validation_windows(val, seq_len=8, eval_tokens=100)
    assert windows_NT.shape == (12, 9) and windows_NT.dtype == torch.int64
    starts = windows_NT[:, 0]
    assert int(starts[0]) == 0 and int(windows_NT[-1, -1]) == 999  # first and last tokens of the split
    assert bool((starts.diff() >= 8).all())  # no target is predicted twice
    assert torch.equal(windows_NT - starts[:, None], torch.arange(9).expand(12, 9))  # contiguous windows
    assert torch.equal(validation_windows(val, 8, 10_000), validation_windows(val, 8, 10_000))
    assert validation_windows(val, 8, 10_000).shape[0] == 999 // 8
    with pytest.raises(ValueError, match="val_fraction"):
        validation_windows(val[:8], 8, 100)


def test_train_batches_are_seeded_random_windows() -> None:
    tokens = np.arange(10_000, dtype=np.uint16)
    a = sample_batch(tokens, 4, 16, torch.Generator().manual_seed(0))
    b = sample_batch(tokens, 4, 16, torch.Generator().manual_seed(0))
    c = sample_batch(tokens, 4, 16, torch.Generator().manual_seed(1))
    assert a.shape == (4, 17) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a - a[:, :1], torch.arange(17).expand(4, 17))  # contiguous windows
    assert int(a.max()) < len(tokens)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint / resume


@pytest.mark.slow
def test_resume_after_interrupted_progress_equals_uninterrupted_run(cache_dir: Path, tmp_path: Path) -> None:
    config = trial(steps=20, eval_interval=4, checkpoint_interval=5)
    straight = run_trial(config, cache_dir=cache_dir)

    def stop_at_12(p: Progress) -> None:  # last checkpoint before the interrupt is at step 10
        if p.step == 12:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_trial(config, cache_dir=cache_dir, checkpoint_dir=tmp_path, on_progress=stop_at_12)
    assert (tmp_path / STATE_FILE).exists()
    after: list[int] = []
    resumed = run_trial(config, cache_dir=cache_dir, checkpoint_dir=tmp_path,
                        on_progress=lambda p: after.append(p.step))
    assert after == [12, 16, 20]  # resumed from step 10: steps 11.. were trained again
    assert losses(resumed) == losses(straight)
    assert resumed.final_val_loss == straight.final_val_loss and resumed.steps == straight.steps


@pytest.mark.slow
def test_resume_after_interrupted_checkpoint_callback_equals_uninterrupted_run(cache_dir: Path,
                                                                               tmp_path: Path) -> None:
    config = trial(steps=12, eval_interval=3, checkpoint_interval=4)
    straight = run_trial(config, cache_dir=cache_dir)
    saved: list[Path] = []

    def stop_at_second(path: Path) -> None:
        saved.append(path)
        if len(saved) == 2:  # the state at step 8 is on disk; die before training on
            raise Interrupt

    with pytest.raises(Interrupt):
        run_trial(config, cache_dir=cache_dir, checkpoint_dir=tmp_path, on_checkpoint=stop_at_second)
    after: list[int] = []
    resumed = run_trial(config, cache_dir=cache_dir, checkpoint_dir=tmp_path,
                        on_progress=lambda p: after.append(p.step))
    assert after == [9, 12]
    assert losses(resumed) == losses(straight)


def test_complete_trial_returns_stored_result_without_training(cache_dir: Path, tmp_path: Path) -> None:
    config = trial(steps=6)
    called: list[Path] = []
    first = run_trial(config, cache_dir=cache_dir, checkpoint_dir=tmp_path, on_checkpoint=called.append)
    assert called[-1] == tmp_path  # the final save is announced
    state_mtime = (tmp_path / STATE_FILE).stat().st_mtime_ns
    seen: list[object] = []
    again = run_trial(config, cache_dir=cache_dir, checkpoint_dir=tmp_path, on_progress=seen.append,
                      on_checkpoint=seen.append)
    assert seen == []
    assert again == first
    assert (tmp_path / STATE_FILE).stat().st_mtime_ns == state_mtime


def test_temporary_files_of_a_killed_save_are_removed(cache_dir: Path, tmp_path: Path) -> None:
    (tmp_path / f".{STATE_FILE}.x1y2").write_bytes(b"half a checkpoint")
    result = run_trial(trial(steps=3), cache_dir=cache_dir, checkpoint_dir=tmp_path)
    assert result.status == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([RESULT_FILE, STATE_FILE])


def test_checkpoint_of_another_config_is_refused(cache_dir: Path, tmp_path: Path) -> None:
    run_trial(trial(steps=5, checkpoint_interval=5), cache_dir=cache_dir, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        run_trial(trial(steps=5, seed=3), cache_dir=cache_dir, checkpoint_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Horizon, schedule, divergence


def test_horizon_in_steps_tokens_and_flops() -> None:
    fpt = flops_per_token(MODEL)
    per_step = BATCH * SEQ_LEN
    assert horizon_steps(dataclasses.replace(TRAIN, steps=7), fpt, SEQ_LEN) == 7
    tokens = TrainConfig(tokens=int(6.4 * per_step), batch_size=BATCH)
    assert horizon_steps(tokens, fpt, SEQ_LEN) == 6
    flops = TrainConfig(flops=fpt * per_step * 9.2, batch_size=BATCH)
    assert horizon_steps(flops, fpt, SEQ_LEN) == 9
    tiny = TrainConfig(flops=1.0, batch_size=BATCH)
    assert horizon_steps(tiny, fpt, SEQ_LEN) == 1


def test_flops_horizon_sets_the_trained_steps(cache_dir: Path) -> None:
    fpt = flops_per_token(MODEL)
    config = TrialConfig(model=MODEL, data=DATA, train=dataclasses.replace(
        TRAIN, steps=None, flops=fpt * BATCH * SEQ_LEN * 5, eval_interval=None))
    result = run_trial(config, cache_dir=cache_dir)
    assert result.steps == 5
    assert result.compute == pytest.approx(fpt * 5 * BATCH * SEQ_LEN)
    assert [p.val_loss is not None for p in result.curve] == [False] * (len(result.curve) - 1) + [True]


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_schedule_warms_up_peaks_and_ends_at_min_ratio(schedule: str) -> None:
    train = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule=schedule, decay_fraction=0.2)
    factors = [lr_factor(train, s, 100) for s in range(1, 101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(factors[9:], factors[10:]))  # never rises after warmup
    if schedule == "wsd":
        assert factors[79] == pytest.approx(1.0) and factors[85] < 1.0


def test_huge_learning_rate_ends_as_diverged_with_the_curve_so_far(cache_dir: Path) -> None:
    result = run_trial(trial(steps=200, lr=1e4, warmup_steps=0, grad_clip=None, eval_interval=2),
                       cache_dir=cache_dir)
    assert result.status == "diverged"
    assert result.error is not None and "non-finite" in result.error
    assert result.steps < 200 and result.final_val_loss is None
    assert result.tokens == result.steps * BATCH * SEQ_LEN
    assert all(p.step <= result.steps for p in result.curve)


# ---------------------------------------------------------------------------------------------------------------
# Optimisers


def test_tables_get_lazy_sparse_updates_and_no_weight_decay() -> None:
    torch.manual_seed(0)
    model = EngramMoE(MODEL)
    train = TrainConfig(steps=1, lr=1e-2, weight_decay=0.1)
    dense, sparse = build_optimizers(model, train)
    tables = model.table_parameters()
    assert tables and sparse is not None
    table_ids = {id(t) for t in tables}
    assert not any(id(p) in table_ids for g in dense.param_groups for p in g["params"])
    decayed = {id(p) for g in dense.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for m in model.modules():
        if isinstance(m, (nn.Embedding,)) or "Norm" in type(m).__name__:
            assert not any(id(p) in decayed for p in m.parameters(recurse=False))
    assert all(p.ndim >= 2 for g in dense.param_groups if g["weight_decay"] > 0 for p in g["params"])

    before = [t.detach().clone() for t in tables]
    ids_BT = torch.randint(0, VOCAB, (2, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))
    _, loss = model(ids_BT[:, :-1], ids_BT[:, 1:])
    loss.backward()
    assert all(t.grad is not None and t.grad.is_sparse for t in tables)
    clip_grad_norm([p for p in model.parameters()], 1.0)
    sparse.step()
    for table, old in zip(tables, before):
        touched = torch.zeros(table.shape[0], dtype=torch.bool)
        touched[table.grad._indices()[0]] = True
        assert 0 < touched.sum() < table.shape[0] // 4  # a few rows of a big table
        assert torch.equal(table.detach()[~touched], old[~touched])
        assert not torch.equal(table.detach()[touched], old[touched])
        state = sparse.state[table]
        assert torch.count_nonzero(state["exp_avg"][~touched]) == 0
        assert torch.count_nonzero(state["exp_avg_sq"][~touched]) == 0
        assert torch.count_nonzero(state["exp_avg_sq"][touched].abs().sum(-1)) == touched.sum()


def test_bf16_step_keeps_fp32_master_weights_and_state_and_agrees_with_fp32() -> None:
    train = TrainConfig(steps=1, lr=1e-2)
    ids_BT = torch.randint(0, VOCAB, (BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(3))
    runs = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = EngramMoE(MODEL)
        init = [p.detach().clone() for p in model.parameters()]
        dense, sparse = build_optimizers(model, train)
        params = list(model.parameters())
        losses = [train_step(model, ids_BT, dense, sparse, params, lr=train.lr, train=train, precision=precision)[0]
                  for _ in range(3)]
        assert all(p.dtype == torch.float32 for p in model.parameters())
        for opt in (dense, sparse):
            moments = [v for st in opt.state.values() for k, v in st.items() if k.startswith("exp_avg")]
            assert moments and all(v.dtype == torch.float32 for v in moments)
        table = model.table_parameters()[0]
        assert sparse.state[table]["exp_avg"].dtype == torch.float32
        runs[precision] = (losses, [p.detach() - p0 for p, p0 in zip(model.parameters(), init)])
    (loss32, upd32), (loss16, upd16) = runs["fp32"], runs["bf16"]
    assert loss16[0] == pytest.approx(loss32[0], abs=0.02)  # same weights, same batch
    assert loss16[-1] < loss16[0] and loss16[-1] == pytest.approx(loss32[-1], abs=0.05)
    flat32, flat16 = torch.cat([u.flatten() for u in upd32]), torch.cat([u.flatten() for u in upd16])
    assert torch.nn.functional.cosine_similarity(flat32, flat16, dim=0) > 0.95


def test_precision_resolves_per_device() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_native_bf16() else "fp32")
    if Path("/proc/cpuinfo").exists():
        flags = Path("/proc/cpuinfo").read_text()
        assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_bf16_trial_records_its_precision_and_validates_like_fp32(cache_dir: Path) -> None:
    fp32, bf16 = (run_trial(trial(steps=8, eval_interval=4, precision=p), cache_dir=cache_dir)
                  for p in ("fp32", "bf16"))
    assert fp32.precision == "fp32" and bf16.precision == "bf16" and bf16.status == "ok"
    # Validation is fp32 in both: the first evaluation (after 4 steps from the same init) differs only by what
    # 4 steps of bf16 arithmetic changed in the weights.
    assert bf16.curve[0].val_loss == pytest.approx(fp32.curve[0].val_loss, abs=0.05)


def test_clip_grad_norm_counts_repeated_sparse_rows_once_per_row() -> None:
    ids = torch.tensor([3, 3, 5, 3, 0])
    dense_emb, sparse_emb = nn.Embedding(8, 4), nn.Embedding(8, 4, sparse=True)
    sparse_emb.weight.data.copy_(dense_emb.weight.data)
    weights = torch.arange(20.0).reshape(5, 4)
    (dense_emb(ids) * weights).sum().backward()
    (sparse_emb(ids) * weights).sum().backward()
    dense_norm = clip_grad_norm([dense_emb.weight], None)
    sparse_norm = clip_grad_norm([sparse_emb.weight], 1.0)
    assert dense_norm == pytest.approx(float(dense_emb.weight.grad.norm()))
    assert sparse_norm == pytest.approx(float(dense_norm))
    assert float(sparse_emb.weight.grad.to_dense().norm()) == pytest.approx(1.0, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Transport and display


def test_result_round_trips_through_json(cache_dir: Path) -> None:
    result = run_trial(trial(steps=3), cache_dir=cache_dir)
    assert TrialResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_format_progress_is_one_line_with_the_figures() -> None:
    line = format_progress(Progress(step=120, total_steps=400, tokens=245_760, train_loss=4.1234, val_loss=None,
                                    lr=2.7e-3, elapsed=12.4))
    assert "\n" not in line
    assert "120/400" in line and "30%" in line and "4.123" in line and "246k" in line
    assert "4.456" in format_progress(Progress(1, 2, 3, 4.0, 4.456, 1e-3, 0.0))
    assert "eta 29s" in line and "eta 1m40s" in format_progress(Progress(100, 200, 1, 4.0, None, 1e-3, 100.0))


def test_trial_id_covers_config_data_and_results_version() -> None:
    from engram.config import RESULTS_VERSION, config_hash, trial_id

    config = TrialConfig(model=MODEL, data=DATA, train=TRAIN)
    assert trial_id(config, "data-a") == trial_id(TrialConfig(model=MODEL, data=DATA, train=TRAIN), "data-a")
    assert trial_id(config, "data-a") != trial_id(config, "data-b")
    # A new results version gives new ids: stored trials of older code are re-run, never mixed in.
    assert trial_id(config, "data-a") != config_hash(config, "data-a", f"v{RESULTS_VERSION - 1}")
    # The precision is part of the config, hence of the id.
    assert trial_id(config, "data-a") != trial_id(trial(precision="bf16"), "data-a")
    assert trial(precision="bf16").train.precision == "bf16" and TRAIN.precision == "auto"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_takes_the_large_buffer_settings() -> None:
    from engram.trial import keep_large_buffers_in_heap

    assert keep_large_buffers_in_heap() is True
