"""DeepSeekMoE feed-forward layer: shared experts + fine-grained routed experts with top-k routing and
auxiliary-loss-free load balancing.

References: DeepSeekMoE (arXiv 2401.06066) for shared + fine-grained experts; DeepSeek-V3 (arXiv 2412.19437,
§2.1.2) for sigmoid affinities, the bias that steers selection only and the complementary sequence-wise balance
loss; torchtitan's MoE for the balancing bookkeeping (bias is a buffer, counts gathered in training, update
outside autograd after the optimiser step).

Every expert (and the shared block, and a dense FFN) is a SwiGLU MLP without biases: 3 * d_model * d_hidden
parameters. SwiGLU is what DeepSeek's models use; `engram.accounting` counts exactly this.

Shape legend: T tokens (batch and time flattened), D d_model, H hidden width, E routed experts, K top_k,
S = T * K token-expert assignments; B sequences and L positions of one sequence (T = B * L) in the balance loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INIT_STD = 0.02  # GPT-2 / nanoGPT initialisation
STARVED_LOAD = 0.1  # an expert with less than this share of the mean load counts as starved (trial diagnostics)
BF16_EXPERT_ROW_ALIGN = 32  # rows per expert block are padded to a multiple of this under CPU autocast


class SwiGLU(nn.Module):
    """SwiGLU MLP, gate and up projections fused into one matmul: w_out(silu(x W_gate) * (x W_up))."""

    def __init__(self, d_model: int, d_hidden: int, *, out_std: float = INIT_STD):
        super().__init__()
        self.d_hidden = d_hidden
        self.w_in = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.w_out = nn.Linear(d_hidden, d_model, bias=False)
        nn.init.normal_(self.w_in.weight, std=INIT_STD)
        nn.init.normal_(self.w_out.weight, std=out_std)

    def forward(self, x_TD: Tensor) -> Tensor:
        gate_TH, up_TH = self.w_in(x_TD).split(self.d_hidden, dim=-1)
        return self.w_out(F.silu(gate_TH) * up_TH)


class _GroupedSwiGLU(torch.autograd.Function):
    """All routed experts of a layer on tokens already sorted by expert, in one autograd node.

    Why a hand-written backward: slicing a stacked (E, ...) weight per expert under autograd makes every slice's
    backward materialise a full (E, ...) zero gradient (O(E^2) memory traffic) plus ~6 autograd nodes per expert.
    Here only the matmuls loop over experts (2 forward, 4 backward, into preallocated outputs); the elementwise
    SwiGLU work runs once over all rows. Measured (bench_model.py, default backbone, one thread): on par at 16
    experts, ~1.4x faster steps at 83, 5x at 256. Saves the pre-activations (S, 2H) for backward.
    """

    @staticmethod
    def forward(ctx, x_SD: Tensor, w_in_E2HD: Tensor, w_out_EDH: Tensor, counts: tuple[int, ...]) -> Tensor:
        d_hidden = w_out_EDH.shape[2]
        blocks = _expert_blocks(counts)
        h_S2H = x_SD.new_empty(x_SD.shape[0], 2 * d_hidden)
        for e, rows in blocks:
            torch.mm(x_SD[rows], w_in_E2HD[e].t(), out=h_S2H[rows])
        gate_SH, up_SH = h_S2H.split(d_hidden, dim=1)
        a_SH = F.silu(gate_SH) * up_SH
        y_SD = torch.empty_like(x_SD)
        for e, rows in blocks:
            torch.mm(a_SH[rows], w_out_EDH[e].t(), out=y_SD[rows])
        ctx.blocks = blocks
        ctx.save_for_backward(x_SD, h_S2H, w_in_E2HD, w_out_EDH)
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD: Tensor):
        x_SD, h_S2H, w_in_E2HD, w_out_EDH = ctx.saved_tensors
        d_hidden = w_out_EDH.shape[2]
        dy_SD = dy_SD.contiguous()
        gate_SH, up_SH = h_S2H.split(d_hidden, dim=1)
        sig_SH = torch.sigmoid(gate_SH)
        silu_SH = gate_SH * sig_SH
        a_SH = silu_SH * up_SH
        da_SH = torch.empty_like(a_SH)
        dw_out = torch.zeros_like(w_out_EDH)
        for e, rows in ctx.blocks:
            torch.mm(dy_SD[rows], w_out_EDH[e], out=da_SH[rows])
            torch.mm(dy_SD[rows].t(), a_SH[rows], out=dw_out[e])
        dh_S2H = torch.cat((da_SH * up_SH * sig_SH * (1 + gate_SH * (1 - sig_SH)),  # d silu(g) / dg
                            da_SH * silu_SH), dim=1)
        dx_SD = torch.empty_like(x_SD)
        dw_in = torch.zeros_like(w_in_E2HD)
        for e, rows in ctx.blocks:
            torch.mm(dh_S2H[rows].t(), x_SD[rows], out=dw_in[e])
            torch.mm(dh_S2H[rows], w_in_E2HD[e], out=dx_SD[rows])
        return dx_SD, dw_in, dw_out, None


def _expert_blocks(counts: tuple[int, ...]) -> list[tuple[int, slice]]:
    """(expert, its rows) for every expert with at least one row; the blocks tile 0..sum(counts)."""
    blocks, start = [], 0
    for e, n in enumerate(counts):
        if n:
            blocks.append((e, slice(start, start + n)))
            start += n
    return blocks


def padded_rows(counts: tuple[int, ...], align: int, device: torch.device) -> tuple[Tensor, tuple[int, ...]]:
    """Where each of the sum(counts) rows goes when every expert's block is padded to a multiple of `align` rows:
    (row index in the padded layout (S,), padded counts)."""
    padded = tuple(-(-n // align) * align for n in counts)
    counts_E, padded_E = torch.tensor(counts, device=device), torch.tensor(padded, device=device)
    shift_E = (padded_E.cumsum(0) - padded_E) - (counts_E.cumsum(0) - counts_E)  # block start, padded - unpadded
    return torch.arange(sum(counts), device=device) + shift_E.repeat_interleave(counts_E), padded


def grouped_swiglu(x_SD: Tensor, w_in_E2HD: Tensor, w_out_EDH: Tensor, counts: tuple[int, ...]) -> Tensor:
    """Expert e applied to its block of counts[e] consecutive rows of x_SD.

    Under CPU autocast the inputs are cast to the autocast dtype here (the casts are differentiable, so fp32
    master weights get fp32 gradients), the hand-written kernels run with autocast off, all in one dtype, and
    each expert's block is zero-padded to a multiple of BF16_EXPERT_ROW_ALIGN rows. Why the padding: oneDNN
    builds a bf16 matmul kernel per shape, and unpadded the row counts change every step: a default bf16 step
    measured 1.8x slower than fp32 (600 vs 312 ms, one thread), padded on par or faster. Padded rows are zeros,
    give zero outputs and contribute nothing to the weight gradients.
    """
    device_type = x_SD.device.type
    if not torch.is_autocast_enabled(device_type):
        return _GroupedSwiGLU.apply(x_SD, w_in_E2HD, w_out_EDH, counts)
    dtype = torch.get_autocast_dtype(device_type)
    x_SD, w_in_E2HD, w_out_EDH = x_SD.to(dtype), w_in_E2HD.to(dtype), w_out_EDH.to(dtype)
    with torch.autocast(device_type, enabled=False):
        if device_type != "cpu":
            return _GroupedSwiGLU.apply(x_SD, w_in_E2HD, w_out_EDH, counts)
        rows_S, padded = padded_rows(counts, BF16_EXPERT_ROW_ALIGN, x_SD.device)
        x_PD = x_SD.new_zeros(sum(padded), x_SD.shape[1]).index_copy(0, rows_S, x_SD)
        return _GroupedSwiGLU.apply(x_PD, w_in_E2HD, w_out_EDH, padded).index_select(0, rows_S)


class MoE(nn.Module):
    """Shared experts (one SwiGLU of n_shared * d_expert hidden) + n_routed SwiGLU experts, top_k per token.

    Routing (DeepSeek-V3): affinities s = sigmoid(x W_r); experts are SELECTED by s + bias, the mixing weights are
    the affinities of the selected experts normalised to sum 1 - the bias never enters them. `bias` is a buffer
    nudged by `update_bias` toward equal load from the counts gathered while `self.training`. With `balance_aux`
    (alpha) set, a training forward also leaves alpha x `sequence_balance_loss` in `aux_loss` for the caller to add
    to the loss (DeepSeek-V3's complementary loss; the model collects it with `EngramMoE.balance_loss`); with
    `balance_moments` (beta), beta x `router_moment_loss` as well, unless every expert is selected (n_routed ==
    top_k: nothing to balance).
    Consequence of the normalisation: with top_k = 1 the weight is always 1 and the router gets no gradient;
    selection then learns only through the balancing bias (fine-grained MoE uses top_k > 1).
    """

    def __init__(self, d_model: int, d_expert: int, n_routed: int, top_k: int, n_shared: int,
                 balance_rate: float, *, balance_aux: float | None = None, balance_moments: float | None = None,
                 out_std: float = INIT_STD):
        super().__init__()
        if not 1 <= top_k <= n_routed:
            raise ValueError(f"top_k: expected 1..n_routed={n_routed}, got {top_k}")
        self.n_routed, self.top_k, self.balance_rate, self.balance_aux = n_routed, top_k, balance_rate, balance_aux
        self.balance_moments = balance_moments
        # alpha x balance loss + beta x router-moment loss of the last training forward, until collected
        self.aux_loss: Tensor | None = None
        self.shared = SwiGLU(d_model, n_shared * d_expert, out_std=out_std) if n_shared > 0 else None
        self.router = nn.Linear(d_model, n_routed, bias=False)
        nn.init.normal_(self.router.weight, std=INIT_STD)
        # Stacked expert weights, nn.Linear layout (out, in): w_in = [gate; up] (E, 2H, D), w_out (E, D, H).
        self.w_in = nn.Parameter(torch.randn(n_routed, 2 * d_expert, d_model) * INIT_STD)
        self.w_out = nn.Parameter(torch.randn(n_routed, d_model, d_expert) * out_std)
        self.register_buffer("bias", torch.zeros(n_routed))
        # Token counts since the last bias update; transient, so not part of a checkpoint.
        self.register_buffer("counts", torch.zeros(n_routed, dtype=torch.long), persistent=False)
        # Token counts of eval-mode forwards since the last bias update: after an evaluation that follows the
        # last training step, the load of the validation set under the final router (`load_stats`).
        self.register_buffer("eval_counts", torch.zeros(n_routed, dtype=torch.long), persistent=False)
        # Training-token counts since the last `reset_trained_counts` (the bias update leaves them): the load the
        # experts actually trained on over a stretch of steps (`trained_load_stats`); the trial saves them.
        self.register_buffer("trained_counts", torch.zeros(n_routed, dtype=torch.long), persistent=False)

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits (T, E): the affinities before the sigmoid."""
        # In fp32 even under bf16 autocast (as DeepSeek-V3's gate): bf16 affinities would tie experts and round
        # the mixing weights; the router is a (D, E) matmul, a negligible share of the layer.
        with torch.autocast(x_TD.device.type, enabled=False):
            return self.router(x_TD.to(self.router.weight.dtype))

    def affinities(self, x_TD: Tensor) -> Tensor:
        """Sigmoid affinities (T, E)."""
        return torch.sigmoid(self.logits(x_TD))

    def select(self, scores_TE: Tensor) -> tuple[Tensor, Tensor]:
        """Selected experts (T, K) (by affinity + bias) and their mixing weights (T, K) (affinities only)."""
        _, expert_TK = torch.topk(scores_TE.detach() + self.bias, self.top_k, dim=-1)
        weight_TK = scores_TE.gather(1, expert_TK)
        return expert_TK, weight_TK / weight_TK.sum(dim=-1, keepdim=True)

    def route(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """Selected experts (T, K) and their mixing weights (T, K)."""
        return self.select(self.affinities(x_TD))

    def forward(self, x_BTD: Tensor) -> Tensor:
        shape = x_BTD.shape
        x_TD = x_BTD.reshape(-1, shape[-1])
        logits_TE = self.logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        expert_TK, weight_TK = self.select(scores_TE)
        if self.training:
            losses = []
            if self.balance_aux is not None:
                seq_len = shape[-2] if x_BTD.dim() >= 3 else shape[0]  # a (T, D) input is one sequence
                losses.append(self.balance_aux * sequence_balance_loss(scores_TE.view(-1, seq_len, self.n_routed),
                                                                       expert_TK.view(-1, seq_len, self.top_k)))
            if self.balance_moments is not None and self.n_routed > self.top_k:
                # With every expert selected (rho = 0's top_k of top_k) there is no load to balance, and the loss
                # only constrains the mixing weights: it cost that model ~0.28 nats (LOG.md, issue 10, D3).
                losses.append(self.balance_moments * router_moment_loss(logits_TE))
            self.aux_loss = sum(losses) if losses else None
        flat_expert_S = expert_TK.flatten()
        counts_E = torch.bincount(flat_expert_S, minlength=self.n_routed)
        if self.training:
            self.counts += counts_E
            self.trained_counts += counts_E
        else:
            self.eval_counts += counts_E
        # Sort the token-expert assignments by expert once, run each expert on its contiguous block.
        order_S = flat_expert_S.argsort(stable=True)
        token_S = order_S // self.top_k
        # index_select (backward: index_add) rather than x[idx] (backward: a slower accumulating index_put).
        x_in_TD = x_TD
        if x_TD.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            x_in_TD = x_TD.to(torch.get_autocast_dtype("cpu"))  # cast the T rows before the gather doubles them
        y_SD = grouped_swiglu(x_in_TD.index_select(0, token_S), self.w_in, self.w_out, tuple(counts_E.tolist()))
        # The mixing weights in y's dtype (bf16 under autocast): a mixed-dtype product takes a ~3x slower path.
        y_SD = y_SD * weight_TK.flatten().index_select(0, order_S).unsqueeze(1).to(y_SD.dtype)
        y_TD = x_TD.new_zeros(x_TD.shape, dtype=y_SD.dtype).index_add_(0, token_S, y_SD)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.view(shape)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Move each expert's bias by balance_rate toward equal load (+ if under-loaded, - if over-loaded).

        The step is centred (as in torchtitan): only differences between biases matter for selection, and
        without centring the biases drift together whenever more experts sit below the mean load than above.
        """
        self.eval_counts.zero_()
        if int(self.counts.sum()) == 0:
            return
        load_E = self.counts.float()
        delta_E = torch.sign(load_E.mean() - load_E)
        self.bias += self.balance_rate * (delta_E - delta_E.mean())
        self.counts.zero_()


    def load_stats(self) -> tuple[float, float, int] | None:
        """(max / mean, min / mean, experts below STARVED_LOAD x mean) of the eval-mode token counts since the last
        bias update; None when no eval forward ran since."""
        total = int(self.eval_counts.sum())
        if total == 0:
            return None
        load_E = self.eval_counts.double() / (total / self.n_routed)
        return float(load_E.max()), float(load_E.min()), int((load_E < STARVED_LOAD).sum())

    def trained_load_stats(self) -> tuple[float, float] | None:
        """(max / mean, min / mean) of the training-token counts since the last `reset_trained_counts`: what each
        expert trained on, under the bias as it moved (None before any training forward)."""
        total = int(self.trained_counts.sum())
        if total == 0:
            return None
        load_E = self.trained_counts.double() / (total / self.n_routed)
        return float(load_E.max()), float(load_E.min())

    def reset_trained_counts(self) -> None:
        self.trained_counts.zero_()


def sequence_balance_loss(scores_BLE: Tensor, expert_BLK: Tensor) -> Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss without its alpha (arXiv 2412.19437, eqs. 17-20):
    the mean over sequences of sum_i f_i P_i, f_i = E / (K L) x (assignments of the sequence's L tokens to expert
    i), P_i = the sequence's mean of expert i's affinity normalised over all E experts.

    f is counted from the selection (no gradient); P carries the gradient to the router. Why: early in a short
    trial the affinities hardly depend on the token, so a bias moves whole herds of tokens between experts; this
    gradient trains the router itself to spread them (alpha 0.01 at the default sweep: max/mean 1.5-1.9 against
    2.6-3.0 with the bias alone; LOG.md, issue 7). At equal load (f_i = 1 for all i) the loss is sum_i P_i = 1
    whatever the affinities, so its gradient is zero.
    """
    n_seq, seq_len, top_k = expert_BLK.shape
    n_routed = scores_BLE.shape[-1]
    count_BE = torch.zeros(n_seq, n_routed, device=scores_BLE.device, dtype=scores_BLE.dtype)
    count_BE.scatter_add_(1, expert_BLK.reshape(n_seq, -1), count_BE.new_ones(n_seq, seq_len * top_k))
    f_BE = count_BE * (n_routed / (top_k * seq_len))
    p_BE = (scores_BLE / scores_BLE.sum(dim=-1, keepdim=True)).mean(dim=1)
    return (f_BE * p_BE).sum(dim=-1).mean()


def router_moment_loss(logits_TE: Tensor) -> Tensor:
    """The variance across experts of the router logit's mean over the tokens, plus the variance across experts of
    its standard deviation over the tokens (unbiased estimates, T and E >= 2); zero when every expert's logit has
    the same mean and spread over the batch.

    Why: at the end of a short default trial the routers without their bias send max/mean 10-13 of the load to one
    expert (pure MoE, 64 experts; LOG.md, 2026-11-30, "router balance, third pass"). Two things herd the tokens.
    Experts' mean logits drift apart (an early-trained expert wins every token, and the LM gradient then raises its
    affinity for every token), and that common part moves whole herds, which the bias and the sequence-wise loss
    (its gradient is nearly the same for every token of a sequence) can only shift to the next expert; and, with the
    means held equal, experts whose logit varies more across tokens win most top-k picks. This loss pulls both
    moments together and leaves the token-dependent part, which is what a router is for. It narrows the
    affinities, so pair it with a smaller bias step (travel 0.25 at the default sweep): beta 10 there brought
    max/mean from 1.67-2.22 to 1.36-1.69 and the pure MoE's loss down 0.12 nats (docs/fairness.md).
    """
    return logits_TE.mean(dim=0).var() + logits_TE.std(dim=0).var()


def effective_balance_rate(balance_rate: float, balance_travel: float | None, total_steps: int) -> float:
    """Bias step per optimiser step: max(balance_rate, balance_travel / total_steps) (balance_rate alone when
    balance_travel is None).

    Why a travel: the step moves every bias by +-rate, so over T steps a bias moves at most rate * T. Selection
    compares sigmoid affinities in (0, 1) plus bias, so a bias spread of ~1 can steer any token anywhere; the
    paper-scale rate 1e-3 gets there after 1000 steps, while a default laptop trial has ~125 and ended with
    max/mean expert load 5.9 and 29 of 84 experts starved (LOG.md, issue 7). Long trials keep balance_rate.
    """
    if balance_travel is None:
        return balance_rate
    return max(balance_rate, balance_travel / max(total_steps, 1))


def residual_std(n_layers: int) -> float:
    """nanoGPT/GPT-2: projections into the residual stream get std 0.02 / sqrt(2 * n_layers)."""
    return INIT_STD / math.sqrt(2 * n_layers)
