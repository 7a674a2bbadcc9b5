#!/usr/bin/env bash
# Issue 9's GPU checks in one run, for a session lent a GPU machine (15 minutes of device time in all):
# the gpu-marked tests, `plan` on sweep.yaml with a GPU per trial (its ETA timed on the GPU), then
# benchmarks/bench_gpu.py on sweep.yaml (peaks, every planned model's step in fp32 and bf16, the sweep's training
# time on the GPU, whole trials paired by seed, one CPU thread for reference), and, where the host CPU has native
# bf16, benchmarks/bench_trial.py --spec sweep.yaml beside it.
#
#   bash scripts/device_check.sh     # from the repository root; at most 9 min (the timeouts below), so the
#                                    # device tool's run can take it whole with timeout_s 590
#
# It needs only python3 with torch (CUDA), numpy, PyYAML, pandas, tokenizers and pytest: the GPU machine's image
# has them, and nothing here imports Ray or Optuna. Everything printed is also written under $OUT (or
# /tmp/device_check), which the device tool brings back. Record the figures in docs/benchmarks.md ("GPU").
set -uo pipefail
OUT=${OUT:-/tmp/device_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" -c 'import torch, numpy, tokenizers, yaml, pandas; print("torch", torch.__version__, "cuda",
torch.version.cuda, "gpu", torch.cuda.is_available(), "numpy", numpy.__version__, "tokenizers",
tokenizers.__version__)'
    nproc
} 2>&1 | tee "$OUT/env.txt"

# The gpu-marked tests (CUDA forward against CPU, a CUDA bf16 step, a whole CUDA trial, plan's GPU timing).
timeout 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
    tests/test_model.py tests/test_memory.py tests/test_trial.py tests/test_plan.py 2>&1 | tee "$OUT/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}

# The host's CPU, when it multiplies bf16 natively (AVX512_BF16 or AMX; these project machines mostly do not):
# issue 9's CPU figures on the default's own models (bf16 over fp32 per model, MFU), one thread, in the
# background on another core while the GPU is measured.
cpu_pid=
if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo; then
    timeout 300 "$PY" -m benchmarks.bench_trial --spec sweep.yaml --rounds 2 --steps 3 \
        > "$OUT/bench_trial_cpu.txt" 2>&1 &
    cpu_pid=$!
else
    echo "host CPU without AVX512_BF16 or AMX: no CPU bf16 figures" > "$OUT/bench_trial_cpu.txt"
fi

# What `plan` says on a GPU machine (no Ray needed): its ETA from steps timed on the GPU. sweep.yaml gives its
# trials no GPU (gpus_per_trial 0 keeps them on CPUs), so plan a copy that gives each trial one.
"$PY" -c 'import sys, yaml; s = yaml.safe_load(open("sweep.yaml")); s["resources"]["gpus_per_trial"] = 1
yaml.safe_dump(s, sys.stdout, sort_keys=False)' > "$OUT/sweep_gpu.yaml"
timeout 60 "$PY" -m sweeps.cli plan "$OUT/sweep_gpu.yaml" 2>&1 | tail -4 | tee "$OUT/plan.txt"

timeout 360 "$PY" -m benchmarks.bench_gpu --spec sweep.yaml --device cuda --cpu-reference \
    --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
bench_rc=${PIPESTATUS[0]}

cpu_rc=0
if [ -n "$cpu_pid" ]; then
    wait "$cpu_pid"; cpu_rc=$?
    cat "$OUT/bench_trial_cpu.txt"
fi

echo "gpu tests exit $tests_rc, bench_gpu exit $bench_rc, bench_trial (CPU bf16) exit $cpu_rc" | tee -a "$OUT/env.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$cpu_rc" -eq 0 ]
