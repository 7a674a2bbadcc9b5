"""Trial diagnostics (issue 7): table reads and updates, router load, recorded by a real tiny trial; the report's
diagnostics section and the none / Engram / OverEncoding figure from a small store."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.contract import RECORDED_DIAGNOSTICS, RUN_SCHEMA
from analysis.diagnostics import BALANCED_MAX_LOAD, STARVED_SHARE, TRAINED_LOOKUPS_PER_ROW, diagnostics_table
from analysis.report import write_report
from engram.config import DataConfig, MemoryConfig, ModelConfig, TrainConfig, TrialConfig
from engram.memory_layout import memory_primes
from engram.model import EngramMoE
from engram.moe import STARVED_LOAD, MoE
from engram.trial import run_trial, trained_load_tail_steps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKEN = 7
SEQ_LEN, BATCH, STEPS = 16, 4, 6
MEMORY = MemoryConfig(kind="engram", slots=4096, layers=(1,), max_ngram=3, n_heads=2, d_head=8)
MODEL = ModelConfig(vocab_size=64, seq_len=SEQ_LEN, d_model=32, n_layers=2, n_heads=2, n_dense_layers=1,
                    d_ff_dense=64, d_expert=16, n_routed=4, top_k=2, memory=MEMORY)


@pytest.fixture(scope="module")
def constant_corpus(tmp_path_factory) -> DataConfig:
    """Every token is TOKEN: each position reads a known set of n-grams."""
    path = tmp_path_factory.mktemp("corpus") / "tokens.npy"
    np.save(path, np.full(40_000, TOKEN, dtype=np.uint16))
    return DataConfig(corpus=str(path), format="tokens", max_bytes=None)


def test_table_reads_follow_a_known_lookup_pattern(constant_corpus, tmp_path):
    train = TrainConfig(steps=STEPS, batch_size=BATCH, lr=1e-2, warmup_steps=1, eval_interval=None,
                        eval_tokens=256, checkpoint_interval=None, device="cpu")
    result = run_trial(TrialConfig(model=MODEL, data=constant_corpus, train=train), cache_dir=tmp_path)
    d = result.diagnostics
    # With one token everywhere, order 2 reads (pad, x) at t = 0 and (x, x) after; order 3 reads (pad, pad, x),
    # (pad, x, x) and (x, x, x): per head of order 2 two rows, of order 3 three; 2 heads per order.
    model = EngramMoE(MODEL)
    hashed = model.blocks[1].engram.hasher(torch.full((1, SEQ_LEN), TOKEN))[0]  # (T, H)
    distinct = sum(len(set(hashed[:, h].tolist())) for h in range(hashed.shape[1]))
    assert distinct == 2 * 2 + 2 * 3  # no collision in this layout (else the counts below would merge)
    per_batch = BATCH * STEPS
    reads = sorted([per_batch] * 6 + [per_batch * (SEQ_LEN - 1)] * 2 + [per_batch * (SEQ_LEN - 2)] * 2)
    assert d["rows_read_share"] == pytest.approx(distinct / sum(memory_primes(MEMORY)))
    assert d["lookups_median"] == float(np.median(reads)) == per_batch
    assert d["lookups_p10"] == pytest.approx(np.percentile(reads, 10))
    # Read rows moved (the tables train), and are read against their N(0, 1) init scale.
    assert 0 < d["table_update_rms"] < d["table_init_rms"]
    assert d["table_init_rms"] == pytest.approx(1.0, abs=0.5)
    # Router load of the final validation pass: consistent bounds, experts counted.
    assert d["expert_load_max"] >= 1.0 >= d["expert_load_min"] >= 0.0
    assert 0 <= d["experts_starved"] <= MODEL.n_routed * MODEL.n_moe_layers
    # Every diagnostic the trial records is a stored column (balance_rate, the effective bias step, stays in the
    # trial result only).
    assert set(d) - {"balance_rate"} == set(RECORDED_DIAGNOSTICS) <= set(RUN_SCHEMA.names)
    assert STARVED_SHARE == STARVED_LOAD  # analysis's copy (no torch import there) of the trial's threshold


def test_diagnostics_survive_a_resume(constant_corpus, tmp_path):
    train = TrainConfig(steps=STEPS, batch_size=BATCH, lr=1e-2, warmup_steps=1, eval_interval=3,
                        eval_tokens=256, checkpoint_interval=3, device="cpu")
    config = TrialConfig(model=MODEL, data=constant_corpus, train=train)
    whole = run_trial(config, cache_dir=tmp_path)

    class Stop(Exception):
        pass

    def stop_at_first_checkpoint(_path):
        raise Stop

    with pytest.raises(Stop):
        run_trial(config, cache_dir=tmp_path, checkpoint_dir=tmp_path / "ckpt", on_checkpoint=stop_at_first_checkpoint)
    resumed = run_trial(config, cache_dir=tmp_path, checkpoint_dir=tmp_path / "ckpt")
    assert resumed.diagnostics == pytest.approx(whole.diagnostics)


def test_trained_load_counts_the_last_steps_and_survives_a_resume(tmp_path, monkeypatch):
    """expert_train_load_* = max / min over mean of the training-token counts of the last 10% of the steps (worst
    layer), counted independently here from what each bias update saw; a resume inside that window keeps them."""
    steps = 20
    tail = trained_load_tail_steps(steps)
    assert tail == 2
    seen: list[tuple[int, torch.Tensor]] = []  # (layer, counts) per bias update, in order
    update = MoE.update_bias

    def recording_update(self):
        seen.append((id(self), self.counts.clone()))
        update(self)

    monkeypatch.setattr(MoE, "update_bias", recording_update)
    train = TrainConfig(steps=steps, batch_size=BATCH, lr=1e-2, warmup_steps=1, eval_interval=None,
                        eval_tokens=256, checkpoint_interval=None, device="cpu")
    mixed = DataConfig(corpus=str(_random_tokens(tmp_path)), format="tokens", max_bytes=None)
    config = TrialConfig(model=dataclasses.replace(MODEL, n_routed=8), data=mixed, train=train)
    d = run_trial(config, cache_dir=tmp_path).diagnostics
    layers = list(dict.fromkeys(layer for layer, _ in seen))
    per_layer = {layer: [c for l2, c in seen if l2 == layer] for layer in layers}
    assert all(len(c) == steps for c in per_layer.values())
    loads = [torch.stack(c[-tail:]).sum(0).double() for c in per_layer.values()]
    loads = [x / x.mean() for x in loads]
    assert d["expert_train_load_max"] == pytest.approx(max(float(x.max()) for x in loads))
    assert d["expert_train_load_min"] == pytest.approx(min(float(x.min()) for x in loads))
    assert d["expert_train_load_max"] > 1.0  # 8 experts, random tokens, two steps: never exactly even

    monkeypatch.setattr(MoE, "update_bias", update)
    whole = run_trial(config, cache_dir=tmp_path).diagnostics

    class Stop(Exception):
        pass

    def stop(_path):
        raise Stop

    inside = dataclasses.replace(config, train=dataclasses.replace(train, checkpoint_interval=steps - 1))
    with pytest.raises(Stop):  # the checkpoint of step 19, the first step of the window
        run_trial(inside, cache_dir=tmp_path, checkpoint_dir=tmp_path / "ckpt", on_checkpoint=stop)
    resumed = run_trial(inside, cache_dir=tmp_path, checkpoint_dir=tmp_path / "ckpt").diagnostics
    assert resumed["expert_train_load_max"] == pytest.approx(whole["expert_train_load_max"])
    assert resumed["expert_train_load_min"] == pytest.approx(whole["expert_train_load_min"])


def _random_tokens(tmp_path: Path) -> Path:
    path = tmp_path / "random.npy"
    np.save(path, np.random.default_rng(0).integers(0, 64, 40_000).astype(np.uint16))
    return path


def test_memory_free_trial_has_no_table_diagnostics(constant_corpus, tmp_path):
    train = TrainConfig(steps=2, batch_size=BATCH, warmup_steps=1, eval_interval=None, eval_tokens=256,
                        checkpoint_interval=None, device="cpu")
    model = dataclasses.replace(MODEL, memory=MemoryConfig())
    d = run_trial(TrialConfig(model=model, data=constant_corpus, train=train), cache_dir=tmp_path).diagnostics
    assert d["rows_read_share"] is None and d["lookups_median"] is None
    assert d["expert_load_max"] is not None


# ---------------------------------------------------------------------------------------------------------------
# Report


def _row(i: int, **kw) -> dict:
    base = {"trial_id": f"t{i:03d}", "sweep": "s", "experiment": "memory", "kind": "memory", "memory": "engram",
            "rho": np.nan, "slots": 0, "n_routed": 16, "seed": 0, "budget": 2e12, "P_tot": 1, "P_act": 1,
            "P_sparse": 0, "P_engram": 0, "tokens": 256_000, "compute": 2e12, "final_val_loss": 4.6,
            "status": "ok", "error": None}
    return {**base, **kw}


def test_report_flags_untrained_and_unbalanced_trials_and_draws_none_engram_oe(tmp_path):
    rows, i = [], 0
    for seed in (0, 1):
        rows.append(_row(i := i + 1, memory="none", seed=seed, final_val_loss=4.70 + 0.01 * seed,
                         expert_load_max=1.2, expert_load_min=0.8, experts_starved=0,
                         expert_train_load_max=1.1, expert_train_load_min=0.9))
        for kind, offset in (("engram", 0.0), ("overencoding", 0.05)):
            for slots, median in ((1e4, 300.0), (1e6, 3.0)):
                rows.append(_row(i := i + 1, memory=kind, slots=int(slots), seed=seed, table_params=int(slots * 16),
                                 final_val_loss=4.6 + offset, lookups_per_row=2e6 / slots, rows_read_share=0.5,
                                 lookups_median=median, lookups_p10=1.0, table_update_rms=0.1, table_init_rms=1.0,
                                 expert_load_max=1.3, expert_load_min=0.7, experts_starved=0))
    rows.append(_row(i := i + 1, experiment="allocation", kind="allocation", memory="none", rho=1.0,
                     expert_load_max=2.5, expert_load_min=0.05, experts_starved=1,
                     expert_train_load_max=1.6, expert_train_load_min=0.5))
    rows.append(_row(i := i + 1, experiment="allocation", kind="allocation", memory="none", rho=1.0, seed=1,
                     expert_load_max=1.7, expert_load_min=0.5, experts_starved=0,
                     expert_train_load_max=1.2, expert_train_load_min=0.05))
    runs = pd.DataFrame(rows)
    table = diagnostics_table(runs)
    assert list(table["untrained"]) == [r.get("lookups_median", np.inf) < TRAINED_LOOKUPS_PER_ROW for r in rows]
    assert list(table["unbalanced"]) == [r["expert_load_max"] > BALANCED_MAX_LOAD for r in rows]
    assert list(table["unbalanced_in_training"]) == [r.get("expert_train_load_max", 0) > BALANCED_MAX_LOAD
                                                     or r.get("expert_train_load_min", 1) < 0.1 for r in rows]
    root = tmp_path / "s"
    (root / "runs").mkdir(parents=True)
    for k in range(len(runs)):  # one file per trial, all with the same columns (as the store writes them)
        runs.iloc[[k]].to_parquet(root / "runs" / f"{runs['trial_id'].iloc[k]}.parquet")
    md = write_report(root, n_resamples=50).read_text()
    assert "Trial diagnostics" in md and "Memory: none, Engram and OverEncoding" in md
    assert "8 of 8 trials with tables untrained" not in md and "4 of 8 trials with tables untrained" in md
    assert "2 of 12 MoE trials unbalanced in the validation pass, 2 of 4 in training" in md
    assert md.count("unbalanced in training") >= 3
    assert (root / "report" / "plots" / "memory_comparison.png").is_file()
    assert md.count("untrained") >= 5 and "unbalanced" in md
