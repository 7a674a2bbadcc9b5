"""The results store of one sweep: Parquet files under results/<sweep>/, written atomically as trials finish.

Layout (the contract with analysis/, see ../shared/DESIGN.md "Results store"):
    runs/<trial_id>.parquet     one row per finished trial (RUN_SCHEMA); a re-run of a failed trial replaces it
    curves/<trial_id>.parquet   its training curve (CURVE_SCHEMA)
    spec.yaml                   the resolved spec of the latest run
Every file is written to a '.'-prefixed temporary name in the same folder and then `os.replace`d, so a crash at
any moment leaves whole files plus, at worst, a temp file that readers ignore (pyarrow skips names starting with
'.' or '_'). The curve is written before the row: a row never points at a missing curve. Everything is readable
with plain `pandas.read_parquet(root / "runs")`, without Ray; reading is safe while a sweep writes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from engram.trial import TrialResult
    from sweeps.plan import PlannedTrial

COMPLETE_STATUSES = ("ok", "diverged")  # skipped on re-run; "failed" rows are re-run
STATUSES = ("ok", "failed", "diverged")
VERSIONED_PACKAGES = ("torch", "ray", "numpy", "pandas", "pyarrow", "optuna", "engram-sweeps")
TEMP_PREFIX = "."

RUN_SCHEMA = pa.schema([
    ("trial_id", pa.string()), ("sweep", pa.string()), ("experiment", pa.string()), ("kind", pa.string()),
    ("memory", pa.string()), ("rho", pa.float64()), ("rho_achieved", pa.float64()), ("slots", pa.int64()),
    ("n_routed", pa.int64()), ("top_k", pa.int64()), ("seed", pa.int64()), ("budget", pa.float64()),
    ("P_tot", pa.int64()), ("P_act", pa.int64()), ("P_sparse", pa.int64()), ("P_engram", pa.int64()),
    ("flops_per_token", pa.float64()), ("tokens", pa.int64()), ("compute", pa.float64()), ("steps", pa.int64()),
    ("final_val_loss", pa.float64()), ("best_val_loss", pa.float64()), ("train_loss", pa.float64()),
    ("status", pa.string()), ("error", pa.string()), ("attempts", pa.int64()), ("wall_seconds", pa.float64()),
    ("tokens_per_second", pa.float64()), ("device", pa.string()), ("host", pa.string()),
    ("versions", pa.string()), ("git_commit", pa.string()), ("started_at", pa.string()),
    ("finished_at", pa.string()),
    # the mix corpus (engram.mixcorpus): its knowledge share and the final validation loss per token kind;
    # null for other corpora
    ("knowledge_share", pa.float64()), ("final_val_loss_knowledge", pa.float64()),
    ("final_val_loss_computation", pa.float64()),
])
CURVE_SCHEMA = pa.schema([
    ("trial_id", pa.string()), ("step", pa.int64()), ("tokens", pa.int64()), ("train_loss", pa.float64()),
    ("val_loss", pa.float64()), ("lr", pa.float64()), ("elapsed", pa.float64()),
])


class ResultStore:
    """results/<sweep>/. Creating one writes nothing; folders appear with the first write."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.runs_dir = self.root / "runs"
        self.curves_dir = self.root / "curves"
        self.spec_path = self.root / "spec.yaml"

    def __repr__(self) -> str:
        return f"ResultStore({str(self.root)!r})"

    # -- reading ------------------------------------------------------------------------------------------------

    def completed_ids(self) -> set[str]:
        """trial_ids whose row is complete (status ok or diverged); failed trials are not complete."""
        runs = self._read(self.runs_dir, RUN_SCHEMA, columns=["trial_id", "status"])
        return set(runs.loc[runs["status"].isin(COMPLETE_STATUSES), "trial_id"])

    def runs(self) -> pd.DataFrame:
        """One row per finished trial (RUN_SCHEMA columns), empty when nothing is stored."""
        return self._read(self.runs_dir, RUN_SCHEMA)

    def curves(self) -> pd.DataFrame:
        """All curve points of all trials (CURVE_SCHEMA columns)."""
        return self._read(self.curves_dir, CURVE_SCHEMA)

    def _read(self, folder: Path, schema: pa.Schema, columns: list[str] | None = None) -> pd.DataFrame:
        files = _data_files(folder)
        if not files:
            return schema.empty_table().select(columns or schema.names).to_pandas()
        # Read the listed files (not the folder) so that a temp file appearing mid-read is never touched.
        table = pq.ParquetDataset(files, schema=schema).read(columns=columns)
        return table.to_pandas()

    # -- writing ------------------------------------------------------------------------------------------------

    def write_trial(self, row: dict[str, Any], curve: pd.DataFrame | None) -> None:
        """Store one finished trial atomically: its curve (if any) first, then its row."""
        unknown = set(row) - set(RUN_SCHEMA.names)
        if unknown:
            raise ValueError(f"row: unknown columns {sorted(unknown)}")
        if row.get("status") not in STATUSES:
            raise ValueError(f"row.status: expected one of {', '.join(STATUSES)}, got {row.get('status')!r}")
        trial_id = row.get("trial_id")
        if not trial_id or "/" in trial_id or trial_id.startswith(TEMP_PREFIX):
            raise ValueError(f"row.trial_id: expected a file-safe id, got {trial_id!r}")
        if curve is not None:
            curve = curve.assign(trial_id=trial_id)
            missing = set(CURVE_SCHEMA.names) - set(curve.columns)
            if missing:
                raise ValueError(f"curve: missing columns {sorted(missing)}")
            table = pa.Table.from_pandas(curve[CURVE_SCHEMA.names], schema=CURVE_SCHEMA, preserve_index=False)
            _atomic_write_table(table, self.curves_dir / f"{trial_id}.parquet")
        table = pa.Table.from_pylist([{name: row.get(name) for name in RUN_SCHEMA.names}], schema=RUN_SCHEMA)
        _atomic_write_table(table, self.runs_dir / f"{trial_id}.parquet")

    def write_spec(self, text: str) -> None:
        """Write the resolved spec (YAML text from sweeps.spec.dump_spec) beside the results."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TEMP_PREFIX}spec.yaml.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.spec_path)

    def temp_files(self) -> list[Path]:
        """Leftovers of writers that died mid-write."""
        return sorted(p for d in (self.root, self.runs_dir, self.curves_dir) if d.is_dir()
                      for p in d.iterdir() if p.name.startswith(TEMP_PREFIX) and p.name.endswith(".tmp"))

    def remove_temp_files(self) -> int:
        """Delete leftovers of a crashed writer. Call only when no other process writes this store."""
        files = self.temp_files()
        for p in files:
            p.unlink(missing_ok=True)
        return len(files)


def _data_files(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir()
                  if p.suffix == ".parquet" and not p.name.startswith((TEMP_PREFIX, "_")))


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TEMP_PREFIX}{path.name}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:  # the bytes reach the disk before the name is published
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Rows


def result_row(trial: PlannedTrial, result: TrialResult | None, *, error: str | None, attempts: int,
               started_at: str, finished_at: str) -> dict[str, Any]:
    """The run row of one finished trial. `result` is None when run_trial raised (status "failed").

    Parameter counts and FLOPs are the achieved ones (from the result; the plan's, which are the same analytic
    counts, for a failed trial). Provenance: package versions, git commit, host.
    """
    counts = result.counts if result is not None else trial.counts
    status = result.status if result is not None else "failed"
    rho_achieved = counts.rho
    return {
        "trial_id": trial.trial_id, "sweep": trial.sweep, "experiment": trial.experiment, "kind": trial.kind,
        "memory": trial.memory, "rho": math.nan if trial.rho is None else float(trial.rho),
        "rho_achieved": math.nan if rho_achieved is None else float(rho_achieved),
        "slots": int(trial.slots), "n_routed": trial.config.model.n_routed, "top_k": trial.config.model.top_k,
        "seed": int(trial.seed), "budget": None if trial.budget is None else float(trial.budget),
        "P_tot": int(counts.p_tot), "P_act": int(counts.p_act), "P_sparse": int(counts.p_sparse),
        "P_engram": int(counts.p_engram),
        "flops_per_token": float(result.flops_per_token if result is not None else trial.flops_per_token),
        "tokens": int(result.tokens if result is not None else trial.tokens),
        "compute": None if result is None else float(result.compute),
        "steps": None if result is None else int(result.steps),
        "final_val_loss": None if result is None else result.final_val_loss,
        "best_val_loss": None if result is None else result.best_val_loss,
        "train_loss": None if result is None else result.train_loss,
        "status": status, "error": error if error is not None else (result.error if result is not None else None),
        "attempts": int(attempts),
        "wall_seconds": None if result is None else float(result.wall_seconds),
        "tokens_per_second": None if result is None else float(result.tokens_per_second),
        "device": None if result is None else result.device,
        "host": socket.gethostname(), "versions": json.dumps(package_versions(), sort_keys=True),
        "git_commit": git_commit(), "started_at": started_at, "finished_at": finished_at,
        **_mix_columns(trial, result),
    }


def _mix_columns(trial: PlannedTrial, result: TrialResult | None) -> dict[str, Any]:
    data = trial.config.data
    return {"knowledge_share": float(data.knowledge_share) if data.is_mix else None,
            "final_val_loss_knowledge": None if result is None else result.final_val_loss_knowledge,
            "final_val_loss_computation": None if result is None else result.final_val_loss_computation}


def curve_frame(result: TrialResult) -> pd.DataFrame:
    """A trial's curve as the store's curve table (val_loss NaN where not evaluated)."""
    return pd.DataFrame(
        [(p.step, p.tokens, p.train_loss, math.nan if p.val_loss is None else p.val_loss, p.lr, p.elapsed)
         for p in result.curve],
        columns=["step", "tokens", "train_loss", "val_loss", "lr", "elapsed"])


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from, with "-dirty" when tracked files differ from it; None when
    not in a git checkout or without git. It is read when the row is written: a tree edited while a sweep runs
    can still mix code versions (Ray workers import the code when they start)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
