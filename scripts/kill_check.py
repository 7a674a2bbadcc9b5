"""Reliability check: SIGKILL the sweep driver at random moments, re-run the same command, check the store.

    python scripts/kill_check.py [--spec SPEC] [--kills 5] [--seed 0] [--window 4 40] [--keep]

Each round starts `python -m sweeps.cli run SPEC` (exactly what a user types, embedded local Ray) and SIGKILLs
the driver process after a random delay drawn from --window seconds; a final round runs to completion. After
every kill the script records what the store holds (rows, curves, unreadable files, leftover temp files, the
saved states a re-run can resume from) and checks that the killed driver's Ray processes went with it. At the
end the store must hold every planned trial exactly once, complete (ok or diverged), each with its curve, and no
partial files. Without --spec it writes a small spec (8 grid + 2 search trials of ~10 s each) to a temporary folder.
Figures go to docs/reliability.md by hand. Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

LINGER_LIMIT_S = 150.0
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sweeps.launcher import RESUME_DIR, TUNE_DIR  # noqa: E402
from sweeps.plan import plan_sweep  # noqa: E402
from sweeps.spec import load_spec  # noqa: E402
from sweeps.store import COMPLETE_STATUSES, ResultStore  # noqa: E402
from sweeps.tiny import tiny_sweep  # noqa: E402

# The tiny sweep (sweeps/tiny.py) with a wider model and rarer evaluations and checkpoints: trials of ~10 s.
SMALL_SPEC = {
    "name": "killcheck",
    **tiny_sweep(model={"d_model": 48, "d_ff_dense": 96, "d_expert": 24},
                 train={"warmup_steps": 5, "eval_interval": 100, "checkpoint_interval": 50}),
    "experiments": [
        {"name": "alloc", "kind": "allocation", "p_tot_ratio": 3, "rho": [0.5, 0.8, 1.0], "budgets": [1.5e11],
         "seeds": [0, 1]},
        {"name": "mem", "kind": "memory", "memory": ["engram"], "slots": [4096, 16384], "budget": 1.5e11,
         "seeds": [0]},
        {"name": "search", "kind": "search", "p_tot_ratio": 3, "budget": 1.5e11, "n_trials": 2, "seed": 0},
    ],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, help="sweep spec to run (default: a small built-in one)")
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=float, nargs=2, default=(3.0, 45.0), metavar=("MIN_S", "MAX_S"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="killcheck-"))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rk-", dir="/tmp"))  # Unix socket paths must stay short
    spec_path = args.spec
    if spec_path is None:
        spec_path = work / "sweep.yaml"
        spec_path.write_text(yaml.safe_dump({**SMALL_SPEC, "results_dir": str(work / "results")}))
    spec = load_spec(spec_path)
    store = ResultStore(spec.store_dir)
    planned = {t.trial_id for t in plan_sweep(spec)}
    n_search = sum(e.n_trials for e in spec.experiments if e.kind == "search")
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "TMPDIR": str(ray_tmp), "PYTHONPATH": str(ROOT)}
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rng = random.Random(args.seed)
    print(f"spec {spec_path}: {len(planned)} grid trials + {n_search} search trials; store {store.root}")
    print(f"{'round':>5} {'killed at':>9} {'rows':>5} {'curves':>6} {'unreadable':>10} {'temp':>4} "
          f"{'resumable':>9} {'ray left':>8} {'exit':>5}")

    ok = True
    lingering: set[int] = set()  # Ray processes seen alive 5 s after their driver ended
    for round_ in range(args.kills + 1):
        last = round_ == args.kills
        if not last and planned <= store.completed_ids() and _search_done(spec, store):
            print("      the sweep completed before all kills were spent; final round")
            last = True
        delay = None if last else rng.uniform(*args.window)
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", str(spec_path)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        elapsed = time.monotonic() - t0
        killed = proc.returncode == -signal.SIGKILL
        left = _ray_processes_left(ray_tmp, wait_s=5.0)
        lingering.update(left)
        s = _inspect(store)
        ok &= s["unreadable"] == 0
        when = f"{elapsed:8.1f}s" if killed else "        -"
        print(f"{round_ + 1:>5} {when:>9} {s['rows']:>5} {s['curves']:>6} {s['unreadable']:>10} {s['temp']:>4} "
              f"{s['resumable']:>9} {len(left):>8} {proc.returncode:>5}")
        if last and killed:
            ok = False
        if last:
            break

    # Ray's per-node agents of a SIGKILLed driver notice that their raylet is gone and exit on their own (about
    # a minute here); wait for that, then stop any that outlive it, by PID, and fail the check.
    t_wait = time.monotonic()
    left = _ray_processes_left(ray_tmp, wait_s=LINGER_LIMIT_S)
    print(f"Ray processes alive 5 s after a driver ended: {len(lingering)}; all gone after "
          f"{time.monotonic() - t_wait:.0f} s more" if not left else f"{len(left)} Ray processes outlived "
          f"{LINGER_LIMIT_S:.0f} s")
    for pid in left:
        print(f"      stopping pid {pid} {_cmdline(pid)[:100]}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    ok &= not left

    log = store.root / "ray.log"
    n_resumed = log.read_text().count("resumed True") if log.exists() else 0
    print(f"trials that resumed from a state saved before a kill: {n_resumed}")

    runs = store.runs()
    ids = list(runs["trial_id"])
    n_expected = len(planned) + n_search
    checks = {
        "every grid trial stored": planned <= set(ids),
        f"exactly {n_expected} rows, each trial once": len(ids) == n_expected and len(set(ids)) == len(ids),
        "all complete (ok or diverged)": bool(runs["status"].isin(COMPLETE_STATUSES).all()),
        "every row has its curve": set(store.curves()["trial_id"]) >= set(ids),
        "no partial files": not store.temp_files() and _inspect(store)["unreadable"] == 0,
        "no Ray process left behind": ok,
    }
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    else:
        print(f"kept {work}")
    return 0 if all(checks.values()) else 1


def _search_done(spec, store: ResultStore) -> bool:
    runs = store.runs()
    done = runs[runs["status"].isin(COMPLETE_STATUSES)]
    return all((done["experiment"] == e.name).sum() >= e.n_trials for e in spec.experiments if e.kind == "search")


def _inspect(store: ResultStore) -> dict[str, int]:
    files = [p for d in (store.runs_dir, store.curves_dir) if d.is_dir() for p in d.iterdir()
             if p.suffix == ".parquet" and not p.name.startswith(".")]
    unreadable = 0
    for p in files:
        try:
            pq.read_table(p)
        except Exception:
            unreadable += 1
    resume = store.root / TUNE_DIR / RESUME_DIR
    return {
        "rows": sum(1 for p in files if p.parent == store.runs_dir),
        "curves": sum(1 for p in files if p.parent == store.curves_dir),
        "unreadable": unreadable,
        "temp": len(store.temp_files()),
        "resumable": sum(1 for p in resume.iterdir() if not p.name.startswith(".")) if resume.is_dir() else 0,
    }


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def _ray_processes_left(ray_tmp: Path, wait_s: float) -> list[int]:
    """PIDs of processes still running from this check's Ray sessions (their command lines name ray_tmp)."""
    deadline = time.monotonic() + wait_s
    while True:
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                env = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if str(ray_tmp).encode() in cmd or f"RAY_TMPDIR={ray_tmp}".encode() in env:
                pids.append(int(entry))
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
