"""Issue 7 measurements: one default-size trial per case, printing its loss and diagnostics as one JSON line.

    PYTHONPATH=$PWD nice -n 10 python -m scripts.measure_fairness [--spec SPEC] CASE [CASE ...]

A CASE is `name:key=value,key=value` over: rho (allocation trial of the default sweep at P_tot/P_act 4),
slots / memory (memory-experiment trial on the default backbone; memory engram | overencoding | none), seed,
balance_rate, travel (model.balance_travel, or none), update=proportional (experiment only: bias step
proportional to the clipped relative load error), init_std, lr_mult, flops (default 2e12), perrow=1 (also print
the mean RMS update of rows binned by their reads). Uses the default sweep's model, data and train settings
(sweep.yaml, or --spec SPEC; a `rho` case needs a search experiment in it, whose P_tot it uses), one thread.
The numbers these gave are in LOG.md (2026-11-30, issue 7), measured on the default of that day (P_tot/P_act 4,
with a search experiment): `git show 4fb2401:sweep.yaml` is that spec.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import torch

from engram.trial import keep_large_buffers_in_heap, run_trial
from sweeps.plan import Throughput, plan_search_trial, plan_sweep
from sweeps.sizing import memory_for_slots
from sweeps.spec import load_spec


def _proportional_update(self) -> None:
    """Experiment only: bias step proportional to the clipped relative load error (instead of its sign)."""
    with torch.no_grad():
        self.eval_counts.zero_()
        if int(self.counts.sum()) == 0:
            return
        load_E = self.counts.float()
        err_E = ((load_E.mean() - load_E) / load_E.mean()).clamp(-1, 1)
        self.bias += self.balance_rate * (err_E - err_E.mean())
        self.counts.zero_()


def _run_per_row(config):
    """run_trial's work, keeping the trial object to print, per read-count bin, the rows' mean RMS update
    relative to their init RMS (one JSON line per bin)."""
    import numpy as np

    from engram.config import RESULTS_VERSION, config_hash
    from engram.trial import _Trial, resolve_device

    device = resolve_device(config.train.device)
    trial = _Trial(config, device, config_hash(config, f"v{RESULTS_VERSION}"), None, None, None, None)
    result = trial.run()
    usage = trial.usage
    for module, reads, w0 in zip(usage.modules, usage.reads, usage.init):
        w = module.tables.table.weight.detach().cpu()
        rel = ((w - w0).square().mean(1).sqrt() / w0.square().mean(1).sqrt()).numpy()
        n = reads.cpu().numpy()
        edges = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 1 << 40]
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = (n >= lo) & (n < hi)
            if sel.any():
                print(json.dumps({"bin": [lo, hi], "rows": int(sel.sum()), "reads_share": float(n[sel].sum() / n.sum()),
                                  "rel_update_mean": float(rel[sel].mean()),
                                  "rel_update_median": float(np.median(rel[sel]))}), flush=True)
    return result


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    spec_path = "sweep.yaml"
    if argv[0] == "--spec":
        spec_path, argv = argv[1], argv[2:]
    torch.set_num_threads(1)
    keep_large_buffers_in_heap()
    spec = load_spec(spec_path)
    searches = [e.name for e in spec.experiments if e.kind == "search"]
    for case in argv:
        name, _, rest = case.partition(":")
        kw = dict(item.split("=") for item in rest.split(",") if item)
        seed = int(kw.get("seed", 0))
        flops = float(kw.get("flops", 2e12))
        if "rho" in kw:
            if not searches:
                sys.exit(f"measure_fairness: {spec_path}: a rho case needs a search experiment in the spec")
            trial = plan_search_trial(spec, searches[0], float(kw["rho"]), seed, throughput=Throughput(1e9, 0, "-"))
            config = trial.config
            if flops != 2e12:
                config = dataclasses.replace(config, train=dataclasses.replace(
                    config.train, tokens=int(config.train.tokens * flops / 2e12)))
        else:
            trials = [t for t in plan_sweep(spec, throughput=Throughput(1e9, 0, "-")) if t.experiment == "memory"]
            config = trials[0].config
            memory = memory_for_slots(spec.model, int(float(kw.get("slots", 1e5))), kw.get("memory", "engram"))
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, memory=memory),
                                         train=dataclasses.replace(config.train, seed=seed))
        model, train = config.model, config.train
        if kw.get("update") == "proportional":
            from engram.moe import MoE
            MoE.update_bias = _proportional_update
        if "travel" in kw:
            model = dataclasses.replace(model, balance_travel=None if kw["travel"] == "none" else float(kw["travel"]))
        if "balance_rate" in kw:
            model = dataclasses.replace(model, balance_rate=float(kw["balance_rate"]))
        if "init_std" in kw:
            model = dataclasses.replace(model, memory=dataclasses.replace(model.memory,
                                                                          table_init_std=float(kw["init_std"])))
        if "lr_mult" in kw:
            train = dataclasses.replace(train, engram_lr_mult=float(kw["lr_mult"]))
        config = dataclasses.replace(config, model=model, train=train)
        t0 = time.perf_counter()
        if kw.get("perrow"):
            result = _run_per_row(config)
        else:
            result = run_trial(config)
        print(json.dumps({"case": name, **kw, "val": result.final_val_loss, "tokens": result.tokens,
                          "steps": result.steps, "n_routed": model.n_routed, "slots": model.memory.slots,
                          "seconds": round(time.perf_counter() - t0, 1), **result.diagnostics}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
