"""Router-balance screens on the default sweep's allocation trials: one trial per case, one JSON line each.

    PYTHONPATH=$PWD nice -n 19 python -m scripts.measure_balance CASE [CASE ...]

A CASE is `name:key=value,...` over: rho (an allocation rho of sweep.yaml, default 1.0), seed (0; a seed the sweep
does not run trains its trial with that seed, as a sweep listing it would), flops (the
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
  ema=D                   the bias steps by the sign of an average of the loads (EMA, decay D), not this batch's
  update=prop[,gain=G]    the bias steps by G (4) x rate x the relative load error (clipped to +-1), not its sign
  tailanneal=F            the bias rate falls linearly to a tenth of itself over the last F of the steps
  ("router balance, fourth pass": none balanced the final bias better)

and `probe=1`, which adds, worst layer's max/mean load of the trained model: on the validation windows under the
final bias and under the mean bias of the last 25 steps, without the stdlib split's codec tables (encodings/*), on
256 and 1,024 random training windows; of one training batch (mean of the last 25); and `train_tail_max_mean`,
the training tokens of the last 25 steps under the bias as it moved (what `expert_train_load_max` records).
With `probe=1,solve=N` it then solves the bias on 256 other training windows (N proportional steps) and reports
the load of those, of the validation windows and of 1,024 training windows under it, and the validation loss change.
With `probe=1,docsets=K` it also measures, under the final bias (and the solved one with `solve`), K random sets of
as many training documents as the validation split holds, each read through the validation's windows (eval_tokens
spread evenly over the set's documents joined): min / median / max of the worst layer's max/mean over the K sets
and the share above 1.5. That says whether the validation split's load is what any held-out set of its size gives
or a property of its own documents.

Every other setting is the current sweep.yaml's (since D3 it sets moments 10 and travel 0.25; the LOG's screens ran
on sweep.yaml at a3a1f28, travel 1 and no moments: pass `moments=none,travel=1` to repeat them). One thread.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch

import engram.trial
from engram.moe import MoE
from engram.trial import run_trial
from scripts.measure_val_groups import codec_windows, sweep_trials


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
        CAPTURED["model"] = model
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
        if self.step > self.total_steps - TAIL_STEPS:  # the training batches' load over the last steps
            tail = getattr(self, "tail_counts", None)
            self.tail_counts = self.counts.clone() if tail is None else tail + self.counts
            self.tail_bias = getattr(self, "tail_bias", []) + [self.bias.clone()]  # the bias each batch was routed by
            batch_load = self.counts.double() / (float(self.counts.sum()) / self.n_routed)
            self.tail_batch_max = getattr(self, "tail_batch_max", []) + [float(batch_load.max())]
        if "tailanneal" in kw:  # the rate falls linearly to a tenth over the last F of the steps
            frac = float(kw["tailanneal"])
            left = (self.total_steps - self.step) / (frac * self.total_steps)
            self.balance_rate = self.base_rate * (0.1 + 0.9 * min(1.0, max(0.0, left)))
        if "ema" in kw or kw.get("update") == "prop":
            # ema=D: the load is an average of the last ~1 / (1 - D) batches' loads (D = 0: this batch's);
            # update=prop,gain=G: the step is G x rate x the relative load error (clipped to +-1), not its sign
            with torch.no_grad():
                decay = float(kw.get("ema", 0))
                ema = getattr(self, "ema_load", None)
                load_E = self.counts.double() * (self.n_routed / max(int(self.counts.sum()), 1))
                self.ema_load = load_E if ema is None else decay * ema + (1 - decay) * load_E
                self.eval_counts.zero_()
                if kw.get("update") == "prop":
                    delta_E = float(kw.get("gain", 4)) * (1 - self.ema_load).clamp(-1, 1).float()
                else:
                    delta_E = torch.sign(1 - self.ema_load).float()
                self.bias += self.balance_rate * (delta_E - delta_E.mean())
                self.counts.zero_()
            return
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


TAIL_STEPS = 25
CAPTURED: dict = {}  # the last trial's model (set_balance_rate sees it first)


def _tail_load(model) -> float | None:
    """Worst MoE layer's max/mean of the training batches' counts summed over the last TAIL_STEPS steps."""
    worst = None
    for moe in model.moe_layers():
        tail = getattr(moe, "tail_counts", None)
        if tail is not None and int(tail.sum()) > 0:
            load = tail.double() / (float(tail.sum()) / moe.n_routed)
            worst = max(worst or 0.0, float(load.max()))
    return None if worst is None else round(worst, 3)


def _document_sets(train_tokens: np.ndarray, eot: int, n_docs: int, k: int, seq_len: int, eval_tokens: int,
                   seed: int = 2468) -> list[torch.Tensor]:
    """K sets of `n_docs` random training documents (joined with eot, as the splits are), each as the validation
    set's windows (engram.trial.validation_windows) over the set's tokens."""
    from engram.trial import validation_windows

    ends = np.flatnonzero(np.asarray(train_tokens) == eot)
    bounds = np.concatenate(([0], ends + 1))  # document i: bounds[i] .. bounds[i + 1] (its eot included)
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(k):
        picks = np.sort(rng.choice(len(bounds) - 1, size=n_docs, replace=False))
        tokens = np.concatenate([train_tokens[bounds[i]:bounds[i + 1]] for i in picks])
        sets.append(validation_windows(tokens, seq_len, eval_tokens))
    return sets


def _summary(loads: list[float]) -> dict[str, float]:
    return {"min": round(min(loads), 3), "median": round(float(np.median(loads)), 3), "max": round(max(loads), 3),
            "share_above_1.5": round(float(np.mean(np.asarray(loads) > 1.5)), 3)}


@torch.no_grad()
def _probe(config, model, solve_iters: int = 0, docsets: int = 0) -> dict[str, float]:
    """Worst layer's max/mean load of the final model: on the validation windows under the final bias and under
    the mean bias of the last TAIL_STEPS batches, on 256 random training windows under the final bias; and the
    mean over the last TAIL_STEPS training batches of one batch's max/mean."""
    from engram.data import prepare_data
    from engram.trial import evaluate, sample_batch, validation_windows

    data = prepare_data(config.data, config.model.vocab_size, None, seq_len=config.model.seq_len)
    val_NT = validation_windows(data.val, config.model.seq_len, config.train.eval_tokens)
    train_NT = sample_batch(data.train, 256, config.model.seq_len, torch.Generator().manual_seed(12345))
    moes = model.moe_layers()

    def load(windows_NT) -> float:
        for moe in moes:
            moe.eval_counts.zero_()
        evaluate(model, windows_NT, 16, torch.device("cpu"))
        return round(max(moe.load_stats()[0] for moe in moes), 3)

    out = {"probe_val_final_bias": load(val_NT), "probe_train_final_bias": load(train_NT),
           "probe_train1024_final_bias": load(sample_batch(data.train, 1024, config.model.seq_len,
                                                            torch.Generator().manual_seed(54321)))}
    # The validation windows outside the codec tables (encodings/*.py; scripts/measure_val_groups.py)
    codec = codec_windows(config, data, len(val_NT))
    eot = data.eot_id
    if codec is not None:
        out["probe_val_no_codecs"] = load(val_NT[torch.from_numpy(~codec)])
        out["probe_val_codec_share"] = round(float(codec.mean()), 3)
    final = [moe.bias.clone() for moe in moes]
    for moe in moes:
        moe.bias.copy_(torch.stack(moe.tail_bias).mean(0))
    out["probe_val_tail_mean_bias"] = load(val_NT)
    out["probe_train_tail_mean_bias"] = load(train_NT)
    for moe, b in zip(moes, final):
        moe.bias.copy_(b)
    out["probe_batch_max_mean"] = round(max(sum(m.tail_batch_max) / len(m.tail_batch_max) for m in moes), 3)
    sets = []
    if docsets and eot is not None:
        n_docs = int((np.asarray(data.val) == eot).sum())
        sets = _document_sets(data.train, eot, n_docs, docsets, config.model.seq_len, config.train.eval_tokens)
        out["docsets_n_docs"] = n_docs
        out["docsets_final_bias"] = _summary([load(w) for w in sets])
    if solve_iters:
        # A bias solved after training on 256 training windows (other than the ones measured above): each
        # iteration moves every layer's bias by a shrinking step x the relative load error of those windows.
        fit_NT = sample_batch(data.train, 256, config.model.seq_len, torch.Generator().manual_seed(777))
        val_before = evaluate(model, val_NT, 16, torch.device("cpu"))
        for it in range(solve_iters):
            for moe in moes:
                moe.eval_counts.zero_()
            evaluate(model, fit_NT, 16, torch.device("cpu"))
            step = 0.02 * (1 - it / solve_iters)
            for moe in moes:
                load_E = moe.eval_counts.double() / (float(moe.eval_counts.sum()) / moe.n_routed)
                delta = (1 - load_E).clamp(-1, 1).float()
                moe.bias += step * (delta - delta.mean())
        out["solved_fit_windows"] = load(fit_NT)
        out["solved_val"] = load(val_NT)
        out["solved_train1024"] = load(sample_batch(data.train, 1024, config.model.seq_len,
                                                    torch.Generator().manual_seed(54321)))
        out["solved_val_loss_change"] = round(evaluate(model, val_NT, 16, torch.device("cpu")) - val_before, 4)
        if sets:
            out["docsets_solved_bias"] = _summary([load(w) for w in sets])
    return out


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    trials = [t for t in sweep_trials() if t.experiment == "allocation"]
    for case in argv:
        name, _, rest = case.partition(":")
        try:
            kw = dict(item.split("=", 1) for item in rest.split(",") if item)
            rho, seed = float(kw.get("rho", 1.0)), int(kw.get("seed", 0))
        except ValueError:
            sys.exit(f"measure_balance: {case!r}: expected name:key=value,... (see --help)")
        matches = [t for t in trials if abs(t.rho - rho) < 1e-9]
        if not matches:
            sys.exit(f"measure_balance: no allocation trial at rho={rho} in sweep.yaml")
        matches = [t for t in matches if t.seed == seed] or matches  # a seed the sweep lacks: its trial, reseeded
        config = matches[0].config
        model, train = config.model, dataclasses.replace(config.train, seed=seed)
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
        probe = (_probe(config, CAPTURED["model"], int(kw.get("solve", 0)), int(kw.get("docsets", 0)))
                 if kw.get("probe") else {})
        print(json.dumps({"case": name, **kw, **probe, "val": round(result.final_val_loss, 4), "steps": result.steps,
                          "n_routed": model.n_routed, "seconds": round(time.perf_counter() - t0, 1),
                          "train_tail_max_mean": _tail_load(CAPTURED["model"]),
                          **{k: v for k, v in result.diagnostics.items() if k.startswith(("expert", "balance"))}}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
