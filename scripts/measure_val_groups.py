"""Validation loss of the default sweep's trials by document group: the stdlib split's codec tables and the rest.

    PYTHONPATH=$PWD nice -n 19 python -m scripts.measure_val_groups CASE [CASE ...]

A CASE is `allocation:rho=R,seed=S` or `memory:KIND[=SLOTS],seed=S` (KIND engram, overencoding or none) over the
trials sweep.yaml plans. Each case retrains its trial (engram.trial.run_trial, one thread, deterministic on one
machine) and prints one JSON line: the trial's final validation loss, and its final model's mean loss over the
validation windows that start in a codec table (`encodings/*.py`: generated 256-entry tables; 34% of D14's
windows, split by document count, against ~11% of its training characters, LOG.md V1; 14% of D15's, split by
folders) and over the other windows, with their counts. The windows are the trial's own
(engram.trial.validation_windows); a window belongs to the document it starts in.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

import engram.trial
from engram.data import prepare_data
from engram.trial import evaluate, keep_large_buffers_in_heap, run_trial, validation_windows
from sweeps.plan import Throughput, plan_sweep
from sweeps.spec import load_spec

CODEC_PREFIX = "encodings/"


def val_document_names(data_cfg) -> list[str] | None:
    """The validation documents' names in split order (stdlib and text corpora; None for a corpus without named
    documents, e.g. a token file)."""
    from engram import data as D
    try:
        src = D._resolve(data_cfg)
        docs, _ = D._documents(data_cfg, src)
    except (D.DataError, OSError):
        return None
    is_val = D._split([n for n, _ in docs], data_cfg, [len(t) for _, t in docs])
    return [n for (n, _), v in zip(docs, is_val) if v]


def codec_windows(config, data, n_windows: int) -> np.ndarray | None:
    """Per validation window of the trial (engram.trial.validation_windows over `data`, the prepared data of
    `config`), whether it starts in a codec table; None without named documents or an end-of-text id."""
    names = val_document_names(config.data)
    if names is None or data.eot_id is None:
        return None
    val = np.asarray(data.val)
    starts = np.linspace(0, len(val) - config.model.seq_len - 1, n_windows).round().astype(np.int64)
    doc_of = np.cumsum(val == data.eot_id)  # documents are joined with eot_id: the count before a position
    return np.array([names[min(doc_of[s], len(names) - 1)].startswith(CODEC_PREFIX) for s in starts])


def sweep_trials() -> list:
    """sweep.yaml's planned trials, with this process set for retraining them as a sweep does: one torch thread,
    large buffers kept in the heap."""
    torch.set_num_threads(1)
    keep_large_buffers_in_heap()
    return plan_sweep(load_spec("sweep.yaml"), throughput=Throughput(1e9, 0, "-"))


def select(trials, case: str):
    experiment, _, rest = case.partition(":")
    kw = dict(item.split("=", 1) if "=" in item else (item, "") for item in rest.split(",") if item)
    seed = int(kw.pop("seed", 0))
    for t in trials:
        if t.experiment != experiment or t.seed != seed:
            continue
        if "rho" in kw and t.rho is not None and abs(t.rho - float(kw["rho"])) < 1e-9:
            return t
        for kind in ("engram", "overencoding", "none"):
            if kind in kw and t.memory == kind and (kind == "none" or t.slots == int(kw[kind])):
                return t
    raise SystemExit(f"measure_val_groups: no trial matches {case!r} in sweep.yaml")


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    trials = sweep_trials()
    captured: dict = {}
    set_rate = engram.trial.set_balance_rate

    def capture(model, total_steps):  # every trial passes its model here once, before training
        captured["model"] = model
        return set_rate(model, total_steps)

    engram.trial.set_balance_rate = capture
    for case in argv:
        trial = select(trials, case)
        t0 = time.perf_counter()
        result = run_trial(trial.config)
        config = trial.config
        data = prepare_data(config.data, config.model.vocab_size, None, seq_len=config.model.seq_len)
        windows_NT = validation_windows(data.val, config.model.seq_len, config.train.eval_tokens)
        codec = codec_windows(config, data, len(windows_NT))
        if codec is None:
            raise SystemExit("measure_val_groups: the corpus has no named documents")
        model = captured["model"]
        with torch.no_grad():
            loss = {name: evaluate(model, windows_NT[torch.from_numpy(mask)], 16, torch.device("cpu"))
                    for name, mask in (("codec", codec), ("other", ~codec))}
        print(json.dumps({"case": case, "trial_id": trial.trial_id, "val": round(result.final_val_loss, 4),
                          "val_codec": round(loss["codec"], 4), "val_other": round(loss["other"], 4),
                          "n_codec": int(codec.sum()), "n_other": int((~codec).sum()),
                          "val_recomputed": round((loss["codec"] * codec.sum() + loss["other"] * (~codec).sum())
                                                  / len(codec), 4),
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
