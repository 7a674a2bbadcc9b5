"""benchmarks/bench_gpu.py, the one-run GPU check of issue 9, run here on the CPU over a tiny spec: what it times
and trains is the spec's own plan, its figures are consistent with each other, and bad input is one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.bench_gpu import main, trial_under_test
from benchmarks.bench_trial import planned_models
from engram.trial import run_trial
from sweeps.plan import Throughput, plan_sweep
from sweeps.spec import load_spec
from sweeps.tiny import tiny_sweep


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bench_gpu")
    raw = {"name": "tiny", "results_dir": str(tmp / "results"), **tiny_sweep(), "experiments": [
        {"name": "alloc", "kind": "allocation", "p_tot_ratio": 3, "rho": [0.5, 1.0], "budgets": [2e9], "seeds": [0]},
        {"name": "mem", "kind": "memory", "memory": ["none", "engram"], "slots": [500, 2000], "budget": 2e9,
         "seeds": [0, 1]}]}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_bench_gpu_on_cpu_times_every_planned_model_and_trains_the_planned_trial(tiny_spec, tmp_path, cache_dir,
                                                                               capsys):
    n_threads = torch.get_num_threads()
    out_json = tmp_path / "out.json"
    try:
        out = main(["--spec", str(tiny_spec), "--device", "cpu", "--rounds", "1", "--steps", "2", "--seeds", "0",
                    "1", "--precisions", "fp32", "bf16", "--cpu-reference", "--matmul-n", "128",
                    "--cache-dir", str(cache_dir), "--json", str(out_json)])
    finally:
        torch.set_num_threads(n_threads)
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(out))
    spec = load_spec(tiny_spec)
    planned = plan_sweep(spec, throughput=Throughput(1.0, 0.0, "not used"))
    models = planned_models(planned)
    assert {(r["model"], r["precision"]) for r in out["steps"]} == {(m, p) for m in models for p in ("fp32", "bf16")}
    tokens_per_step = spec.train.batch_size * spec.model.seq_len
    for r in out["steps"]:
        assert r["step_seconds"] > 0 and r["tokens_per_second"] == pytest.approx(tokens_per_step / r["step_seconds"])
        assert (r["bf16_over_fp32"] is None) == (r["precision"] == "fp32")
    step_s = {(r["model"], r["precision"]): r["step_seconds"] for r in out["steps"]}
    for p in ("fp32", "bf16"):  # (3): each model's planned tokens over all its seeds at its measured step rate
        assert out["sweep_training_seconds"][p] == pytest.approx(
            sum(tokens / tokens_per_step * step_s[m, p] for m, (_, tokens) in models.items()))
    assert out["cpu_reference"]["model"] == next(iter(models)) and out["cpu_reference"]["step_seconds"] > 0

    # (4): the planned trial, unchanged but for seed, precision and device: its fp32 loss is run_trial's own.
    base = trial_under_test(planned)
    assert (base.experiment, base.memory, base.slots) == ("mem", "engram", 2000)
    trials = {(t["seed"], t["precision"]): t for t in out["trials"]}
    assert set(trials) == {(s, p) for s in (0, 1) for p in ("fp32", "bf16")}
    assert all(t["tokens"] == base.tokens for t in trials.values())
    again = run_trial(dataclasses.replace(base.config, train=dataclasses.replace(
        base.config.train, seed=1, precision="fp32", device="cpu", checkpoint_interval=None)), cache_dir=cache_dir)
    assert trials[1, "fp32"]["final_val_loss"] == again.final_val_loss
    assert out["paired_bf16_minus_fp32"] == [trials[s, "bf16"]["final_val_loss"] - trials[s, "fp32"]["final_val_loss"]
                                             for s in (0, 1)]
    printed = capsys.readouterr().out
    assert "paired bf16 - fp32" in printed and "(3) the sweep's training steps (8 trials" in printed


def test_trial_under_test_falls_back_to_the_first_trial_without_a_memory_experiment(tiny_spec):
    spec = load_spec(tiny_spec)
    planned = [t for t in plan_sweep(spec, throughput=Throughput(1.0, 0.0, "not used")) if t.kind != "memory"]
    assert trial_under_test(planned) is planned[0]


@pytest.mark.parametrize("args, message", [
    (["--spec", "no-such.yaml", "--device", "cpu"], "no-such.yaml"),
    pytest.param(["--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_device_check_script_parses_and_names_what_exists():
    import re
    import subprocess

    root = Path(__file__).resolve().parent.parent
    script = root / "scripts" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for module in re.findall(r"-m ((?:benchmarks|sweeps)\.\w+)", text):
        assert (root / (module.replace(".", "/") + ".py")).is_file(), module
    for test_file in re.findall(r"tests/\w+\.py", text):
        assert (root / test_file).is_file(), test_file
        assert "pytest.mark.gpu" in (root / test_file).read_text(), f"{test_file} has no gpu-marked test"
