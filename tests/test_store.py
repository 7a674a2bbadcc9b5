"""The results store: atomic whole files, complete vs failed trials, provenance, reading while a writer writes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pandas as pd
import pytest

from engram.trial import CurvePoint, TrialResult
from engram.util import cpu_model
from sweeps.plan import PlannedTrial, Throughput, plan_sweep
from sweeps.spec import parse_spec
from sweeps.store import CURVE_SCHEMA, RUN_SCHEMA, ResultStore, curve_frame, result_row

TINY_MODEL = {"vocab_size": 320, "seq_len": 32, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff_dense": 64,
              "d_expert": 16, "n_routed": 4, "top_k": 2, "memory": {"n_heads": 2, "d_head": 4}}
SPEC = {"name": "s", "data": {"corpus": "stdlib"}, "model": TINY_MODEL, "train": {"batch_size": 4},
        "experiments": [{"name": "alloc", "kind": "allocation", "p_tot_ratio": 3, "rho": [0.0, 0.5, 1.0],
                         "budgets": [1.5e8], "seeds": [0, 1]},
                        {"name": "mem", "kind": "memory", "slots": [200, 2000], "budget": 1.5e8}]}


@pytest.fixture(scope="module")
def trials(tmp_path_factory: pytest.TempPathFactory) -> list[PlannedTrial]:
    spec = parse_spec(SPEC, tmp_path_factory.mktemp("spec"))
    return plan_sweep(spec, throughput=Throughput(1e9, 0.0, "fixed for tests"))


def fake_result(trial: PlannedTrial, status: str = "ok", loss: float = 3.0) -> TrialResult:
    """A finished trial's record with the planned counts (what run_trial returns, without training)."""
    curve = (CurvePoint(1, trial.tokens // 2, loss + 1, None, 1e-3, 0.5),
             CurvePoint(2, trial.tokens, loss + 0.1, loss if status == "ok" else None, 1e-4, 1.0))
    return TrialResult(status=status, final_val_loss=loss if status == "ok" else None,
                       best_val_loss=loss if status == "ok" else None, train_loss=loss + 0.1, steps=2,
                       tokens=trial.tokens, flops_per_token=trial.flops_per_token,
                       compute=trial.flops_per_token * trial.tokens, wall_seconds=1.0,
                       tokens_per_second=trial.tokens / 1.0, device="cpu", precision="fp32", counts=trial.counts,
                       curve=curve,
                       error=None if status == "ok" else "non-finite loss at step 2")


def store_trial(store: ResultStore, trial: PlannedTrial, status: str = "ok", loss: float = 3.0) -> None:
    if status == "failed":
        store.write_trial(result_row(trial, None, error="RuntimeError: boom", attempts=3, started_at="t0",
                                     finished_at="t1"), None)
        return
    result = fake_result(trial, status, loss)
    store.write_trial(result_row(trial, result, error=None, attempts=1, started_at="2026-11-29T07:00:00+00:00",
                                 finished_at="2026-11-29T07:01:00+00:00"), curve_frame(result))


def test_empty_store_reads_as_empty_tables_and_writes_nothing(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "sweep")
    assert store.completed_ids() == set()
    assert list(store.runs().columns) == RUN_SCHEMA.names and len(store.runs()) == 0
    assert list(store.curves().columns) == CURVE_SCHEMA.names
    assert not (tmp_path / "sweep").exists()


def test_rows_and_curves_round_trip_with_the_contract_columns(tmp_path: Path, trials: list[PlannedTrial]) -> None:
    store = ResultStore(tmp_path / "sweep")
    alloc, mem = trials[2], trials[-1]  # rho = 0.5 seed 0; a memory trial
    store_trial(store, alloc, loss=2.5)
    store_trial(store, mem, loss=2.7)
    runs = pd.read_parquet(tmp_path / "sweep" / "runs")  # plain pandas, no store code
    assert len(runs) == 2 and list(runs.columns) == RUN_SCHEMA.names
    row = runs.set_index("trial_id").loc[alloc.trial_id]
    assert row["experiment"] == "alloc" and row["kind"] == "allocation" and row["memory"] == "engram"
    assert row["rho"] == 0.5 and abs(row["rho_achieved"] - alloc.counts.rho) < 1e-12
    assert row["P_tot"] == alloc.counts.p_tot and row["P_sparse"] == alloc.counts.p_sparse
    assert row["n_routed"] == alloc.config.model.n_routed and row["slots"] == alloc.slots
    assert row["compute"] == pytest.approx(alloc.flops_per_token * alloc.tokens)
    assert row["final_val_loss"] == 2.5 and row["status"] == "ok" and pd.isna(row["error"])
    assert pd.isna(runs.set_index("trial_id").loc[mem.trial_id, "rho"])  # no target rho for memory trials
    # Provenance
    versions = json.loads(row["versions"])
    assert versions["torch"] and versions["pandas"] and "ray" in versions and "engram-sweeps" in versions
    assert versions["cpu"] == cpu_model()  # bf16 results can differ across CPUs: every row names its CPU
    assert row["host"] and row["device"] == "cpu" and row["precision"] == "fp32"
    assert row["git_commit"] is None or len(row["git_commit"].removesuffix("-dirty")) == 40
    curves = store.curves()
    assert set(curves["trial_id"]) == {alloc.trial_id, mem.trial_id} and len(curves) == 4
    first = curves[curves["trial_id"] == alloc.trial_id].sort_values("step")
    assert pd.isna(first["val_loss"].iloc[0]) and first["val_loss"].iloc[1] == 2.5


def test_failed_trials_are_rows_but_not_complete_and_a_rerun_replaces_them(tmp_path: Path,
                                                                           trials: list[PlannedTrial]) -> None:
    store = ResultStore(tmp_path / "sweep")
    store_trial(store, trials[0], "failed")
    store_trial(store, trials[1], "diverged")
    store_trial(store, trials[2], "ok")
    runs = store.runs().set_index("trial_id")
    assert runs.loc[trials[0].trial_id, "status"] == "failed"
    assert runs.loc[trials[0].trial_id, "error"] == "RuntimeError: boom"
    assert runs.loc[trials[1].trial_id, "error"] == "non-finite loss at step 2"
    assert store.completed_ids() == {trials[1].trial_id, trials[2].trial_id}

    store_trial(store, trials[0], "ok")  # the retry succeeds
    runs = store.runs()
    assert len(runs) == 3 and runs["trial_id"].is_unique
    assert store.completed_ids() == {t.trial_id for t in trials[:3]}


def test_temp_files_of_a_dead_writer_are_ignored_then_removed(tmp_path: Path, trials: list[PlannedTrial]) -> None:
    store = ResultStore(tmp_path / "sweep")
    store_trial(store, trials[0])
    partial = store.runs_dir / f".{trials[1].trial_id}.parquet.123.tmp"
    partial.write_bytes(b"PAR1 truncated")  # what a SIGKILL mid-write leaves
    (store.curves_dir / f".{trials[1].trial_id}.parquet.123.tmp").write_bytes(b"")
    assert len(store.runs()) == 1 and len(pd.read_parquet(store.runs_dir)) == 1
    assert store.completed_ids() == {trials[0].trial_id}
    assert store.remove_temp_files() == 2
    assert store.temp_files() == [] and len(store.runs()) == 1


def test_bad_rows_are_refused(tmp_path: Path, trials: list[PlannedTrial]) -> None:
    store = ResultStore(tmp_path / "sweep")
    with pytest.raises(ValueError, match="row.status"):
        store.write_trial({"trial_id": "x", "status": "done"}, None)
    with pytest.raises(ValueError, match="unknown columns"):
        store.write_trial({"trial_id": "x", "status": "ok", "loss": 1.0}, None)
    with pytest.raises(ValueError, match="row.trial_id"):
        store.write_trial({"trial_id": "../x", "status": "ok"}, None)
    assert not store.runs_dir.exists()


def test_spec_copy_is_written_beside_the_results(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "sweep")
    store.write_spec("name: s\n")
    store.write_spec("name: s2\n")
    assert store.spec_path.read_text() == "name: s2\n" and store.temp_files() == []


@pytest.mark.slow
def test_reader_sees_only_whole_files_while_a_writer_writes(tmp_path: Path, trials: list[PlannedTrial]) -> None:
    store = ResultStore(tmp_path / "sweep")
    reader = ResultStore(tmp_path / "sweep")
    n_rounds = 15
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for i in range(n_rounds):  # rewrite every trial: replaces existing files too
                for t in trials:
                    store_trial(store, t, loss=3.0 + i)
        except BaseException as err:  # noqa: BLE001 - surfaced below
            errors.append(err)

    writer = threading.Thread(target=write)
    writer.start()
    seen = []
    while writer.is_alive():
        runs = reader.runs()
        assert runs["trial_id"].is_unique and set(runs["status"]) <= {"ok"}
        seen.append(len(runs))
        curves = reader.curves()
        assert curves.groupby("trial_id").size().eq(2).all()  # never a half-written curve
    writer.join()
    assert not errors
    assert seen == sorted(seen)  # rows only ever appear
    assert len(reader.runs()) == len(trials) and set(reader.runs()["final_val_loss"]) == {3.0 + n_rounds - 1}


def truncate(path: Path, keep: int = 40) -> bytes:
    """What a full disk or a copy cut short leaves: the file's first bytes only. Returns what was there."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return data


def test_a_damaged_file_is_skipped_named_and_moved_aside_never_deleted(tmp_path: Path,
                                                                       trials: list[PlannedTrial]) -> None:
    store = ResultStore(tmp_path / "sweep")
    for t in trials[:3]:
        store_trial(store, t)
    bad_row, bad_curve = trials[0].trial_id, trials[1].trial_id
    truncate(store.runs_dir / f"{bad_row}.parquet")
    truncate(store.curves_dir / f"{bad_curve}.parquet")

    # Readers go on without the damaged files; damaged() names them with pyarrow's reason.
    assert set(store.runs()["trial_id"]) == {trials[1].trial_id, trials[2].trial_id}
    assert set(store.curves()["trial_id"]) == {trials[0].trial_id, trials[2].trial_id}
    assert store.completed_ids() == {trials[1].trial_id, trials[2].trial_id}
    damaged = store.damaged()
    assert sorted(d.path.name for d in damaged) == sorted([f"{bad_row}.parquet", f"{bad_curve}.parquet"])
    assert all(d.reason for d in damaged)

    # Moving aside takes both files of each damaged trial (a row never points at a missing curve), keeps bytes.
    kept = {p: p.read_bytes() for p in (store.runs_dir / f"{bad_row}.parquet",
                                        store.curves_dir / f"{bad_row}.parquet",
                                        store.runs_dir / f"{bad_curve}.parquet",
                                        store.curves_dir / f"{bad_curve}.parquet")}
    moved = store.move_damaged_aside()
    assert len(moved) == 4 and all(p.is_relative_to(store.damaged_dir) for p in moved)
    assert {p.read_bytes() for p in moved} == set(kept.values())
    assert store.damaged() == [] and store.completed_ids() == {trials[2].trial_id}
    assert set(store.curves()["trial_id"]) == {trials[2].trial_id}

    # A second damaged copy of the same trial does not overwrite the first.
    store_trial(store, trials[0])
    truncate(store.runs_dir / f"{bad_row}.parquet", keep=10)
    (again,) = [p for p in store.move_damaged_aside() if p.parent.name == "runs"]
    assert again.name == f"{bad_row}.1.parquet" and (store.damaged_dir / "runs" / f"{bad_row}.parquet").exists()


def test_a_store_of_only_damaged_files_reads_as_empty_with_the_contract_columns(tmp_path: Path,
                                                                                trials: list[PlannedTrial]) -> None:
    store = ResultStore(tmp_path / "sweep")
    store_trial(store, trials[0])
    truncate(store.runs_dir / f"{trials[0].trial_id}.parquet")
    assert list(store.runs().columns) == RUN_SCHEMA.names and store.runs().empty
    assert len(store.damaged()) == 1
