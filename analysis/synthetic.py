"""A synthetic results store in the contract's layout (runs/, curves/, spec.yaml under results/<sweep>/), with
planted laws, for the analysis tests and benchmarks/bench_report.py. No training happens here.

Planted truth (see `PLANTED`): allocation loss L(rho, C) = E + K * C^-a + curv * (rho - rho*)^2, with
rho* = 0.75 at every budget; memory loss L(slots) = E_m + A_m * slots^-alpha_m per memory kind. Gaussian noise
per trial plus a per-seed offset. A few trials are failed, diverged, or have a NaN loss, as a real sweep has.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

PLANTED = MappingProxyType({
    "rho_star": 0.75, "curvature": 0.08, "E": 2.0, "K": 3.0e3, "a": 0.25,
    "memory": MappingProxyType({"engram": (2.6, 4.0, 0.35), "overencoding": (2.62, 3.0, 0.3)}),   # E_m, A_m, alpha_m
    "noise": 0.004, "seed_offset": 0.003,
})
RHO_GRID = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
ALLOC_BUDGETS = (1e14, 3e14, 1e15, 3e15)
SLOT_GRID = (1e4, 3e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7)
MEMORY_BUDGETS = (1e14, 1e15)
SEEDS = (0, 1, 2)
N_SEARCH = 24
N_CURVE_POINTS = 20
FLOPS_PER_TOKEN = 6.0e6
# The store contract's column types (sweeps/store.py RUN_SCHEMA; not imported: analysis does not depend on sweeps).
_INT_COLUMNS = ("slots", "n_routed", "top_k", "seed", "P_tot", "P_act", "P_sparse", "P_engram", "tokens", "steps",
                "attempts")
_STR_COLUMNS = ("trial_id", "sweep", "experiment", "kind", "memory", "status", "error", "device", "host",
                "versions", "git_commit", "started_at", "finished_at")


def write_synthetic_store(root: Path, *, sweep: str = "synthetic", rng_seed: int = 0) -> Path:
    """Write a 200-trial store under `root` (created) and return it. Same rng_seed, same store."""
    root = Path(root)
    rng = np.random.default_rng(rng_seed)
    rows = []
    seed_offset = {s: rng.normal(0, PLANTED["seed_offset"]) for s in SEEDS}

    def alloc_loss(rho: float, budget: float, seed: int) -> float:
        p = PLANTED
        return (p["E"] + p["K"] * budget ** -p["a"] + p["curvature"] * (rho - p["rho_star"]) ** 2
                + seed_offset[seed] + rng.normal(0, p["noise"]))

    for budget in ALLOC_BUDGETS:
        for rho in RHO_GRID:
            for seed in SEEDS:
                rows.append(_row(sweep, "alloc", "allocation", "engram" if rho < 1 else "none", rho, seed, budget,
                                 alloc_loss(rho, budget, seed), rng))
    for kind, (e_m, a_m, alpha_m) in PLANTED["memory"].items():
        for budget in MEMORY_BUDGETS:
            for slots in SLOT_GRID:
                for seed in SEEDS:
                    loss = (e_m + a_m * slots ** -alpha_m + 0.5 * (PLANTED["K"] * budget ** -PLANTED["a"])
                            + seed_offset[seed] + rng.normal(0, PLANTED["noise"]))
                    experiment = "memory" if budget == MEMORY_BUDGETS[0] else "memory-large"
                    rows.append(_row(sweep, experiment, "memory", kind, math.nan, seed, budget, loss, rng,
                                     slots=int(slots)))
    for rho in rng.uniform(0, 1, N_SEARCH):
        rows.append(_row(sweep, "search", "search", "engram", float(rho), 0, 3e14, alloc_loss(rho, 3e14, 0), rng))
    _spoil(rows, rng)
    _write(root, rows, rng, sweep)
    return root


def _row(sweep, experiment, kind, memory, rho, seed, budget, loss, rng, *, slots: int | None = None) -> dict:
    tokens = int(budget / FLOPS_PER_TOKEN)
    rho_achieved = rho if not math.isfinite(rho) or rho in (0.0, 1.0) else rho + rng.normal(0, 0.004)
    trial_id = f"{experiment}-{rng.integers(1 << 62):016x}"
    if slots is None:
        slots = 0 if rho >= 1 else int(2e6 * (1 - rho))
    return {
        "trial_id": trial_id, "sweep": sweep, "experiment": experiment, "kind": kind, "memory": memory,
        "rho": rho, "rho_achieved": rho_achieved, "slots": slots, "n_routed": 2 + int(round(14 * rho)) if
        math.isfinite(rho) else 16, "top_k": 2, "seed": seed, "budget": budget, "P_tot": 4_000_000,
        "P_act": 1_000_000, "P_sparse": 3_000_000, "P_engram": slots * 16, "flops_per_token": FLOPS_PER_TOKEN,
        "tokens": tokens, "compute": FLOPS_PER_TOKEN * tokens, "steps": max(1, tokens // 2048),
        "final_val_loss": float(loss), "best_val_loss": float(loss) - 0.001, "train_loss": float(loss) - 0.02,
        "status": "ok", "error": None, "attempts": 1, "wall_seconds": 60.0, "tokens_per_second": tokens / 60.0,
        "device": "cpu", "host": "synthetic", "versions": json.dumps({"python": "synthetic"}),
        "git_commit": None, "started_at": "2026-11-29T00:00:00Z", "finished_at": "2026-11-29T00:01:00Z",
    }


def _spoil(rows: list[dict], rng: np.random.Generator) -> None:
    """Make the store realistic: three failed, three diverged, one non-finite loss, and one extra failed
    trial of each of the two alloc budget extremes (so 200 rows in all)."""
    picks = rng.choice(len(rows), size=7, replace=False)
    for i in picks[:3]:
        rows[i].update(status="failed", error="RuntimeError: CUDA out of memory (synthetic)", final_val_loss=None,
                       best_val_loss=None, train_loss=None, compute=None, attempts=3)
    for i in picks[3:6]:
        rows[i].update(status="diverged", error="non-finite loss at step 37", final_val_loss=math.inf,
                       best_val_loss=None)
    rows[picks[6]].update(final_val_loss=math.nan)
    while len(rows) < 200:
        extra = dict(rows[len(rows) % 72])
        extra.update(trial_id=f"extra-{len(rows)}-{rng.integers(1 << 62):016x}", status="failed",
                     error="ValueError: synthetic failure", final_val_loss=None, seed=7)
        rows.append(extra)


def _run_schema(row: dict) -> pa.Schema:
    return pa.schema([(k, pa.int64() if k in _INT_COLUMNS else pa.string() if k in _STR_COLUMNS else pa.float64())
                      for k in row])


def _write(root: Path, rows: list[dict], rng: np.random.Generator, sweep: str) -> None:
    (root / "runs").mkdir(parents=True, exist_ok=True)
    (root / "curves").mkdir(parents=True, exist_ok=True)
    for row in rows:
        pq.write_table(pa.Table.from_pylist([row], schema=_run_schema(row)),
                       root / "runs" / f"{row['trial_id']}.parquet")
        if row["status"] == "failed":
            continue
        final = row["final_val_loss"] if row["final_val_loss"] is not None else math.nan
        steps = np.linspace(0, row["steps"], N_CURVE_POINTS).astype(int)
        frac = np.maximum(steps / max(row["steps"], 1), 1e-3)
        val = (final if math.isfinite(final) else 3.0) + 2.5 * (1 - frac) ** 2
        pd.DataFrame({
            "trial_id": row["trial_id"], "step": steps, "tokens": steps * 2048,
            "train_loss": val + 0.02 + rng.normal(0, 0.01, N_CURVE_POINTS), "val_loss": val,
            "lr": 3e-3 * np.cos(0.5 * np.pi * frac), "elapsed": 60.0 * frac,
        }).to_parquet(root / "curves" / f"{row['trial_id']}.parquet", index=False)
    spec = {"name": sweep, "results_dir": str(root.parent),
            "data": {"corpus": "stdlib", "format": "auto", "val_fraction": 0.05},
            "experiments": [
                {"name": "alloc", "kind": "allocation", "p_tot_ratio": 4, "rho": list(RHO_GRID),
                 "budgets": list(ALLOC_BUDGETS), "seeds": list(SEEDS)},
                {"name": "memory", "kind": "memory", "memory": list(PLANTED["memory"]), "slots": list(SLOT_GRID),
                 "budget": MEMORY_BUDGETS[0], "seeds": list(SEEDS)},
                {"name": "memory-large", "kind": "memory", "memory": list(PLANTED["memory"]),
                 "slots": list(SLOT_GRID), "budget": MEMORY_BUDGETS[1], "seeds": list(SEEDS)},
                {"name": "search", "kind": "search", "p_tot_ratio": 4, "budget": 3e14, "n_trials": N_SEARCH,
                 "seed": 0}]}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
