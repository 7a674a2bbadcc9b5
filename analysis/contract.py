"""The results-store contract: the layout of results/<sweep>/, its columns (RUN_SCHEMA, CURVE_SCHEMA), the trial
statuses, and how to read a store, for the writer (sweeps/store.py) and the readers (analysis/) alike.

sweeps/ (which writes a store) and analysis/ (which reads one) both import this module; it imports neither, nor
engram, nor Ray. The layout and columns are described for readers in docs/results-contract.md.

Reading is tolerant of damage: a Parquet file that cannot be read (truncated by a full disk, a copy cut short)
is skipped and reported by name rather than failing the whole store; `engram-sweep run` moves such files aside
into damaged/ and re-runs their trials.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

RUNS_DIR = "runs"  # one <trial_id>.parquet per finished trial (one row)
CURVES_DIR = "curves"  # one <trial_id>.parquet per trial: its training curve
SPEC_FILE = "spec.yaml"  # the resolved spec of the latest run that trained something
DAMAGED_DIR = "damaged"  # unreadable files moved aside by `run`, under damaged/runs/ and damaged/curves/
TEMP_PREFIX = "."  # writers' temporary names start with it; readers ignore such files (and '_' ones)
COMPLETE_STATUSES = ("ok", "diverged")  # skipped on re-run; "failed" rows are re-run
STATUSES = ("ok", "failed", "diverged")
# The columns of a run row and of a curve point (docs/results-contract.md describes each). Adding a column: add it
# here, fill it in sweeps/store.py's `result_row`, describe it in docs/results-contract.md; older files read on,
# with the new column missing.
# The diagnostics a trial records (engram.trial: TableUsage.summary, router_diagnostics), stored as run columns
# under these names by sweeps.store and read by analysis.diagnostics.
RECORDED_DIAGNOSTICS = ("rows_read_share", "lookups_median", "lookups_p10", "table_update_rms", "table_init_rms",
                        "expert_load_max", "expert_load_min", "experts_starved", "expert_train_load_max",
                        "expert_train_load_min")
RUN_SCHEMA = pa.schema([
    ("trial_id", pa.string()), ("sweep", pa.string()), ("experiment", pa.string()), ("kind", pa.string()),
    ("memory", pa.string()), ("rho", pa.float64()), ("rho_achieved", pa.float64()), ("slots", pa.int64()),
    ("n_routed", pa.int64()), ("top_k", pa.int64()), ("seed", pa.int64()), ("budget", pa.float64()),
    ("P_tot", pa.int64()), ("P_act", pa.int64()), ("P_sparse", pa.int64()), ("P_engram", pa.int64()),
    ("flops_per_token", pa.float64()), ("tokens", pa.int64()), ("compute", pa.float64()), ("steps", pa.int64()),
    ("final_val_loss", pa.float64()), ("best_val_loss", pa.float64()), ("train_loss", pa.float64()),
    ("status", pa.string()), ("error", pa.string()), ("attempts", pa.int64()), ("wall_seconds", pa.float64()),
    ("tokens_per_second", pa.float64()), ("device", pa.string()), ("precision", pa.string()),
    ("host", pa.string()), ("versions", pa.string()), ("git_commit", pa.string()), ("started_at", pa.string()),
    ("finished_at", pa.string()),
    # Fairness and trial diagnostics (issue 7; analysis/diagnostics.py reads them). Planned: the dense FFN width
    # that holds P_act, the table parameters, the expected reads per table row. Recorded by the trial: share of
    # rows read, median and 10th percentile of reads per read row, mean RMS update (and init RMS) of a read row,
    # expert load of the last validation pass (max / mean, min / mean, experts below 10% of the mean), expert load
    # of the training tokens over the last 10% of steps (max / mean, min / mean).
    ("d_ff_dense", pa.int64()), ("table_params", pa.int64()), ("lookups_per_row", pa.float64()),
    ("rows_read_share", pa.float64()), ("lookups_median", pa.float64()), ("lookups_p10", pa.float64()),
    ("table_update_rms", pa.float64()), ("table_init_rms", pa.float64()), ("expert_load_max", pa.float64()),
    ("expert_load_min", pa.float64()), ("experts_starved", pa.int64()), ("expert_train_load_max", pa.float64()),
    ("expert_train_load_min", pa.float64()),
    # the mix corpus (engram.mixcorpus): its knowledge share and the final validation loss per token kind;
    # null for other corpora
    ("knowledge_share", pa.float64()), ("final_val_loss_knowledge", pa.float64()),
    ("final_val_loss_computation", pa.float64()),
])
CURVE_SCHEMA = pa.schema([
    ("trial_id", pa.string()), ("step", pa.int64()), ("tokens", pa.int64()), ("train_loss", pa.float64()),
    ("val_loss", pa.float64()), ("lr", pa.float64()), ("elapsed", pa.float64()),
])
# What a reader may meet when a file is damaged: pyarrow's own errors, and OSError for unreadable bytes.
READ_ERRORS = (pa.ArrowException, OSError, ValueError)
KEY_COLUMN = "trial_id"     # every file of runs/ and curves/ has it; a Parquet file without it is not ours
FOREIGN = f"not a results file (no {KEY_COLUMN} column)"


@dataclass(frozen=True)
class Damaged:
    """A store file that could not be read, and pyarrow's one-line reason."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


@dataclass(frozen=True)
class FolderRead:
    """The readable files of one store folder as a table, and the damaged ones that were skipped."""

    table: pd.DataFrame
    damaged: tuple[Damaged, ...] = field(default=())


def data_files(folder: Path) -> list[Path]:
    """The Parquet files of a store folder, sorted; temporary and hidden files are not data."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix == ".parquet" and not p.name.startswith((TEMP_PREFIX, "_")) and p.is_file())


def read_folder(folder: Path, schema: pa.Schema | None = None, columns: list[str] | None = None) -> FolderRead:
    """All readable rows of `folder`'s Parquet files; damaged files are skipped and listed.

    With `schema`, the table has exactly its columns (or `columns`), missing ones as nulls: files written before
    a column was added still read. The fast path reads every file at once; only when that fails is each file
    read alone, to tell the damaged ones from the rest.
    """
    files = data_files(folder)
    names = columns or (schema.names if schema is not None else None)
    if not files:
        return FolderRead(_empty(schema, names))
    try:
        if schema is not None:
            table = pq.ParquetDataset([str(f) for f in files], schema=schema).read(columns=names).to_pandas()
        else:
            table = pd.read_parquet([str(f) for f in files])
        if KEY_COLUMN not in table.columns or not table[KEY_COLUMN].isna().any():
            return FolderRead(table)
        # a row without a trial id: some file is not one of ours; find it below
    except READ_ERRORS:
        pass
    frames, damaged = [], []
    for f in files:
        try:
            frame = pq.read_table(f).to_pandas()
        except READ_ERRORS as err:
            damaged.append(Damaged(f, _one_line(err)))
            continue
        if KEY_COLUMN not in frame.columns:
            damaged.append(Damaged(f, FOREIGN))
        else:
            frames.append(frame)
    frames = [fr for fr in frames if len(fr)]
    if not frames:
        return FolderRead(_empty(schema, names), tuple(damaged))
    table = pd.concat(frames, ignore_index=True)
    if names is not None:  # files of older layouts lack newer columns: they read as missing
        table = table.reindex(columns=names)
    return FolderRead(table, tuple(damaged))


def read_spec(store_dir: Path) -> tuple[dict, str | None]:
    """The store's parsed spec.yaml ({} when absent) and, when it cannot be read or parsed, why (one phrase)."""
    path = Path(store_dir) / SPEC_FILE
    if not path.is_file():
        return {}, None
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        return {}, type(err).__name__
    return (spec, None) if isinstance(spec, dict) else ({}, "not a mapping")


def damaged_files(store_dir: Path) -> list[Damaged]:
    """Every unreadable data file of a store (runs/ and curves/): the footer is checked and every file read."""
    out = []
    for sub in (RUNS_DIR, CURVES_DIR):
        for f in data_files(Path(store_dir) / sub):
            try:
                if KEY_COLUMN not in pq.read_table(f).column_names:
                    out.append(Damaged(f, FOREIGN))
            except READ_ERRORS as err:
                out.append(Damaged(f, _one_line(err)))
    return out


def _empty(schema: pa.Schema | None, names: list[str] | None) -> pd.DataFrame:
    if schema is not None:
        return schema.empty_table().select(names or schema.names).to_pandas()
    return pd.DataFrame(columns=names) if names else pd.DataFrame()


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
