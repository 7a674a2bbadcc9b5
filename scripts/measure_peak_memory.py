"""Measured peak RSS of real trials against sweeps.footprint's estimate (docs/reliability.md, "Peak memory").

    PYTHONPATH=$PWD python scripts/measure_peak_memory.py sweep.yaml --steps 60 --pick 0 5 7 --slots 1e7

Plans the spec's grid trials, runs the picked ones (indices into the plan) for `--steps` steps each with
`engram-sweep train` in a child process (so each peak is that trial's alone), and prints estimate / measured.
`--slots N` adds one trial of the first memory experiment at N slots (a table-dominated point). `--tiny` adds
the tests' tiny model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from engram.accounting import param_counts
from engram.config import TrialConfig, to_dict
from sweeps.footprint import format_bytes, trial_footprint
from sweeps.plan import Throughput, plan_sweep
from sweeps.sizing import memory_for_slots
from sweeps.spec import MemoryExperiment, load_spec
from sweeps.tiny import tiny_sweep


def tiny_model() -> dict:
    """The tests' tiny model (sweeps/tiny.py) with 2000 Engram slots."""
    model = tiny_sweep()["model"]
    return {**model, "memory": {**model["memory"], "kind": "engram", "slots": 2000}}


def peak_rss_bytes(config: TrialConfig, tmp: Path, label: str) -> int:
    path = tmp / f"{label}.yaml"
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    proc = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "train", "--config", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{label}: train failed: {proc.stderr.read()[-2000:]}")
    return usage.ru_maxrss * 1024  # kB on Linux


def with_steps(config: TrialConfig, steps: int) -> TrialConfig:
    train = dataclasses.replace(config.train, flops=None, tokens=None, steps=steps, device="cpu")
    return dataclasses.replace(config, train=train)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec", type=Path)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--pick", type=int, nargs="*", default=[0])
    ap.add_argument("--slots", type=float, default=None)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    spec = load_spec(args.spec)
    trials = plan_sweep(spec, throughput=Throughput(1e9, 0.0, "unused"))
    cases = [(f"{t.experiment}-{t.memory}-rho{t.rho}-slots{t.slots}", t.config) for t in
             (trials[i] for i in args.pick)]
    if args.slots is not None:
        exp = next(e for e in spec.experiments if isinstance(e, MemoryExperiment))
        model = dataclasses.replace(spec.model, memory=memory_for_slots(spec.model, int(args.slots), exp.memory[0]))
        base = next(t for t in trials if t.experiment == exp.name)
        cases.append((f"{exp.name}-{exp.memory[0]}-slots{int(args.slots)}",
                      dataclasses.replace(base.config, model=model)))
    if args.tiny:
        from engram.config import from_dict

        tiny = from_dict(TrialConfig, {"model": tiny_model(), "data": to_dict(spec.data),
                                       "train": {"steps": 1, "batch_size": 8, "eval_tokens": 1024}})
        cases.append(("tiny", tiny))
    print(f"{'trial':42s} {'estimate':>10s} {'measured':>10s} {'ratio':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, config) in enumerate(cases):
            config = with_steps(config, args.steps)
            est = trial_footprint(config, param_counts(config.model)).total
            got = peak_rss_bytes(config, Path(tmp), f"case{i}")
            print(f"{label:42s} {format_bytes(est):>10s} {format_bytes(got):>10s} {est / got:6.2f}", flush=True)


if __name__ == "__main__":
    main()
