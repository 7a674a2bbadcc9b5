"""The built-in mix corpus (engram/mixcorpus.py, data.corpus: mix): deterministic generation, the requested
knowledge share, validation facts seen in training, fresh computation instances, token kinds, per-kind
validation losses stored per trial, the knowledge_share sweep axis and its report."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.report import analyse, analyse_knowledge_mix, draw_knowledge_mix, write_report
from engram import mixcorpus
from engram.config import (ConfigError, DataConfig, MemoryConfig, ModelConfig, TrainConfig, TrialConfig,
                           config_hash)
from engram.data import _split, corpus_fingerprint, prepare_data
from engram.model import EngramMoE
from engram.trial import evaluate, evaluate_by_kind, run_trial, validation_windows
from sweeps.cli import main
from sweeps.plan import plan_sweep
from sweeps.spec import SpecError, parse_spec
from sweeps.store import ResultStore, curve_frame, result_row
from sweeps.tiny import tiny_sweep

ROOT = Path(__file__).resolve().parents[1]
N_BYTES = 120_000  # 60 documents
MIX = DataConfig(corpus="mix", max_bytes=N_BYTES, mix_entities=200, val_fraction=0.2)
TINY_MODEL = tiny_sweep()["model"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _generate(cfg: DataConfig = MIX) -> tuple[list[mixcorpus.MixDocument], np.ndarray]:
    is_val = _split(mixcorpus.document_names(cfg.max_bytes), cfg)
    return mixcorpus.generate(cfg.knowledge_share, cfg.mix_entities, cfg.max_bytes, cfg.mix_seed, is_val), is_val


@pytest.fixture(scope="module")
def corpus():
    return _generate()


# ---------------------------------------------------------------------------------------------------------------
# The generator


def test_generator_is_deterministic_and_the_seed_matters() -> None:
    a, _ = _generate()
    b, _ = _generate()
    assert [d.text for d in a] == [d.text for d in b] and [d.spans for d in a] == [d.spans for d in b]
    c, _ = _generate(dataclasses.replace(MIX, mix_seed=1))
    assert [d.text for d in a] != [d.text for d in c]
    assert mixcorpus.entity_table(50, 0) == mixcorpus.entity_table(50, 0) != mixcorpus.entity_table(50, 1)
    assert corpus_fingerprint(MIX) == corpus_fingerprint(dataclasses.replace(MIX))
    assert corpus_fingerprint(MIX) != corpus_fingerprint(dataclasses.replace(MIX, knowledge_share=0.3))


@pytest.mark.parametrize("share", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_knowledge_share_is_the_requested_share_of_characters(share: float) -> None:
    docs, is_val = _generate(dataclasses.replace(MIX, knowledge_share=share))
    k = sum(d.knowledge_chars for d in docs)
    c = sum(d.computation_chars for d in docs)
    assert k + c == sum(len(d.text) for d in docs)
    assert abs(k / (k + c) - share) < 0.005
    # Each split, not only the whole corpus, holds the share (within a few paragraphs).
    val_k = sum(d.knowledge_chars for d, v in zip(docs, is_val) if v)
    val_all = sum(len(d.text) for d, v in zip(docs, is_val) if v)
    assert abs(val_k / val_all - share) < 0.02
    n_answers = [sum(1 for *_, kind in d.spans if kind == want) for d in docs
                 for want in (mixcorpus.KNOWLEDGE, mixcorpus.COMPUTATION)]
    assert (sum(n_answers[0::2]) == 0) == (share == 0) and (sum(n_answers[1::2]) == 0) == (share == 1)


def test_every_fact_in_validation_was_stated_in_training(corpus) -> None:
    docs, is_val = corpus
    entities = mixcorpus.entity_table(MIX.mix_entities, MIX.mix_seed)
    by_name = {e.name: e for e in entities}
    train_facts = set().union(*(d.facts for d, v in zip(docs, is_val) if not v))
    val_facts = set().union(*(d.facts for d, v in zip(docs, is_val) if v))
    assert val_facts and val_facts <= train_facts
    # From the text itself: every knowledge answer in validation is the true value of an attribute of the
    # entity its sentence names, and that (entity, attribute) fact occurs in a training document.
    name_pattern = re.compile("|".join(re.escape(n) for n in sorted(by_name, key=len, reverse=True)))
    train_text = "\n".join(d.text for d, v in zip(docs, is_val) if not v)
    n_checked = 0
    for doc in (d for d, v in zip(docs, is_val) if v):
        for start, end, kind in doc.spans:
            if kind != mixcorpus.KNOWLEDGE:
                continue
            sentence_start = max(doc.text.rfind(". ", 0, start), doc.text.rfind("\n", 0, start)) + 1
            entity = by_name[name_pattern.search(doc.text, sentence_start, start).group()]
            value = doc.text[start:end]
            attrs = [a for a in mixcorpus.ATTRIBUTES if getattr(entity, a) == value]
            assert attrs, (entity.name, value)
            index = entities.index(entity)
            assert any((index, a) in train_facts for a in attrs)
            assert entity.name in train_text and value in train_text
            n_checked += 1
    assert n_checked > 20


def test_computation_instances_are_fresh_and_never_repeat_between_splits(corpus) -> None:
    docs, is_val = corpus
    train_keys = [k for d, v in zip(docs, is_val) if not v for k in d.instances]
    val_keys = [k for d, v in zip(docs, is_val) if v for k in d.instances]
    assert len(val_keys) > 20
    assert not set(train_keys) & set(val_keys)
    assert len(set(train_keys)) == len(train_keys)
    # The paragraphs themselves: no validation computation paragraph occurs in training.
    def paragraphs(ds):
        return {p for d in ds for p in d.text.split("\n\n") if p.startswith(("Add:", "Close:", "set "))}
    assert not paragraphs(d for d, v in zip(docs, is_val) if v) & paragraphs(d for d, v in zip(docs, is_val) if not v)


def test_computation_answers_follow_their_rule(corpus) -> None:
    docs, _ = corpus
    closers = dict(mixcorpus.BRACKETS)
    n = 0
    for doc in docs[:10]:
        for para in doc.text.split("\n\n"):
            if para.startswith("Add:"):
                a, b, c = map(int, re.fullmatch(r"Add: (\d+) \+ (\d+) = (\d+)\.", para).groups())
                assert a + b == c
            elif para.startswith("Close:"):
                opened, closed = para[len("Close: "):].split(" ->")
                stack = []
                for ch in opened.split():
                    if ch in closers:
                        stack.append(closers[ch])
                    else:
                        assert stack.pop() == ch
                assert closed.split() == stack[::-1] and len(stack) >= 2
            elif para.startswith("set "):
                *sets, get = para.split("\n")
                values = dict(re.fullmatch(r"set (\w+) = (\d+)", s).groups() for s in sets)
                name, value = re.fullmatch(r"get (\w+) = (\d+)", get).groups()
                assert values[name] == value
            else:
                continue
            n += 1
    assert n > 20


def test_token_kinds_mark_tokens_that_overlap_answer_spans() -> None:
    spans = ((5, 9, mixcorpus.KNOWLEDGE), (20, 22, mixcorpus.COMPUTATION))
    offsets = [(0, 4), (4, 6), (6, 9), (9, 12), (12, 20), (19, 21), (21, 22), (22, 24)]
    assert mixcorpus.token_kinds(offsets, spans).tolist() == [0, 1, 1, 0, 0, 2, 2, 0]


def test_prepared_mix_data_carries_the_kind_of_every_validation_token(tmp_path: Path) -> None:
    data = prepare_data(MIX, 512, tmp_path)
    assert data.val_kinds is not None and len(data.val_kinds) == len(data.val)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(data.stats["tokenizer_path"])
    ids, kinds = np.asarray(data.val), np.asarray(data.val_kinds)
    computation = tok.decode(ids[kinds == mixcorpus.COMPUTATION].tolist())
    assert set(computation) <= set("0123456789 )]}>")
    knowledge = {t.strip() for t in tok.decode_batch([[i] for i in ids[kinds == mixcorpus.KNOWLEDGE]])}
    context = {t.strip() for t in tok.decode_batch([[i] for i in ids[kinds == mixcorpus.CONTEXT]])}
    assert "born" in context and "born" not in knowledge and "=" not in knowledge
    assert 0.02 < (kinds == mixcorpus.KNOWLEDGE).mean() < 0.3
    assert data.stats["knowledge_share_achieved"] == pytest.approx(0.5, abs=0.005)
    assert prepare_data(MIX, 512, tmp_path).stats["cache_hit"]
    stdlib = prepare_data(DataConfig(corpus="stdlib", max_bytes=200_000), 512, tmp_path)
    assert stdlib.val_kinds is None


def test_config_rejects_bad_mix_fields_and_keeps_other_corpora_trial_ids() -> None:
    for field, value in (("knowledge_share", 1.5), ("mix_entities", 1), ("mix_seed", -1)):
        with pytest.raises(ConfigError, match=f"^{field}:"):
            DataConfig(corpus="mix", **{field: value})
    with pytest.raises(ConfigError, match="^max_bytes:"):
        DataConfig(corpus="mix", max_bytes=None)
    # The mix fields leave every other corpus's trial ids alone, and do enter the mix corpus's.
    for other in (DataConfig(), DataConfig(corpus="/x/y", max_bytes=None)):
        changed = dataclasses.replace(other, knowledge_share=0.1, mix_entities=50, mix_seed=3)
        assert config_hash(TrialConfig(data=other), "fp") == config_hash(TrialConfig(data=changed), "fp")
    mix = TrialConfig(data=DataConfig(corpus="mix"))
    assert config_hash(mix, "fp") != config_hash(dataclasses.replace(mix, data=DataConfig(corpus="mix",
                                                                                          knowledge_share=0.1)), "fp")


# ---------------------------------------------------------------------------------------------------------------
# Per-kind validation loss


def test_evaluate_by_kind_total_matches_evaluate_and_splits_by_kind(tmp_path: Path) -> None:
    data = prepare_data(MIX, 512, tmp_path)
    cfg = ModelConfig(**{**TINY_MODEL, "memory": MemoryConfig(kind="engram", slots=4096, n_heads=2, d_head=8)})
    torch.manual_seed(0)
    model = EngramMoE(cfg)
    windows = validation_windows(data.val, 32, 2048)
    kinds = validation_windows(data.val_kinds, 32, 2048)
    total, by_kind = evaluate_by_kind(model, windows, kinds, 8, torch.device("cpu"))
    assert total == pytest.approx(evaluate(model, windows, 8, torch.device("cpu")), rel=1e-5)
    # Hand computation of the knowledge loss from the logits.
    with torch.no_grad():
        logits = model(windows[:, :-1])[0]
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="none")
    mask = kinds[:, 1:].flatten() == mixcorpus.KNOWLEDGE
    assert by_kind[mixcorpus.KNOWLEDGE] == pytest.approx(float(losses[mask].mean()), rel=1e-5)
    assert by_kind[mixcorpus.COMPUTATION] != pytest.approx(by_kind[mixcorpus.KNOWLEDGE], rel=1e-3)


def _tiny_spec(tmp_path: Path, **experiment) -> dict:
    return {"name": "mix", "results_dir": str(tmp_path / "results"),
            "data": {"corpus": "mix", "max_bytes": N_BYTES, "mix_entities": 200, "val_fraction": 0.2},
            "model": TINY_MODEL,
            "train": {"batch_size": 4, "warmup_steps": 2, "eval_interval": None, "eval_tokens": 1024,
                      "device": "cpu"},
            "experiments": [{"name": "alloc", "kind": "allocation", "p_tot_ratio": 3, "rho": [0.0, 0.5, 1.0],
                             "budgets": [1e8], "seeds": [0], **experiment}]}


def test_per_kind_losses_of_a_tiny_trial_are_stored(tmp_path: Path) -> None:
    spec = parse_spec(_tiny_spec(tmp_path, knowledge_share=[0.2, 0.8]), base_dir=tmp_path)
    trials = plan_sweep(spec)
    assert sorted({t.knowledge_share for t in trials}) == [0.2, 0.8]  # the shares the spec asks
    assert {t.config.data.knowledge_share for t in trials} == {0.2, 0.8}
    trial = trials[0]
    result = run_trial(trial.config, cache_dir=tmp_path / "cache")
    assert result.status == "ok"
    for value in (result.final_val_loss_knowledge, result.final_val_loss_computation):
        assert value is not None and math.isfinite(value) and value > 0
    store = ResultStore(spec.store_dir)
    store.write_trial(result_row(trial, result, error=None, attempts=1, started_at="t0", finished_at="t1"),
                      curve_frame(result))
    row = store.runs().iloc[0]
    assert row["knowledge_share"] == trial.knowledge_share
    assert row["final_val_loss_knowledge"] == pytest.approx(result.final_val_loss_knowledge)
    assert row["final_val_loss_computation"] == pytest.approx(result.final_val_loss_computation)
    assert row["final_val_loss"] == pytest.approx(result.final_val_loss)


def test_other_corpora_store_no_kind_losses(tmp_path: Path) -> None:
    raw = _tiny_spec(tmp_path)
    raw["data"] = {"corpus": "stdlib", "max_bytes": 300_000, "val_fraction": 0.2}
    spec = parse_spec(raw, base_dir=tmp_path)
    trial = plan_sweep(spec)[0]
    assert trial.knowledge_share is None
    result = run_trial(trial.config, cache_dir=tmp_path / "cache")
    assert result.final_val_loss_knowledge is None and result.final_val_loss_computation is None
    row = result_row(trial, result, error=None, attempts=1, started_at="t0", finished_at="t1")
    assert row["knowledge_share"] is None and row["final_val_loss_knowledge"] is None


# ---------------------------------------------------------------------------------------------------------------
# The sweep axis


def test_knowledge_share_axis_needs_the_mix_corpus_and_valid_shares(tmp_path: Path) -> None:
    raw = _tiny_spec(tmp_path, knowledge_share=[0.1, 0.9])
    raw["data"] = {"corpus": "stdlib"}
    with pytest.raises(SpecError, match=r"^experiments\[0\]\.knowledge_share: .*'mix'"):
        parse_spec(raw, base_dir=tmp_path)
    for shares, where in (([0.1, 1.2], r"knowledge_share\[1\]"), ([0.5, 0.5], r"knowledge_share\[1\]"),
                          (0.5, "knowledge_share")):
        with pytest.raises(SpecError, match=rf"^experiments\[0\]\.{where}"):
            parse_spec(_tiny_spec(tmp_path, knowledge_share=shares), base_dir=tmp_path)
    spec = parse_spec(_tiny_spec(tmp_path), base_dir=tmp_path)  # no axis: the data's share, one per trial
    assert {t.knowledge_share for t in plan_sweep(spec)} == {0.5}


def test_example_spec_passes_plan(capsys) -> None:
    assert main(["plan", str(ROOT / "examples" / "knowledge-mix.yaml")]) == 0
    out = capsys.readouterr().out
    assert "15 grid trials" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("knowledge-mix ")]
    assert sorted({r[1] for r in rows}) == ["0.1", "0.5", "0.9"] and len(rows) == 15


def test_report_fits_one_u_curve_per_share_and_recovers_planted_optima(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    planted = {0.1: 0.8, 0.9: 0.3}  # rho* per share
    rows = []
    for share, rho_star in planted.items():
        for rho in np.linspace(0, 1, 6):
            for seed in (0, 1):
                loss = 3.0 + 0.5 * (rho - rho_star) ** 2 + rng.normal(0, 0.003)
                rows.append({"trial_id": f"{share}-{rho}-{seed}", "experiment": "mix", "kind": "allocation",
                             "memory": "engram",
                             "status": "ok", "rho": rho, "rho_achieved": rho, "seed": seed, "budget": 1e12,
                             "knowledge_share": share, "final_val_loss": loss,
                             "final_val_loss_knowledge": loss + 1 - share * (1 - rho),
                             "final_val_loss_computation": loss + 0.5})
    runs = pd.DataFrame(rows)
    result = analyse(runs, n_resamples=100)
    assert result.u_curves == {}  # the axis is fitted per share, never as one U-curve over mixed corpora
    mix = result.mix
    assert mix is not None and [o.share for o in mix.optima] == [0.1, 0.9]
    for o in mix.optima:
        assert o.fit.verdict == "interior" and o.fit.rho_star.value == pytest.approx(planted[o.share], abs=0.05)
    gains = mix.kind_gains.set_index(["share", "kind"])["gain"]
    assert gains[(0.9, "knowledge")] > gains[(0.1, "knowledge")] > 0
    figures = draw_knowledge_mix(mix, tmp_path)
    assert {"mix_rho_star", "mix_kind_losses_mix"} <= set(figures) and all(p.is_file() for p in figures.values())
    (tmp_path / "store" / "runs").mkdir(parents=True)
    runs.to_parquet(tmp_path / "store" / "runs" / "all.parquet")
    md = write_report(tmp_path / "store", n_resamples=50).read_text()
    assert "Knowledge mix: rho* against the knowledge share" in md and "mix_rho_star.png" in md
    doc = json.loads((tmp_path / "store" / "report" / "fits.json").read_text())
    assert [u["knowledge_share"] for u in doc["knowledge_mix"]["u_curves"]] == [0.1, 0.9]
    # A corpus without kinds: no mix section.
    assert analyse_knowledge_mix(runs.drop(columns=["knowledge_share"])) is None
