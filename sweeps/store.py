"""The results store of one sweep: Parquet files under results/<sweep>/, written atomically as trials finish.

Layout (the contract with analysis/: analysis/contract.py, docs/results-contract.md):
    runs/<trial_id>.parquet     one row per finished trial (RUN_SCHEMA, in analysis/contract.py); a re-run of a
                                failed trial replaces it
    curves/<trial_id>.parquet   its training curve (CURVE_SCHEMA)
    spec.yaml                   the resolved spec of the latest run that trained something
    damaged/                    unreadable files moved aside by `run` (their trials run again)
Every file is written with `engram.util.atomic_write` (a '.'-prefixed temporary name in the same folder, fsync,
then `os.replace`), so a crash at any moment leaves whole files plus, at worst, a temp file that readers ignore
(pyarrow skips names starting with '.' or '_'). The curve is written before the row: a row never points at a
missing curve. Everything is readable with plain `pandas.read_parquet(root / "runs")`, without Ray; reading is
safe while a sweep writes. A damaged file (truncated by a full disk, a copy cut short) is skipped by the readers
here and named by `damaged()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.contract import (COMPLETE_STATUSES, CURVE_SCHEMA, CURVES_DIR, DAMAGED_DIR, RUN_SCHEMA, RUNS_DIR,
                               RECORDED_DIAGNOSTICS, SPEC_FILE, STATUSES, TEMP_PREFIX, Damaged, damaged_files,
                               read_folder)
from engram.util import atomic_write, cpu_model

if TYPE_CHECKING:
    from engram.trial import TrialResult
    from sweeps.plan import PlannedTrial

VERSIONED_PACKAGES = ("torch", "ray", "numpy", "pandas", "pyarrow", "optuna", "engram-sweeps")


LOCK_FILE = ".lock"


class StoreUnavailable(RuntimeError):
    """The store cannot be taken for writing (another driver holds it, or its folder cannot be made): one line."""


class ResultStore:
    """results/<sweep>/. Creating one writes nothing; folders appear with the first write."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.runs_dir = self.root / RUNS_DIR
        self.curves_dir = self.root / CURVES_DIR
        self.spec_path = self.root / SPEC_FILE
        self.damaged_dir = self.root / DAMAGED_DIR

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

    def damaged(self) -> list[Damaged]:
        """The store's unreadable data files (the readers above skip them)."""
        return damaged_files(self.root)

    def move_damaged_aside(self) -> list[Path]:
        """Move every unreadable file, with the other file of its trial, into damaged/runs|curves/ (never delete):
        the trial then counts as not stored and a run trains it again. Returns the files' new paths. Call only
        when no other process writes this store."""
        ids = {d.path.stem for d in self.damaged()}
        moved = []
        for trial_id in sorted(ids):
            for folder in (self.runs_dir, self.curves_dir):
                src = folder / f"{trial_id}.parquet"
                if not src.exists():
                    continue
                dest = self.damaged_dir / folder.name / src.name
                n = 1
                while dest.exists():  # an earlier damaged copy of the same trial stays too
                    dest = dest.with_name(f"{trial_id}.{n}.parquet")
                    n += 1
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
                moved.append(dest)
        return moved

    def _read(self, folder: Path, schema: pa.Schema, columns: list[str] | None = None) -> pd.DataFrame:
        # Reads the listed files (not the folder), so that a temp file appearing mid-read is never touched.
        return read_folder(folder, schema, columns).table

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

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Hold the store for one writer (`run`): a second driver on the same store raises StoreUnavailable
        instead of training every trial again beside the first and cleaning up its temp files mid-write. An
        advisory flock on `<store>/.lock`, released by the kernel if the driver dies. Folders this call had to
        create are removed again on the way out if nothing else was written into them."""
        existing = next(p for p in (self.root, *self.root.parents) if p.exists())
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreUnavailable(f"results_dir: cannot create {self.root} ({err.strerror or err})") from None
        path = self.root / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StoreUnavailable(f"results_dir: cannot write in {self.root} ({err.strerror or err})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                raise StoreUnavailable(f"{self.root}: another driver (pid {holder}) is running this sweep; one "
                                       f"`run` per store at a time") from None
            except OSError:
                pass    # a file system without flock (some network mounts): run unguarded, as before the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    path.unlink()
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            # the folders this call made, while empty: a failed first launch leaves no folder behind
            for folder in (self.root, *self.root.parents):
                if folder == existing:
                    break
                try:
                    folder.rmdir()
                except OSError:
                    break

    def write_spec(self, text: str) -> None:
        """Write the resolved spec (YAML text from sweeps.spec.dump_spec) beside the results."""
        atomic_write(self.spec_path, text.encode())

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


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    atomic_write(path, lambda f: pq.write_table(table, f))


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
        "precision": None if result is None else result.precision,
        "host": socket.gethostname(), "versions": json.dumps(package_versions(), sort_keys=True),
        "git_commit": git_commit(), "started_at": started_at, "finished_at": finished_at,
        **_diagnostic_fields(trial, result),
        **_mix_columns(trial, result),
    }


def _diagnostic_fields(trial: PlannedTrial, result: TrialResult | None) -> dict[str, Any]:
    diag = result.diagnostics if result is not None else {}
    return {"d_ff_dense": trial.config.model.d_ff_dense, "table_params": int(trial.counts.engram_tables),
            "lookups_per_row": trial.lookups_per_row,
            **{k: diag.get(k) for k in RECORDED_DIAGNOSTICS}}


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
    """Python's and VERSIONED_PACKAGES' versions, and "cpu": this machine's CPU (engram.util.cpu_model); the
    launcher replaces it by the CPU of the node that ran the trial."""
    out: dict[str, str | None] = {"python": platform.python_version(), "cpu": cpu_model()}
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
