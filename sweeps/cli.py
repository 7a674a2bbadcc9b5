"""The `engram-sweep` command: plan / run / status / report / train.

    engram-sweep plan SPEC [--json]          print every trial (params, tokens, FLOPs, ETA, stored?) without running
    engram-sweep run SPEC [--address ADDR]   run the sweep on Ray (embedded local Ray, or ADDR / $RAY_ADDRESS)
    engram-sweep status RESULTS_DIR|SPEC     progress from the store alone (safe while a sweep runs)
    engram-sweep report RESULTS_DIR          fits, plots and report.md (analysis.report.write_report)
    engram-sweep train --config TRIAL.yaml   one trial in this process, progress lines, then the result

A mistake in the user's input (spec, trial config, paths, a trial no machine can hold, a Ray cluster that cannot
be joined) prints one line on stderr naming the field or file and exits with status 2; nothing is written.
Damaged store files are named on one warning line by every command; `run` moves them aside (docs/reliability.md).
`RAY_ADDRESS` is read here, at the boundary, and nowhere else.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from analysis.contract import Damaged
    from engram.trial import TrialResult
    from sweeps.launcher import LaunchSummary
    from sweeps.plan import PlannedTrial, Throughput
    from sweeps.spec import SweepSpec
    from sweeps.store import ResultStore

USER_ERROR = 2
INTERRUPTED = 130   # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
PROG = "engram-sweep"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from engram.accounting import AllocationError
    from engram.config import ConfigError
    from engram.data import DataError
    from sweeps.spec import SpecError

    try:
        for dest, name in _PATH_ARGS.items():
            if getattr(args, dest, None) == "":
                raise UserError(f"{name}: expected a path, got an empty string")
        return args.func(args)
    except (SpecError, ConfigError, DataError, AllocationError, UserError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return USER_ERROR
    except BrokenPipeError:   # `plan ... | head`: the reader left; say nothing more, and write nothing at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as err:
        # Ray could not be joined: the launcher (imported by `run` alone, it imports Ray) says why in one line.
        launcher = sys.modules.get("sweeps.launcher")
        if launcher is None or not isinstance(err, launcher.ClusterError):
            raise
        print(f"{PROG}: error: {args.address_source}: {err}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return INTERRUPTED


class UserError(ValueError):
    """A mistake in the command line (a missing folder, a wrong kind of file); one line, exit status 2."""


# The arguments that name a file or folder (by dest, named as the usage line shows them). Path("") is ".", so an empty
# one (`--out ""`, an unset shell variable) would quietly mean the current folder: it is refused instead.
_PATH_ARGS = {"spec": "spec", "target": "target", "results_dir": "results_dir", "out": "--out", "config": "--config",
              "checkpoint_dir": "--checkpoint-dir", "cache_dir": "--cache-dir", "storage": "--storage"}


def _path(text: str) -> Path | str:
    """argparse type of the path arguments: a Path, but an empty string stays one (for `main` to refuse)."""
    return Path(text) if text else text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Scaling-law sweeps of Engram + MoE models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="print every trial of a sweep without running anything")
    p.add_argument("spec", type=_path, help="sweep spec (YAML)")
    p.add_argument("--json", action="store_true",
                   help="print every grid trial's planned row (params, tokens, FLOPs, lookups per row) as one JSON "
                        "array instead of the table")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run a sweep on Ray, skipping trials already complete in the store")
    p.add_argument("spec", type=_path, help="sweep spec (YAML)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--storage", default=None, metavar="URI_OR_PATH",
                   help="where Ray Tune keeps trial checkpoints: a shared folder or s3:// / gs:// URI on a "
                        "multi-node cluster (default: results/<sweep>/.tune on the driver)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="summarise a sweep's progress from its results store")
    p.add_argument("target", type=_path, help="results folder (results/<sweep>) or the sweep spec (YAML)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("report", help="fit, plot and write report.md for a results folder")
    p.add_argument("results_dir", type=_path)
    p.add_argument("--out", type=_path, default=None, help="output folder (default: RESULTS_DIR/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("train", help="train one trial from a TrialConfig YAML, in this process")
    p.add_argument("--config", type=_path, required=True, help="trial config (YAML: model, data, train)")
    p.add_argument("--checkpoint-dir", type=_path, default=None, help="resume from / save checkpoints here")
    p.add_argument("--cache-dir", type=_path, default=None, help="token cache folder (default: engram.data's)")
    p.set_defaults(func=cmd_train)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Commands


def cmd_plan(args: argparse.Namespace) -> int:
    from sweeps.plan import calibrate_throughput, plan_sweep, plan_table
    from sweeps.spec import load_spec
    from sweeps.store import COMPLETE_STATUSES, ResultStore

    spec = load_spec(args.spec)
    check_store_location(spec.store_dir)
    store = ResultStore(spec.store_dir)
    warn_damaged(store)
    runs = store.runs()
    throughput = calibrate_throughput(spec, runs)
    trials = plan_sweep(spec, throughput=throughput)
    if getattr(args, "json", False):
        import json

        print(json.dumps([t.as_row() for t in trials], indent=1))
        return 0
    complete = runs[runs["status"].isin(COMPLETE_STATUSES)]
    search_done = complete.groupby("experiment")["trial_id"].nunique().to_dict()
    for line in spec_conflicts(spec, store):
        print(f"{PROG}: warning: {line}: `run` refuses to add this spec's trials to that store", file=sys.stderr)
    print(f"sweep {spec.name}: {len(spec.experiments)} experiment(s), store {spec.store_dir}")
    print(plan_table(spec, trials, set(complete["trial_id"]), throughput, search_done))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from sweeps.footprint import check_trials_fit, machine_memory_bytes
    from sweeps.plan import calibrate_throughput, plan_sweep
    from sweeps.spec import dump_spec, load_spec
    from sweeps.store import ResultStore, StoreUnavailable

    spec = load_spec(args.spec)
    # An empty --address (an unset shell variable) is refused by the check, not read as "no address".
    address = args.address if args.address is not None else (os.environ.get("RAY_ADDRESS") or None)
    args.address_source = "--address" if args.address is not None else "RAY_ADDRESS"
    if address is not None:
        check_ray_address(address, args.address_source)
    check_store_location(spec.store_dir)
    store = ResultStore(spec.store_dir)
    conflicts = spec_conflicts(spec, store)
    if conflicts:
        more = f"; {len(conflicts) - 1} more field(s) differ" if len(conflicts) > 1 else ""
        raise UserError(f"{args.spec}: {conflicts[0]} ({spec.store_dir} holds trials of another spec: give this one "
                        f"its own name or results_dir{more})")
    throughput = calibrate_throughput(spec, store.runs())
    trials = plan_sweep(spec, throughput=throughput)
    if address is None:  # a cluster's nodes are checked by the launcher once it has joined
        check_trials_fit(spec, trials + search_probes(spec, throughput), machine_memory_bytes(),
                         "this machine's")
        check_gpu_here(spec)
    # Nothing is written before this point, so a bad spec leaves no trace. Under the store's writer lock this
    # driver is the store's only writer: leftovers of a killed predecessor can go, and damaged files move aside
    # (their trials run again).
    from sweeps.launcher import launch  # imports Ray: only once the spec is known to be good
    try:
        with store.writer_lock():
            store.remove_temp_files()
            moved = store.move_damaged_aside()
            if moved:
                print(f"{PROG}: moved {len(moved)} damaged file(s) aside into {store.damaged_dir} (their trials run "
                      f"again): {', '.join(p.name for p in moved)}", file=sys.stderr)
            summary = launch(spec, trials, store, address=address, log_path=store.root / "ray.log",
                             storage_path=_storage(args.storage), spec_text=dump_spec(spec))
    except StoreUnavailable as err:
        raise UserError(str(err)) from None
    print(summary_text(summary, store))
    if summary.interrupted:
        return INTERRUPTED
    # Failed trials are recorded and the rest completed, but the sweep is not whole: say so in the exit status.
    return 0 if summary.n_failed == 0 and summary.n_unrecorded == 0 else 1


def check_gpu_here(spec: SweepSpec) -> None:
    """An embedded Ray trains on this machine: a spec that needs a GPU is refused here when it has none (else
    every trial would fail at start, or wait for a GPU that never comes)."""
    import torch

    if torch.cuda.is_available():
        return
    for field, needs in (("train.device", spec.train.device == "cuda"),
                         ("resources.gpus_per_trial", spec.resources.gpus_per_trial > 0)):
        if needs:
            raise UserError(f"{field}: asks for a GPU, but this machine has no CUDA device (the embedded Ray "
                            f"trains here; join a GPU cluster with --address)")


def spec_conflicts(spec: SweepSpec, store: ResultStore) -> list[str]:
    """How `spec` differs from the spec stored with the store's trials in what defines them (empty: no stored
    spec, no trials, or no difference; sweeps.spec.stored_spec_conflicts)."""
    from analysis.contract import read_spec
    from sweeps.spec import stored_spec_conflicts

    stored, _ = read_spec(store.root)   # a damaged spec.yaml says nothing about the trials: {}, no conflict
    if not stored or store.runs().empty:
        return []
    return stored_spec_conflicts(spec, stored)


def make_folder(path: Path, what: str) -> None:
    """Create the folder `path` (and its parents) or say in one line why it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = "a file is in the way" if isinstance(err, (FileExistsError, NotADirectoryError)) else \
            (err.strerror or str(err))
        raise UserError(f"{what}: cannot create the folder {path} ({reason})") from None


def _storage(storage: str | None) -> str | None:
    """Tune wants an absolute local path (URIs such as s3://... pass as they are)."""
    if storage is None or "://" in storage:
        return storage
    return str(Path(storage).resolve())


# An HTTP/2 client's connection preface: the magic string, then an empty SETTINGS frame (RFC 9113, 3.4).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def check_ray_address(address: str, source: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a head that cannot be reached: ray.init itself retries for minutes without a word, also at an
    open port where no Ray head listens.

    Only plain host:port addresses are checked ("auto", "local" and ray:// client addresses go to Ray as they are);
    anything else is refused here, before Ray is asked. The port must accept a TCP connection and answer as a gRPC
    server, which Ray's GCS is: to an HTTP/2 preface it replies with a SETTINGS frame first. That handshake needs no
    token, so a head with token auth passes (its refusal of a wrong token is the launcher's to report). With
    RAY_USE_TLS the GCS wants a TLS handshake instead, and only the connection is checked.
    """
    if address in ("auto", "local"):
        return
    scheme, _, rest = address.rpartition("://")
    host, sep, port = rest.rpartition(":")
    if scheme not in ("", "ray") or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{source}: expected auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    if scheme:
        return
    try:  # an IPv6 head is written [HOST]:PORT
        sock = socket.create_connection((host.removeprefix("[").removesuffix("]"), int(port)), timeout=timeout_s)
    except OSError as err:
        raise UserError(f"{source}: no Ray head answers at {address} ({err.strerror or err})") from None
    with sock:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return
        try:
            sock.sendall(_H2_PREFACE)
            with sock.makefile("rb") as reply:
                frame = reply.read(9)   # a frame header: length (3 bytes), type, flags, stream id (4 bytes)
        except OSError:
            frame = b""
    if len(frame) < 9 or frame[3] != 0x4 or frame[5:9] != bytes(4):
        raise UserError(f"{source}: no Ray head answers at {address}: the port is open but does not speak Ray's "
                        f"GCS protocol (gRPC); give the head's GCS port (6379 unless `ray start --port` set another)")


def search_probes(spec: SweepSpec, throughput: Throughput) -> list[PlannedTrial]:
    """The largest-table end (rho = 0, else the smallest realisable rho) of each search experiment, for checks."""
    from engram.accounting import AllocationError
    from sweeps.plan import plan_search_trial

    probes = []
    for exp in spec.experiments:
        if exp.kind == "search":
            for rho in (0.0, 0.25, 0.5, 0.75, 1.0):
                try:
                    probes.append(plan_search_trial(spec, exp.name, rho, exp.seed, throughput=throughput))
                    break
                except AllocationError:
                    continue
    return probes


def check_store_location(store_dir: Path) -> None:
    """The store folder, or the nearest of its parents that exists, must be a folder (not a file)."""
    for p in (store_dir, *store_dir.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"results_dir: {p} is a file, expected a folder (results go to {store_dir})")
            return


def warn_damaged(store: ResultStore) -> list[Damaged]:
    """One warning line naming the store's damaged files (skipped by every reader); returns them."""
    damaged = store.damaged()
    if damaged:
        shown = "; ".join(f"{d.path.relative_to(store.root)} ({d.reason})" for d in damaged[:3])
        more = f"; and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        print(f"{PROG}: warning: {len(damaged)} damaged file(s) skipped, their trials count as not stored: "
              f"{shown}{more}; `{PROG} run` moves them aside into {store.damaged_dir}", file=sys.stderr)
    return damaged


def cmd_status(args: argparse.Namespace) -> int:
    from sweeps.store import ResultStore

    target: Path = args.target
    spec = None
    if target.is_file():
        from sweeps.spec import load_spec

        spec = load_spec(target)
        root = spec.store_dir
        check_store_location(root)
    elif target.is_dir():
        root = target
    else:
        raise UserError(f"{target}: no such results folder or spec file")
    store = ResultStore(root)
    warn_damaged(store)
    print(status_text(store, spec))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.contract import RUNS_DIR, read_spec
    from analysis.report import write_report
    from sweeps.store import ResultStore

    if args.results_dir.exists() and not args.results_dir.is_dir():
        raise UserError(f"{args.results_dir}: a file, expected a results folder (results/<sweep>)")
    if not args.results_dir.is_dir():
        raise UserError(f"{args.results_dir}: no such results folder")
    if not (args.results_dir / RUNS_DIR).is_dir():
        raise UserError(f"{args.results_dir}: no {RUNS_DIR}/ folder (not a results folder, or no trial finished yet)")
    store = ResultStore(args.results_dir)
    damaged = warn_damaged(store)
    if store.runs().empty:
        raise UserError(f"{store.runs_dir}: no readable trial rows"
                        + (f" ({len(damaged)} damaged)" if damaged else " (no trial finished yet)")
                        + ": nothing to report")
    if args.out is not None:
        make_folder(args.out, "--out")
    _, why = read_spec(store.root)
    if why:
        print(f"{PROG}: warning: {store.spec_path}: unreadable ({why}); the report goes on without the sweep's "
              f"definitions", file=sys.stderr)
    path = write_report(args.results_dir, args.out)
    print(path)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from engram.trial import format_progress, keep_large_buffers_in_heap, run_trial
    from sweeps.spec import load_trial_config

    config = load_trial_config(args.config)
    for folder, option in ((args.checkpoint_dir, "--checkpoint-dir"), (args.cache_dir, "--cache-dir")):
        if folder is not None:
            make_folder(folder, option)
    keep_large_buffers_in_heap()
    result = run_trial(config, cache_dir=args.cache_dir, checkpoint_dir=args.checkpoint_dir,
                       on_progress=lambda p: print(format_progress(p), flush=True))
    print(result_text(result))
    return 0 if result.status == "ok" else 1


# ---------------------------------------------------------------------------------------------------------------
# Text


def _loss(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def result_text(result: TrialResult) -> str:
    """A finished trial in a few lines (the end of `engram-sweep train`)."""
    c = result.counts
    lines = [f"status {result.status}" + (f": {result.error}" if result.error else ""),
             f"val loss final {_loss(result.final_val_loss)} best {_loss(result.best_val_loss)} | "
             f"train loss {_loss(result.train_loss)}",
             f"steps {result.steps} | tokens {result.tokens} | compute {result.compute:.3e} FLOPs "
             f"({result.flops_per_token:.4g} per token)",
             f"P_tot {c.p_tot} | P_act {c.p_act} | P_sparse {c.p_sparse} | P_engram {c.p_engram} | rho {c.rho:.3f}",
             f"wall {result.wall_seconds:.1f}s | {result.tokens_per_second:.0f} tok/s | device {result.device}"]
    return "\n".join(lines)


def summary_text(summary: LaunchSummary, store: ResultStore) -> str:
    """The end of `engram-sweep run` (a sweeps.launcher.LaunchSummary)."""
    from engram.util import format_duration

    ratio = summary.overhead_ratio
    counts = (f"{summary.n_ok} ok, {summary.n_diverged} diverged, {summary.n_failed} failed"
              + (f", {summary.n_unrecorded} unrecorded" if summary.n_unrecorded and not summary.interrupted else ""))
    if summary.interrupted:
        first = (f"interrupted: {summary.n_recorded} of {summary.n_requested} trial(s) recorded ({counts}), "
                 f"{summary.n_skipped} already complete; run the same command again for the rest (complete trials "
                 f"are not run again)")
    else:
        first = f"{summary.n_requested} trial(s) run, {summary.n_skipped} already complete: {counts}"
    lines = [first,
             f"wall {format_duration(summary.wall_seconds)} ({summary.n_slots} trial(s) at once"
             + (f", scheduling overhead {ratio:.2f}x the ideal" if ratio is not None else "") + ")",
             f"results in {store.root}; Ray's log in {summary.log_path}"]
    if summary.n_failed:
        lines.append(f"failed trials are rows with their error: `engram-sweep status {store.root}`; "
                     f"a re-run retries them")
    return "\n".join(lines)


def status_text(store: ResultStore, spec: SweepSpec | None = None) -> str:
    """Per-experiment progress from the store; with the spec, also how many planned trials remain."""
    from analysis.contract import COMPLETE_STATUSES, STATUSES
    from engram.util import format_table
    from sweeps.plan import plan_sweep
    from sweeps.spec import SearchExperiment

    runs = store.runs()
    lines = [f"store {store.root}: {len(runs)} trial row(s)"]
    experiments = list(dict.fromkeys(runs["experiment"].tolist()))
    planned: dict[str, set[str]] = {}
    if spec is not None:
        from sweeps.plan import Throughput

        # Only ids are needed: a fixed throughput skips the calibration.
        for t in plan_sweep(spec, throughput=Throughput(1e9, 0.0, "unused")):
            planned.setdefault(t.experiment, set()).add(t.trial_id)
        experiments = list(dict.fromkeys([e.name for e in spec.experiments] + experiments))
    header = ["experiment", "ok", "diverged", "failed", "planned", "remaining", "best val loss"]
    rows = []
    for name in experiments:
        sub = runs[runs["experiment"] == name]
        n = {s: int((sub["status"] == s).sum()) for s in STATUSES}
        complete_ids = set(sub.loc[sub["status"].isin(COMPLETE_STATUSES), "trial_id"])
        n_planned, remaining = "-", "-"
        if spec is not None:
            exp = next((e for e in spec.experiments if e.name == name), None)
            if isinstance(exp, SearchExperiment):
                n_planned, remaining = str(exp.n_trials), str(max(0, exp.n_trials - len(complete_ids)))
            elif exp is not None:
                ids = planned.get(name, set())
                n_planned, remaining = str(len(ids)), str(len(ids - complete_ids))
            else:
                n_planned = "not in spec"
        ok = sub[sub["status"] == "ok"].dropna(subset=["best_val_loss"])
        best = "-"
        if len(ok):
            r = ok.loc[ok["best_val_loss"].idxmin()]
            where = f"slots={r['slots']}" if r["kind"] == "memory" else f"rho={r['rho']:.3g}"
            best = f"{r['best_val_loss']:.4f} ({r['memory']}, {where}, seed {r['seed']})"
        rows.append([name, str(n["ok"]), str(n["diverged"]), str(n["failed"]), n_planned, remaining, best])
    if not rows:
        lines.append("no trials stored yet")
        return "\n".join(lines)
    lines += format_table(header, rows)
    if spec is not None:
        left = sum(int(r[5]) for r in rows if r[5].isdigit())
        lines.append(f"{left} planned trial(s) remain" if left else "all planned trials complete")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
