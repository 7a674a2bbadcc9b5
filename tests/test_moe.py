"""DeepSeekMoE layer: grouped experts against a per-token reference, the dense-MLP special case, routing weights
and auxiliary-loss-free balancing."""

import pytest
import torch
import torch.nn.functional as F

from engram.moe import MoE, SwiGLU, _GroupedSwiGLU, grouped_swiglu, padded_rows


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def swiglu_ref(x_D, w_in_2HD, w_out_DH):
    gate_H, up_H = (w_in_2HD @ x_D).chunk(2)
    return w_out_DH @ (F.silu(gate_H) * up_H)


def moe_ref(moe: MoE, x_TD):
    """Token by token: sum over the selected experts of weight * expert(x), plus the shared MLP."""
    expert_TK, weight_TK = moe.route(x_TD)
    rows = []
    for t in range(x_TD.shape[0]):
        y_D = sum(weight_TK[t, k] * swiglu_ref(x_TD[t], moe.w_in[e], moe.w_out[e])
                  for k, e in enumerate(expert_TK[t].tolist()))
        rows.append(y_D)
    y_TD = torch.stack(rows)
    return y_TD + moe.shared(x_TD) if moe.shared is not None else y_TD


def test_grouped_moe_matches_per_token_reference_values_and_gradients():
    torch.manual_seed(0)
    moe = MoE(d_model=16, d_expert=8, n_routed=6, top_k=2, n_shared=1, balance_rate=1e-3).double()
    x_BTD = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    y = moe(x_BTD)
    grads = torch.autograd.grad(y.square().sum(), [x_BTD, *moe.parameters()])
    y_ref = moe_ref(moe, x_BTD.view(-1, 16)).view_as(y)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x_BTD, *moe.parameters()])
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_grouped_swiglu_gradcheck_with_empty_experts():
    torch.manual_seed(1)
    x_SD = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(4, 6, 4, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(4, 4, 3, dtype=torch.float64, requires_grad=True)
    counts = (2, 0, 3, 0)  # experts 1 and 3 receive no token: their gradients must be zero, not garbage
    assert torch.autograd.gradcheck(lambda x, a, b: _GroupedSwiGLU.apply(x, a, b, counts), (x_SD, w_in, w_out))
    _GroupedSwiGLU.apply(x_SD, w_in, w_out, counts).sum().backward()
    assert w_in.grad[1].abs().sum() == 0 and w_out.grad[3].abs().sum() == 0
    assert w_in.grad[0].abs().sum() > 0


def test_padded_rows_place_each_expert_block_at_an_aligned_start():
    rows, padded = padded_rows((3, 0, 5, 1), 4, torch.device("cpu"))
    assert padded == (4, 0, 8, 4)
    assert rows.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 12]


def test_grouped_swiglu_in_bf16_matches_the_per_token_loop_in_fp64():
    # Under CPU autocast the kernel casts to bf16 and pads every expert's block (counts here are not multiples
    # of the alignment); values and fp32 master-weight gradients must match the fp64 reference loop.
    torch.manual_seed(3)
    x_SD = torch.randn(45, 16, dtype=torch.float64)
    w_in = (torch.randn(5, 24, 16, dtype=torch.float64) * 0.3)
    w_out = (torch.randn(5, 16, 12, dtype=torch.float64) * 0.3)
    counts = (10, 0, 20, 1, 14)  # expert 1 gets no rows: its gradients must be exactly zero
    ref_rows, start = [], 0
    for e, n in enumerate(counts):
        ref_rows += [swiglu_ref(x_SD[i], w_in[e], w_out[e]) for i in range(start, start + n)]
        start += n
    y_ref = torch.stack(ref_rows)
    dy = torch.randn_like(y_ref)
    x64, wi64, wo64 = (t.detach().clone().requires_grad_() for t in (x_SD, w_in, w_out))
    y64 = _GroupedSwiGLU.apply(x64, wi64, wo64, counts)
    grads_ref = torch.autograd.grad((y64 * dy).sum(), [x64, wi64, wo64])
    torch.testing.assert_close(y64, y_ref)
    x32, wi32, wo32 = (t.detach().float().requires_grad_() for t in (x_SD, w_in, w_out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_swiglu(x32, wi32, wo32, counts)
    assert y.dtype == torch.bfloat16 and y.shape == y_ref.shape
    assert (y.double() - y_ref).norm() / y_ref.norm() < 0.02
    grads = torch.autograd.grad((y.float() * dy.float()).sum(), [x32, wi32, wo32])
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.float32
        assert (g.double() - g_ref).norm() / g_ref.norm() < 0.03
    assert grads[1][1].abs().sum() == 0 and grads[2][1].abs().sum() == 0


def test_one_expert_top1_without_shared_equals_dense_mlp():
    torch.manual_seed(2)
    moe = MoE(d_model=12, d_expert=20, n_routed=1, top_k=1, n_shared=0, balance_rate=1e-3)
    dense = SwiGLU(12, 20)
    with torch.no_grad():
        dense.w_in.weight.copy_(moe.w_in[0])
        dense.w_out.weight.copy_(moe.w_out[0])
    x_BTD = torch.randn(3, 5, 12)
    y_moe, y_dense = moe(x_BTD), dense(x_BTD)
    torch.testing.assert_close(y_moe, y_dense)
    y_moe.sum().backward()
    y_dense.sum().backward()
    torch.testing.assert_close(moe.w_in.grad[0], dense.w_in.weight.grad)
    torch.testing.assert_close(moe.w_out.grad[0], dense.w_out.weight.grad)
    assert moe.router.weight.grad.abs().max() < 1e-6  # the weight is s / s = 1: no signal reaches the router


def test_mixing_weights_are_normalised_affinities_never_the_bias():
    torch.manual_seed(3)
    moe = MoE(d_model=8, d_expert=4, n_routed=5, top_k=2, n_shared=0, balance_rate=1e-3)
    x_TD = torch.randn(40, 8)
    scores_TE = torch.sigmoid(moe.router(x_TD)).detach()
    moe.bias.copy_(torch.tensor([5.0, 0.0, -5.0, 0.0, 0.0]))  # forces expert 0 in, expert 2 out
    expert_TK, weight_TK = moe.route(x_TD)
    assert (expert_TK == 0).any(dim=1).all() and not (expert_TK == 2).any()
    expected_TK = scores_TE.gather(1, expert_TK)
    torch.testing.assert_close(weight_TK.detach(), expected_TK / expected_TK.sum(1, keepdim=True))
    # Same selection with a bias shifted by a constant: identical weights (the bias only ranks).
    moe.bias.add_(3.0)
    expert2_TK, weight2_TK = moe.route(x_TD)
    assert torch.equal(expert_TK, expert2_TK)
    torch.testing.assert_close(weight_TK, weight2_TK)


def test_balancing_bias_moves_toward_balance_from_training_counts_only():
    torch.manual_seed(4)
    moe = MoE(d_model=8, d_expert=4, n_routed=4, top_k=1, n_shared=0, balance_rate=0.02)
    with torch.no_grad():
        moe.router.weight[0] += 1.0  # expert 0 dominates inputs with positive mean
    x_TD = torch.randn(256, 8) + 1.0

    def load():
        expert_TK, _ = moe.route(x_TD)
        return torch.bincount(expert_TK.flatten(), minlength=4)

    moe.eval()
    moe(x_TD)
    assert moe.counts.sum() == 0  # no counts outside training
    moe.update_bias()
    assert torch.equal(moe.bias, torch.zeros(4))
    imbalance_before = load().max().item()
    assert imbalance_before > 0.6 * 256

    moe.train()
    max_loads = []
    for _ in range(100):
        moe(x_TD)
        assert moe.counts.sum() == 256
        max_loads.append(moe.counts.max().item())
        moe.update_bias()
        assert moe.counts.sum() == 0
    assert moe.bias[0] < 0 and (moe.bias[1:] > moe.bias[0]).all()
    assert abs(moe.bias.sum().item()) < 1e-4  # centred updates: no common drift
    assert sum(max_loads[-20:]) / 20 < 0.75 * imbalance_before
    assert not moe.bias.requires_grad and "bias" in moe.state_dict()
    # The bias changed selection; the weights are still the selected experts' normalised affinities.
    expert_TK, weight_TK = moe.route(x_TD)
    scores_TK = torch.sigmoid(moe.router(x_TD)).gather(1, expert_TK)
    torch.testing.assert_close(weight_TK, scores_TK / scores_TK.sum(1, keepdim=True))


def _biased_router_moe(rate: float) -> tuple[MoE, torch.Tensor]:
    """An MoE whose router prefers experts 0 and 1 for every token by ~0.45 in sigmoid affinity (a common input
    direction), over token-dependent affinities that vary by ~0.1: unbalanced until the bias makes up ~0.45."""
    torch.manual_seed(0)
    moe = MoE(d_model=16, d_expert=4, n_routed=8, top_k=2, n_shared=0, balance_rate=rate)
    u_D = torch.zeros(16)
    u_D[0] = 1.0
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.1)
        moe.router.weight[:, 0] = 0.0
        moe.router.weight[:2, 0] = 3.0  # along u: logits +3 for experts 0, 1
    return moe, u_D


def _train_balancing(moe: MoE, u_D: torch.Tensor, steps: int) -> tuple[float, float, int]:
    gen = torch.Generator().manual_seed(1)
    moe.train()
    for _ in range(steps):
        x_TD = torch.randn(256, 16, generator=gen) + u_D
        with torch.no_grad():
            moe(x_TD)
        moe.update_bias()
    moe.eval()
    with torch.no_grad():
        moe(torch.randn(4096, 16, generator=gen) + u_D)
    return moe.load_stats()


def test_balancing_reaches_the_bound_within_a_short_trial_when_the_rate_follows_its_length():
    from engram.moe import effective_balance_rate

    steps = 120  # a default laptop trial's length
    slow, u_D = _biased_router_moe(effective_balance_rate(1e-3, None, steps))
    assert _train_balancing(slow, u_D, steps)[0] > 1.5  # the paper's fixed 1e-3 moves a bias 0.12 at most
    fast, u_D = _biased_router_moe(effective_balance_rate(1e-3, 1.0, steps))
    max_load, min_load, starved = _train_balancing(fast, u_D, steps)
    assert max_load <= 1.5 and min_load > 0.5 and starved == 0
    assert effective_balance_rate(1e-3, 1.0, 100_000) == 1e-3  # long trials keep the paper's rate


def test_load_stats_count_eval_forwards_since_the_last_update():
    moe, u_D = _biased_router_moe(0.0)
    assert moe.load_stats() is None
    moe.eval()
    with torch.no_grad():
        moe(torch.randn(100, 16) + u_D)
    max_load, min_load, starved = moe.load_stats()
    assert int(moe.eval_counts.sum()) == 100 * 2 and max_load >= 1.0 >= min_load
    assert starved == int((moe.eval_counts.double() / (200 / 8) < 0.1).sum())
    moe.update_bias()  # a training step's update starts a new window
    assert moe.load_stats() is None


def _balance_loss_ref(scores_BLE, expert_BLK):
    """DeepSeek-V3 eqs. 17-20 written out: per sequence, sum over experts of f_i * P_i; mean over sequences."""
    n_seq, seq_len, top_k = expert_BLK.shape
    n_routed = scores_BLE.shape[-1]
    total = 0.0
    for b in range(n_seq):
        for i in range(n_routed):
            f_i = n_routed / (top_k * seq_len) * sum(int(i in expert_BLK[b, t].tolist()) for t in range(seq_len))
            p_i = sum(scores_BLE[b, t, i] / scores_BLE[b, t].sum() for t in range(seq_len)) / seq_len
            total = total + f_i * p_i
    return total / n_seq


def test_sequence_balance_loss_matches_the_paper_written_out():
    from engram.moe import sequence_balance_loss

    torch.manual_seed(5)
    scores_BLE = torch.rand(3, 7, 6, dtype=torch.float64)
    expert_BLK = torch.stack([torch.randperm(6)[:2] for _ in range(21)]).view(3, 7, 2)
    torch.testing.assert_close(sequence_balance_loss(scores_BLE, expert_BLK), _balance_loss_ref(scores_BLE, expert_BLK))


def test_sequence_balance_loss_is_flat_at_equal_load_and_pushes_load_off_busy_experts():
    from engram.moe import sequence_balance_loss

    torch.manual_seed(6)
    logits_BLE = torch.randn(2, 8, 4, dtype=torch.float64, requires_grad=True)
    # Equal load in every sequence: tokens cycle through the expert pairs (0, 1) and (2, 3).
    balanced_BLK = torch.tensor([[0, 1], [2, 3]]).repeat(2, 4, 1)
    loss = sequence_balance_loss(torch.sigmoid(logits_BLE), balanced_BLK)
    (grad,) = torch.autograd.grad(loss, logits_BLE)
    assert loss.item() == pytest.approx(1.0) and grad.abs().max() < 1e-12
    # Every token on experts 0 and 1, its two highest affinities: a loss above 1, whose gradient lowers their
    # affinities and raises the others'.
    herded_BLK = torch.tensor([0, 1]).repeat(2, 8, 1)
    loss = sequence_balance_loss(torch.sigmoid(logits_BLE + torch.tensor([3.0, 3.0, 0.0, 0.0])), herded_BLK)
    (grad,) = torch.autograd.grad(loss, logits_BLE)
    assert loss.item() > 1.0
    assert (grad[..., :2] > 0).all() and (grad[..., 2:] < 0).all()


def _router_load_after_training_on_its_balance_loss(knob: str, value: float | None, lr: float):
    """Load stats of _biased_router_moe (every token on experts 0 and 1) after 120 SGD steps of its router on the
    MoE's own aux_loss with `knob` (balance_aux or balance_moments) set to `value`, no bias step; eval forwards
    must leave no loss."""
    moe, u_D = _biased_router_moe(0.0)
    setattr(moe, knob, value)
    opt = torch.optim.SGD(moe.router.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(120):
        moe(torch.randn(4, 64, 16, generator=gen) + u_D)
        if moe.aux_loss is not None:
            moe.aux_loss.backward()
            opt.step()
            opt.zero_grad()
            moe.aux_loss = None
        moe.update_bias()
    moe.eval()
    with torch.no_grad():
        moe(torch.randn(4096, 16, generator=gen) + u_D)
    assert moe.aux_loss is None  # eval forwards leave no loss
    return moe.load_stats()


def test_balance_aux_loss_alone_balances_a_herding_router_and_is_left_for_training_forwards_only():
    """No bias step (balance_rate 0): only the balance loss's gradient trains the router. The router of
    _biased_router_moe sends every token to experts 0 and 1; 120 SGD steps on the loss spread the load."""
    def train(alpha):
        return _router_load_after_training_on_its_balance_loss("balance_aux", alpha, lr=10.0)

    assert train(None)[0] > 3.0  # without it nothing moves: every token on 2 of 8 experts (max / mean 4)
    max_load, min_load, starved = train(1.0)
    assert max_load <= 1.5 and starved == 0


def test_model_collects_and_clears_the_layers_balance_losses():
    from engram.config import ModelConfig
    from engram.model import EngramMoE

    cfg = ModelConfig(vocab_size=64, seq_len=16, d_model=16, n_layers=3, n_heads=2, n_dense_layers=1, d_ff_dense=32,
                      d_expert=8, n_routed=4, top_k=2, balance_aux=0.1)
    model = EngramMoE(cfg)
    ids_BT = torch.randint(0, 64, (2, 17))
    model(ids_BT[:, :-1], ids_BT[:, 1:])
    aux = model.balance_loss()
    assert aux is not None and aux.requires_grad and aux.item() > 0
    assert model.balance_loss() is None  # cleared
    assert EngramMoE(ModelConfig(**{**cfg.__dict__, "balance_aux": None})).balance_loss() is None


def test_router_moment_loss_is_zero_for_equal_moments_and_pulls_a_common_offset_back():
    from engram.moe import router_moment_loss

    gen = torch.Generator().manual_seed(0)
    column_T = torch.randn(256, generator=gen)
    column_T = column_T - column_T.mean()  # mean 0, so scaling an expert's logits below changes its std only
    # Every expert sees the same logits over the batch in another order: equal means and stds.
    equal_TE = torch.stack([column_T[torch.randperm(256, generator=gen)] for _ in range(4)], dim=1)
    assert router_moment_loss(equal_TE).item() == pytest.approx(0.0, abs=1e-10)
    logits_TE = (equal_TE + torch.tensor([2.0, 0.0, 0.0, 0.0])).requires_grad_()
    loss = router_moment_loss(logits_TE)
    (grad_TE,) = torch.autograd.grad(loss, logits_TE)
    assert loss.item() == pytest.approx(1.0, rel=1e-5)  # var([2, 0, 0, 0]), unbiased
    assert (grad_TE[:, 0] > 0).all() and (grad_TE[:, 1:] < 0).all()  # descent lowers expert 0, raises the rest
    spread_TE = (equal_TE * torch.tensor([3.0, 1.0, 1.0, 1.0])).requires_grad_()
    (grad_TE,) = torch.autograd.grad(router_moment_loss(spread_TE), spread_TE)
    # Descent shrinks the wider expert's logits toward its mean: the gradient has the sign of the centred logit.
    centred_T = spread_TE[:, 0].detach() - spread_TE[:, 0].detach().mean()
    assert ((grad_TE[:, 0] * centred_T)[centred_T.abs() > 1e-3] > 0).all()


def test_balance_moments_alone_balances_a_herding_router_and_only_in_training():
    """No bias step and no sequence-wise loss: only the moment loss's gradient trains the router of
    _biased_router_moe, which sends every token to experts 0 and 1; 120 SGD steps on it spread the load."""
    def train(beta):
        return _router_load_after_training_on_its_balance_loss("balance_moments", beta, lr=1.0)

    assert train(None)[0] > 3.0  # every token on 2 of 8 experts (max / mean 4)
    max_load, min_load, starved = train(1.0)
    assert max_load <= 1.5 and starved == 0


def test_balance_moments_is_not_applied_when_every_expert_is_selected():
    # n_routed == top_k (an allocation's rho = 0): the load is equal by construction, so no moment loss; the
    # sequence-wise loss is constant there (f_i = 1 for all i) and stays.
    torch.manual_seed(3)
    x = torch.randn(2, 8, 16)
    every = MoE(16, 8, 2, 2, 1, 0.0, balance_moments=10.0)
    every.train()
    every(x)
    assert every.aux_loss is None
    both = MoE(16, 8, 2, 2, 1, 0.0, balance_aux=0.01, balance_moments=10.0)
    both.train()
    both(x)
    assert both.aux_loss is not None and both.aux_loss.item() == pytest.approx(0.01)
    routed = MoE(16, 8, 4, 2, 1, 0.0, balance_moments=10.0)
    routed.train()
    routed(x)
    assert routed.aux_loss is not None and routed.aux_loss.item() > 0
