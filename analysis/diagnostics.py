"""Trial diagnostics: did a trial's memory tables train, did its routers balance (pure; no torch, no Ray).

Every stored trial records what happened (engram.trial: `TableUsage`, `router_diagnostics`); `diagnostics_table`
turns those columns into one row per trial with two flags the report shows:
- `untrained`: a memory trial whose median read row was read fewer than TRAINED_LOOKUPS_PER_ROW times;
- `unbalanced`: a MoE trial whose busiest expert carried more than BALANCED_MAX_LOAD x the mean load in the last
  validation pass, or one with a starved expert (below 10% of the mean);
- `unbalanced_in_training`: a MoE trial whose busiest expert trained on more than BALANCED_MAX_LOAD x the mean
  number of tokens over the last 10% of its steps, or whose least busy one on under 10% of it. The first is the
  router under its final bias on the validation windows; the second is what the experts actually trained on,
  which is what a fair comparison needs (docs/fairness.md, "Two loads").
The plan predicts `untrained` from the expected (mean) lookups per row, with a margin for the skew
(PLANNED_LOOKUPS_PER_ROW; sweeps.plan.table_training_warnings).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.contract import RECORDED_DIAGNOSTICS

# Reads per table row below which a row's movement is limited by how often it was read. Measured (LOG.md,
# 2026-11-30, issue 7; docs/fairness.md): in a default-budget Engram trial (1e5 slots, rows binned by reads) the
# mean RMS update of a row grows with its reads and levels off at ~0.25 of its init RMS above ~512 reads; rows
# read 128-255 times reach 0.16, rows read 64-127 times 0.095. 128 is where a row gets half the plateau's update.
TRAINED_LOOKUPS_PER_ROW = 128.0
# The plan knows only the mean reads per row (tokens x tables / rows); the report checks the median read row,
# which the skew of n-gram counts puts below the mean. Measured over every stored memory trial with a mean of >= 128
# (LOG.md, 2026-12-01): median / mean 0.71-0.95 on the stdlib corpus, 0.53-0.91 on the built-in mix corpus (0.53 at
# means of 128-256). The plan therefore warns below TRAINED_LOOKUPS_PER_ROW / PLANNED_MEDIAN_SHARE = 256 mean reads,
# so that a grid it passes is not flagged by the report on either corpus.
PLANNED_MEDIAN_SHARE = 0.5
PLANNED_LOOKUPS_PER_ROW = TRAINED_LOOKUPS_PER_ROW / PLANNED_MEDIAN_SHARE
# The bound the issue sets for aux-loss-free balancing at the end of a trial (max / mean expert load).
BALANCED_MAX_LOAD = 1.5
# An expert below this share of the mean load is starved (engram.moe.STARVED_LOAD; kept here: no torch import).
STARVED_SHARE = 0.1

# The bar a memory law is read against (issue 10's, for the paper's memory finding; not chosen from this project's
# runs): the log-linear slope with an interval above 0, R² at least LAW_R2_BAR over at least LAW_MIN_DECADES of
# slot counts, every slot point's tables trained. The report says which parts hold (it changes no fit); the plan
# says beforehand when a memory experiment's grid cannot meet the counts or the decades.
LAW_R2_BAR = 0.9
LAW_MIN_DECADES = 1.5
MIN_LINE_TEST_COUNTS = 3    # slot counts for a log-linear R² to say anything about the line (two: a line meets
                            # both means whatever the law)

def law_grid(slot_counts) -> tuple[int, float, bool, bool]:
    """(distinct slot counts, decades they span, enough counts for a line, enough decades for the bar): the plan's
    note and the report's reading both judge a memory grid by this."""
    counts = sorted({float(c) for c in slot_counts})
    decades = float(np.log10(counts[-1] / counts[0]))
    return len(counts), decades, len(counts) >= MIN_LINE_TEST_COUNTS, decades >= LAW_MIN_DECADES - 1e-9


DIAGNOSTIC_COLUMNS = ("lookups_per_row", *RECORDED_DIAGNOSTICS)  # the planned reads per row, then the recorded


def diagnostics_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per trial: experiment, memory, rho, slots, seed, the stored diagnostics, the relative table
    update (table_update_rms / table_init_rms) and the `untrained` / `unbalanced` flags. Columns a store
    written before the diagnostics lacks read as NaN (and flag nothing)."""
    keys = [c for c in ("experiment", "memory", "rho", "slots", "seed", "n_routed", "final_val_loss")
            if c in runs.columns]
    out = runs[keys].copy()
    for col in DIAGNOSTIC_COLUMNS:
        out[col] = pd.to_numeric(runs[col], errors="coerce") if col in runs.columns else np.nan
    out["update_rel"] = out["table_update_rms"] / out["table_init_rms"]
    out["untrained"] = out["lookups_median"] < TRAINED_LOOKUPS_PER_ROW
    out["unbalanced"] = (out["expert_load_max"] > BALANCED_MAX_LOAD) | (out["experts_starved"] > 0)
    out["unbalanced_in_training"] = ((out["expert_train_load_max"] > BALANCED_MAX_LOAD)
                                     | (out["expert_train_load_min"] < STARVED_SHARE))
    return out.reset_index(drop=True)


def diagnostics_summary(table: pd.DataFrame) -> dict[str, int]:
    """Counts for a report's headline: trials with tables, untrained ones; MoE trials, unbalanced ones (in the
    validation pass; in training, of the trials that recorded it)."""
    has_tables = table["lookups_median"].notna()
    has_router = table["expert_load_max"].notna()
    has_trained = table["expert_train_load_max"].notna()
    return {"with_tables": int(has_tables.sum()), "untrained": int((table["untrained"] & has_tables).sum()),
            "with_router": int(has_router.sum()), "unbalanced": int((table["unbalanced"] & has_router).sum()),
            "with_trained_load": int(has_trained.sum()),
            "unbalanced_in_training": int((table["unbalanced_in_training"] & has_trained).sum())}
