"""The Engram+MoE backbone: a decoder-only transformer whose FFNs are DeepSeekMoE layers (the first
`n_dense_layers` dense), with conditional memory attached as configured by `ModelConfig.memory`:

- "engram": an `engram.memory.Engram` module at each of `memory.layers`, its output added to the residual stream
  before that block's attention (Engram paper, arXiv 2601.07372 §2);
- "overencoding": `engram.memory.OverEncoding` mixes hashed n-gram embeddings into the input embedding
  (Huang et al. 2025, arXiv 2501.16975);
- "none": a plain MoE transformer.

Layout after nanoGPT: rotary -> attention -> block -> model -> loss. Pre-norm RMSNorm, rotary positions
(RoFormer, arXiv 2104.09864, half-split pairing as in GPT-NeoX / Llama), causal attention through
`scaled_dot_product_attention`, no biases. The head is tied to the embedding by default: at the sizes a sweep
trains on a laptop the vocabulary matrix is a large share of all weights, tying halves it and is the usual choice
at small scale (GPT-2, nanoGPT); P_tot excludes embedding and head either way, and the head's FLOPs are counted
whether tied or not. Parameter counts and FLOPs live next door in `engram.accounting`.

Mixed precision (`train.precision: bf16`, engram.trial): the model runs under `torch.autocast(dtype=bfloat16)` with
fp32 parameters (master weights, gradients and optimiser state stay fp32). Matmuls run in bf16; the residual stream,
router, rotary positions, the Engram gate and conv and every softmax run in fp32 (a bf16 residual stream was
measured and dropped: no faster step; LOG.md, issue 9). Where autocast alone would fall off a fast kernel, the code
handles dtypes itself: `RMSNorm` takes the input's dtype (its kernel accumulates in fp32), attention on CPU runs in
fp32 (the CPU flash kernel's bf16 backward is 4x slower than its fp32 one), mixed-dtype products are avoided
(PyTorch's slow path), and the LM head and loss are one chunked kernel (`head_cross_entropy`).

Shape legend: B batch, T time, D d_model, H attention heads, Dh head size,
V vocabulary, N = B * T positions, C positions of one chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engram.config import ModelConfig
from engram.moe import INIT_STD, MoE, SwiGLU, residual_std


NORM_EPS = 1e-6
# Logits per chunk of the fused head + loss: a (C, V) fp32 block of 2 MB stays in a core's L2 cache. Softmax over
# the whole (N, V) logits instead streams 32 MB through memory several times: measured 31.6 ms for a default
# step's (2048, 4096) softmax against 8.3 ms in chunks of 128 rows (one thread). Whole steps with the fused and
# the unfused loss measured on par on a heavily loaded machine (docs/benchmarks.md).
CE_CHUNK_ELEMENTS = 1 << 19


class RMSNorm(nn.RMSNorm):
    """RMSNorm whose weight follows the input's dtype, so a bf16 input keeps the fused kernel (nn.RMSNorm with an
    fp32 weight warns and falls back to the unfused path); the kernel accumulates in fp32 either way."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def rotary_tables(seq_len: int, d_head: int, theta: float) -> tuple[Tensor, Tensor]:
    """Full-width tables (T, Dh) for positions 0..seq_len-1: cos = [cos, cos] and signed sin = [-sin, sin] over the
    Dh/2 frequencies, so that `apply_rotary` is two products and one add."""
    inv_freq = 1.0 / theta ** (torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)
    angle_TF = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    cos_TF, sin_TF = angle_TF.cos().float(), angle_TF.sin().float()
    return torch.cat((cos_TF, cos_TF), dim=-1), torch.cat((-sin_TF, sin_TF), dim=-1)


def apply_rotary(x_TDh: Tensor, cos_TDh: Tensor, sin_TDh: Tensor) -> Tensor:
    """Rotate the pairs (x_i, x_{i + Dh/2}) of the last dimension: (x1 cos - x2 sin, x1 sin + x2 cos). The tables
    (from `rotary_tables`) broadcast against x's leading dimensions."""
    x1, x2 = x_TDh.chunk(2, dim=-1)
    return x_TDh * cos_TDh + torch.cat((x2, x1), dim=-1) * sin_TDh


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, out_std: float):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        nn.init.normal_(self.qkv.weight, std=INIT_STD)
        nn.init.normal_(self.proj.weight, std=out_std)

    def forward(self, x_BTD: Tensor, cos_TDh: Tensor, sin_TDh: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        cpu_autocast = x_BTD.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        qkv = self.qkv(x_BTD)
        if cpu_autocast:
            # fp32 attention under CPU autocast: the CPU flash kernel's bf16 backward is 4x slower than its fp32
            # one (35.6 vs 8.3 ms for a default layer, one thread), and a hand-written bf16 attention measured
            # 2x slower than fp32 flash (LOG.md). Cast once here, before the rotary: a bf16 q times the fp32
            # tables would take PyTorch's slow mixed-dtype path (~3x a same-dtype product).
            qkv = qkv.float()
        qkv_BT3HDh = qkv.view(B, T, 3, self.n_heads, D // self.n_heads)
        # Rotary in fp32, as Llama does; q and k together in the projection's own layout: 1.8x faster than per
        # tensor on permuted views (1.3 vs 2.4 ms forward, default layer, one thread). split, not slicing: a
        # slice's backward zero-fills a full (B, T, 3, H, Dh) gradient per slice.
        qk_BT2HDh, v_BT1HDh = qkv_BT3HDh.split((2, 1), dim=2)
        qk_BT2HDh = apply_rotary(qk_BT2HDh, cos_TDh[:T, None, None], sin_TDh[:T, None, None])
        q_BHTDh, k_BHTDh = qk_BT2HDh.permute(2, 0, 3, 1, 4).unbind(0)
        v_BHTDh = v_BT1HDh.squeeze(2).transpose(1, 2)
        if cpu_autocast:
            with torch.autocast("cpu", enabled=False):
                y_BHTDh = F.scaled_dot_product_attention(q_BHTDh, k_BHTDh, v_BHTDh, is_causal=True)
        else:
            y_BHTDh = F.scaled_dot_product_attention(q_BHTDh, k_BHTDh, v_BHTDh, is_causal=True)
        return self.proj(y_BHTDh.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """[Engram ->] attention -> FFN (dense SwiGLU or MoE), pre-norm residual."""

    def __init__(self, cfg: ModelConfig, layer_id: int, engram: nn.Module | None):
        super().__init__()
        out_std = residual_std(cfg.n_layers)
        self.engram = engram
        self.norm_attn = RMSNorm(cfg.d_model, eps=NORM_EPS)
        self.attn = Attention(cfg, out_std)
        self.norm_ffn = RMSNorm(cfg.d_model, eps=NORM_EPS)
        if layer_id < cfg.n_dense_layers:
            self.ffn = SwiGLU(cfg.d_model, cfg.d_ff_dense, out_std=out_std)
        else:
            self.ffn = MoE(cfg.d_model, cfg.d_expert, cfg.n_routed, cfg.top_k, cfg.n_shared_experts,
                           cfg.balance_rate, balance_aux=cfg.balance_aux, balance_moments=cfg.balance_moments,
                           out_std=out_std)

    def forward(self, x_BTD: Tensor, ids_BT: Tensor, cos_TDh: Tensor, sin_TDh: Tensor) -> Tensor:
        if self.engram is not None:
            x_BTD = x_BTD + self.engram(x_BTD, ids_BT)
        x_BTD = x_BTD + self.attn(self.norm_attn(x_BTD), cos_TDh, sin_TDh)
        return x_BTD + self.ffn(self.norm_ffn(x_BTD))


class EngramMoE(nn.Module):
    """Decoder-only Engram+MoE language model.

    `compression` is the (V,) int64 tokenizer compression used only for n-gram hashing (None: identity).
    """

    def __init__(self, cfg: ModelConfig, compression: Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        mem = cfg.memory
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.wte.weight, std=INIT_STD)
        self.overencoding = None
        engrams: dict[int, nn.Module] = {}
        if mem.kind == "overencoding":
            from engram.memory import OverEncoding
            self.overencoding = OverEncoding(mem, cfg.d_model, cfg.vocab_size)
        elif mem.kind == "engram":
            from engram.memory import Engram
            engrams = {i: Engram(mem, cfg.d_model, i, compression) for i in mem.layers}
        self.blocks = nn.ModuleList(Block(cfg, i, engrams.get(i)) for i in range(cfg.n_layers))
        self.norm_out = RMSNorm(cfg.d_model, eps=NORM_EPS)
        if cfg.tie_embeddings:
            self.head = None
        else:
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            nn.init.normal_(self.head.weight, std=INIT_STD)
        cos_TDh, sin_TDh = rotary_tables(cfg.seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos_TDh, persistent=False)
        self.register_buffer("rope_sin", sin_TDh, persistent=False)

    def forward(self, idx_BT: Tensor, targets_BT: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """Without targets: logits (B, T, V) and None. With targets: None and the mean next-token cross-entropy
        (the logits are never materialised: head and loss run fused, chunk by chunk)."""
        T = idx_BT.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"idx_BT: sequence length {T} exceeds seq_len={self.cfg.seq_len}")
        x_BTD = self.wte(idx_BT)
        if self.overencoding is not None:
            x_BTD = self.overencoding(idx_BT, x_BTD)
        for block in self.blocks:
            x_BTD = block(x_BTD, idx_BT, self.rope_cos, self.rope_sin)
        x_BTD = self.norm_out(x_BTD)
        head_VD = self.wte.weight if self.head is None else self.head.weight
        if targets_BT is None:
            return F.linear(x_BTD, head_VD), None
        return None, head_cross_entropy(x_BTD.view(-1, x_BTD.shape[-1]), head_VD, targets_BT.reshape(-1))

    def memory_modules(self) -> list[nn.Module]:
        mods = [b.engram for b in self.blocks if b.engram is not None]
        return mods + ([self.overencoding] if self.overencoding is not None else [])

    def table_parameters(self) -> list[nn.Parameter]:
        """The memory tables (sparse gradients): optimise with Adam at engram_lr_mult x lr, no weight decay."""
        return [p for m in self.memory_modules() for p in m.table_parameters()]

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def balance_loss(self) -> Tensor | None:
        """The MoE layers' balance losses of the last training forward, summed, and cleared (None: none)."""
        losses = [moe.aux_loss for moe in self.moe_layers() if moe.aux_loss is not None]
        for moe in self.moe_layers():
            moe.aux_loss = None
        return torch.stack(losses).sum() if losses else None

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """Call after optimizer.step(): nudge every MoE layer's selection bias toward balance, reset counts."""
        for moe in self.moe_layers():
            moe.update_bias()


# ---------------------------------------------------------------------------------------------------------------
# Loss


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, V) against targets (N,), one exp pass over the logits in all.

    Why not F.cross_entropy: on CPU its log_softmax + nll pair makes a second exp pass and a dense (N, V) zero
    gradient in backward, ~20% of a default training step. Here the softmax p is saved and turned into the
    gradient (p - onehot) / N in place. lse = max - log p[argmax]: p[argmax] >= 1/V never underflows.
    """

    @staticmethod
    def forward(ctx, logits_NV: Tensor, targets_N: Tensor) -> Tensor:
        max_N, argmax_N = logits_NV.max(dim=1)
        p_NV = torch.softmax(logits_NV, dim=1)
        lse_N = max_N - p_NV.gather(1, argmax_N.unsqueeze(1)).squeeze(1).log()
        loss = (lse_N - logits_NV.gather(1, targets_N.unsqueeze(1)).squeeze(1)).mean()
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(p_NV, targets_N)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        assert not getattr(ctx, "consumed", False), "the saved softmax is reused in place: backward only once"
        ctx.consumed = True
        p_NV, targets_N = ctx.saved_tensors
        rows_N = torch.arange(p_NV.shape[0], device=p_NV.device)
        p_NV[rows_N, targets_N] -= 1.0
        return p_NV.mul_(grad / p_NV.shape[0]), None


class _HeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x W^T (N, V) against targets (N,), in chunks of C rows, never holding
    all N x V logits; the gradients are computed in forward and only scaled in backward.

    Why: the loss is the graph's last node, so its gradient needs nothing but its own inputs. Per chunk the
    logits, their fp32 softmax and the gradient p - onehot stay in cache (see CE_CHUNK_ELEMENTS), where the
    unfused head + `cross_entropy` write and re-read (N, V) buffers several times. x and W share one dtype (bf16
    under autocast: the head's matmuls, ~40% of a default step's FLOPs, run in bf16); logits are upcast to fp32
    before the softmax, and the matmuls accumulate in fp32.
    """

    @staticmethod
    def forward(ctx, x_ND: Tensor, w_VD: Tensor, targets_N: Tensor) -> Tensor:
        N, V = x_ND.shape[0], w_VD.shape[0]
        rows = max(1, CE_CHUNK_ELEMENTS // V)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc = torch.promote_types(x_ND.dtype, torch.float32)  # logits, softmax and loss: at least fp32
        loss_N = torch.empty(N, dtype=acc, device=x_ND.device)
        if needs_grad:
            dx_ND = torch.empty_like(x_ND)
            # Below fp32 the per-chunk gradients go into one (N, V) buffer for one weight-gradient matmul at the
            # end: accumulating per chunk would round, upcast and add a (V, D) block per chunk.
            g_NV = torch.empty(N, V, dtype=x_ND.dtype, device=x_ND.device) if x_ND.dtype != acc else None
            dw_VD = torch.zeros(w_VD.shape, dtype=acc, device=w_VD.device) if g_NV is None else None
        for start in range(0, N, rows):
            chunk = slice(start, min(start + rows, N))
            x_CD, t_C1 = x_ND[chunk], targets_N[chunk].unsqueeze(1)
            logits_CV = torch.mm(x_CD, w_VD.t()).to(acc)
            target_logit_C1 = logits_CV.gather(1, t_C1)
            if not needs_grad:
                loss_N[chunk] = torch.logsumexp(logits_CV, dim=1) - target_logit_C1.squeeze(1)
                continue
            # One exp pass in place: e = exp(logits - max), sum >= 1 (the max's own term), lse = max + log(sum).
            max_C1 = logits_CV.amax(dim=1, keepdim=True)  # amax: no argmax, ~7x cheaper than max(dim)
            e_CV = logits_CV.sub_(max_C1).exp_()
            sum_C1 = e_CV.sum(dim=1, keepdim=True)
            loss_N[chunk] = (max_C1 + sum_C1.log() - target_logit_C1).squeeze(1)
            # d loss_n / d logits = p - onehot; the target's entry p_t - 1 is formed in fp32, then rounded.
            p_target_C1 = (target_logit_C1 - max_C1).exp_().div_(sum_C1).sub_(1.0)
            if g_NV is None:
                p_CV = e_CV.div_(sum_C1).scatter_(1, t_C1, p_target_C1)
                torch.mm(p_CV, w_VD, out=dx_ND[chunk])
                dw_VD.addmm_(p_CV.t(), x_CD)
            else:
                # Divide and set the target's entry in fp32, then round into the bf16 buffer once: division with
                # a bf16 out= measured 1.8 ms per (128, 4096) chunk against ~0.5 ms for the two steps, and a bf16
                # scatter_ copies its whole chunk twice (0.28 ms against 0.002 ms in fp32, torch 2.13 CPU).
                g_CV = g_NV[chunk].copy_(e_CV.div_(sum_C1).scatter_(1, t_C1, p_target_C1))
                torch.mm(g_CV, w_VD, out=dx_ND[chunk])
        if needs_grad:
            if g_NV is not None:
                dw_VD = torch.mm(g_NV.t(), x_ND).to(acc)
            ctx.save_for_backward(dx_ND, dw_VD)
            ctx.w_dtype = w_VD.dtype
        return loss_N.mean()

    @staticmethod
    def backward(ctx, grad: Tensor):
        dx_ND, dw_VD = ctx.saved_tensors
        scale = grad / dx_ND.shape[0]  # the mean over N positions
        return dx_ND * scale.to(dx_ND.dtype), (dw_VD * scale).to(ctx.w_dtype), None


def head_cross_entropy(x_ND: Tensor, w_VD: Tensor, targets_N: Tensor) -> Tensor:
    """Mean cross-entropy of logits x_ND @ w_VD^T against targets_N, fused (same value and gradients as
    `cross_entropy(F.linear(x_ND, w_VD), targets_N)`). Under autocast x and W are cast to its dtype first."""
    _check_targets(targets_N, w_VD.shape[0])
    device_type = x_ND.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x_ND, w_VD = x_ND.to(dtype), w_VD.to(dtype)
    elif x_ND.dtype != w_VD.dtype:
        raise ValueError(f"x_ND: expected the head's dtype {w_VD.dtype}, got {x_ND.dtype}")
    with torch.autocast(device_type, enabled=False):
        return _HeadCrossEntropy.apply(x_ND, w_VD, targets_N.long())


def _check_targets(targets_N: Tensor, n_classes: int) -> None:
    if targets_N.numel() and (int(targets_N.min()) < 0 or int(targets_N.max()) >= n_classes):
        raise ValueError(f"targets: expected ids in [0, {n_classes}), got "
                         f"[{int(targets_N.min())}, {int(targets_N.max())}]")


def cross_entropy(logits_NV: Tensor, targets_N: Tensor) -> Tensor:
    """Mean next-token cross-entropy (same value and gradient as F.cross_entropy, cheaper on CPU)."""
    _check_targets(targets_N, logits_NV.shape[1])
    # At least fp32 whatever the logits' dtype (as autocast does for F.cross_entropy): the loss needs it.
    if logits_NV.dtype in (torch.float16, torch.bfloat16):
        logits_NV = logits_NV.float()
    with torch.autocast(logits_NV.device.type, enabled=False):
        return _SoftmaxCrossEntropy.apply(logits_NV, targets_N.long())
