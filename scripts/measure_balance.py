"""Router-balance screens on the default sweep's allocation trials: one trial per case, one JSON line each.

    PYTHONPATH=$PWD nice -n 19 python -m scripts.measure_balance CASE [CASE ...]

A CASE is `name:key=value,...` over: rho (an allocation rho of sweep.yaml, default 1.0), seed (0), flops (the
spec's budget, 4e12; the experiment's tokens scale with it), aux (model.balance_aux, or none), travel
(model.balance_travel, or none), rate (model.balance_rate), moments (model.balance_moments, or none), and the
experiment-only variants below, which the library does not keep (LOG.md, 2026-11-30, "router balance, third
pass": each balanced worse or no better than the default; commonmode is the first half of balance_moments):

  noise=S[,noise_frac=F]  Gaussian noise of std S on the selection scores in training (Shazeer et al. 2017's
                          noisy top-k), falling linearly to zero at F (0.5) of the trial's steps
  rinit=S                 router weights initialised N(0, S) instead of N(0, 0.02)
  schedule=linear         bias step 2 x the effective rate at step 1, falling linearly to zero (same travel)
  update=rprop            per-expert sign steps that grow x1.2 while their sign holds and halve when it flips
  commonmode=B            B x the variance across experts of the batch-mean router logit, added to the loss

Every other setting is the current sweep.yaml's (since D3 it sets moments 10 and travel 0.25; the LOG's screens ran
on sweep.yaml at a3a1f28, travel 1 and no moments: pass `moments=none,travel=1` to repeat them). One thread.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from contextlib import contextmanager

import torch

import engram.trial
from engram.moe import MoE
from engram.trial import keep_large_buffers_in_heap, run_trial
from sweeps.plan import Throughput, plan_sweep
from sweeps.spec import load_spec


def _rprop_update(self: MoE) -> None:
    with torch.no_grad():
        self.eval_counts.zero_()
        if int(self.counts.sum()) == 0:
            return
        load_E = self.counts.float()
        sign_E = torch.sign(load_E.mean() - load_E)
        if not hasattr(self, "step_E"):
            self.step_E, self.last_E = torch.full_like(load_E, self.balance_rate), torch.zeros_like(load_E)
        agree_E = sign_E * self.last_E
        self.step_E = torch.where(agree_E > 0, self.step_E * 1.2,
                                  torch.where(agree_E < 0, self.step_E * 0.5, self.step_E))
        self.step_E.clamp_(self.balance_rate / 64, 4 * self.balance_rate)
        delta_E = self.step_E * sign_E
        self.bias += delta_E - delta_E.mean()
        self.last_E = sign_E
        self.counts.zero_()


@contextmanager
def variant(kw: dict[str, str]):
    """Patch MoE / the trial for the case's experiment-only variants; restore on exit."""
    saved = {name: getattr(MoE, name) for name in ("select", "update_bias", "forward")}
    saved_rate = engram.trial.set_balance_rate
    base_update = _rprop_update if kw.get("update") == "rprop" else MoE.update_bias
    noise, noise_frac = float(kw.get("noise", 0)), float(kw.get("noise_frac", 0.5))

    def set_balance_rate(model, total_steps):  # the trial's length reaches every MoE layer here
        rate = saved_rate(model, total_steps)
        for moe in model.moe_layers():
            moe.total_steps, moe.step, moe.base_rate = total_steps, 0, rate
            if "rinit" in kw:
                torch.nn.init.normal_(moe.router.weight, std=float(kw["rinit"]))
        return rate

    def update_bias(self):
        self.step += 1  # optimiser steps done
        if kw.get("schedule") == "linear":
            self.balance_rate = 2 * self.base_rate * max(0.0, 1 - (self.step - 1) / self.total_steps)
        base_update(self)

    def select(self, scores_TE):
        if not (self.training and noise):
            return saved["select"](self, scores_TE)
        std = noise * max(0.0, 1 - self.step / (noise_frac * self.total_steps))
        expert_TK, _ = saved["select"](self, scores_TE.detach() + std * torch.randn_like(scores_TE))
        weight_TK = scores_TE.gather(1, expert_TK)  # the noise moves the selection only, not the weights
        return expert_TK, weight_TK / weight_TK.sum(dim=-1, keepdim=True)

    def forward(self, x_BTD):
        y_BTD = saved["forward"](self, x_BTD)
        if self.training and "commonmode" in kw:
            with torch.autocast(x_BTD.device.type, enabled=False):
                z_TE = self.router(x_BTD.reshape(-1, x_BTD.shape[-1]).float())
            penalty = float(kw["commonmode"]) * z_TE.mean(0).var()
            self.aux_loss = penalty if self.aux_loss is None else self.aux_loss + penalty
        return y_BTD

    engram.trial.set_balance_rate = set_balance_rate
    MoE.update_bias, MoE.select, MoE.forward = update_bias, select, forward
    try:
        yield
    finally:
        engram.trial.set_balance_rate = saved_rate
        for name, fn in saved.items():
            setattr(MoE, name, fn)


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    torch.set_num_threads(1)
    keep_large_buffers_in_heap()
    trials = [t for t in plan_sweep(load_spec("sweep.yaml"), throughput=Throughput(1e9, 0, "-"))
              if t.experiment == "allocation"]
    for case in argv:
        name, _, rest = case.partition(":")
        try:
            kw = dict(item.split("=", 1) for item in rest.split(",") if item)
            rho, seed = float(kw.get("rho", 1.0)), int(kw.get("seed", 0))
        except ValueError:
            sys.exit(f"measure_balance: {case!r}: expected name:key=value,... (see --help)")
        matches = [t for t in trials if abs(t.rho - rho) < 1e-9 and t.seed == seed]
        if not matches:
            sys.exit(f"measure_balance: no allocation trial at rho={rho}, seed={seed} in sweep.yaml")
        config = matches[0].config
        model, train = config.model, config.train
        if "aux" in kw:
            model = dataclasses.replace(model, balance_aux=None if kw["aux"] == "none" else float(kw["aux"]))
        if "moments" in kw:
            model = dataclasses.replace(model, balance_moments=None if kw["moments"] == "none"
                                        else float(kw["moments"]))
        if "rate" in kw:
            model = dataclasses.replace(model, balance_rate=float(kw["rate"]))
        if "travel" in kw:
            model = dataclasses.replace(model, balance_travel=None if kw["travel"] == "none" else float(kw["travel"]))
        if "flops" in kw:  # the experiment trains every rho on the same tokens: scale them with the budget
            train = dataclasses.replace(train, tokens=int(train.tokens * float(kw["flops"]) / matches[0].budget))
        config = dataclasses.replace(config, model=model, train=train)
        t0 = time.perf_counter()
        with variant(kw):
            result = run_trial(config)
        print(json.dumps({"case": name, **kw, "val": round(result.final_val_loss, 4), "steps": result.steps,
                          "n_routed": model.n_routed, "seconds": round(time.perf_counter() - t0, 1),
                          **{k: v for k, v in result.diagnostics.items() if k.startswith(("expert", "balance"))}}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
