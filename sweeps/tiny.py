"""The tiny sweep: the smallest sweep that runs every part of the launcher (a few dozen CPU steps per trial).

One definition for the tests that start Ray (tests/test_launcher.py, tests/test_cluster.py) and the checks run
by hand (scripts/kill_check.py, scripts/measure_peak_memory.py), so that a figure measured by a script and a test
of the same behaviour run the same model. A function rather than a module constant: every caller gets its own
copy to change.
"""

from __future__ import annotations

from typing import Any


def tiny_sweep(**changes: dict[str, Any]) -> dict[str, Any]:
    """The sections of a tiny sweep spec (all but `name` and `experiments`), each section named in `changes`
    updated key by key (e.g. `tiny_sweep(train={"eval_interval": 50})`)."""
    out: dict[str, Any] = {
        "data": {"corpus": "stdlib", "max_bytes": 300_000},
        "model": {"vocab_size": 512, "seq_len": 32, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_dense_layers": 1,
                  "d_ff_dense": 64, "d_expert": 16, "n_routed": 4, "top_k": 2,
                  "memory": {"layers": [1], "max_ngram": 3, "n_heads": 2, "d_head": 8}},
        "train": {"batch_size": 8, "lr": 3.0e-3, "warmup_steps": 2, "eval_interval": 10, "eval_tokens": 1024,
                  "checkpoint_interval": 10, "device": "cpu"},
        "resources": {"cpus_per_trial": 1, "max_retries": 1},
    }
    for section, values in changes.items():
        out[section] = {**out.get(section, {}), **values}
    return out
