"""MultiSteps: k micro-batches, one update; equal to the big batch and to torch's accumulation loop; fp16 skips; jit."""

import pytest
import torch
import torch.nn.functional as F

import trainkit as tk
from trainkit import optim

K, MICRO = 3, 4


def mse_step(state, batch):
    x, y = batch
    loss, grads = tk.value_and_grad(lambda p: F.mse_loss(state.apply(p, x)[0], y))(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def data(n_updates, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_updates * K * MICRO, 5, generator=g, dtype=torch.float64) * scale
    y = x @ torch.randn(5, 2, generator=g, dtype=torch.float64)
    return x, y


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()


def micro_batches(x, y):
    return [(x[i : i + MICRO], y[i : i + MICRO]) for i in range(0, len(x), MICRO)]


def big_batches(x, y):
    return [(x[i : i + K * MICRO], y[i : i + K * MICRO]) for i in range(0, len(x), K * MICRO)]


def tx_of(schedule=False):
    return optim.adamw(optim.linear_schedule(0.05, 0.0, 10) if schedule else 0.05, weight_decay=0.1)


@pytest.mark.parametrize("donate", [False, True])
def test_k_micro_batches_equal_one_step_on_their_concatenation(donate):
    x, y = data(4)
    acc = tk.TrainState.create(model(), optim.MultiSteps(tx_of(schedule=True), every_k=K))
    big = tk.TrainState.create(model(), tx_of(schedule=True))
    with tk.donating(donate):
        acc, big = acc.clone(), big.clone()
        for i, batch in enumerate(micro_batches(x, y)):
            before = {n: p.detach().clone() for n, p in acc.params.items()}
            acc, _ = mse_step(acc, batch)
            if i % K < K - 1:  # only accumulates: the params do not move, the schedule does not advance
                tk.testing.assert_trees_equal({n: p.detach() for n, p in acc.params.items()}, before)
                assert optim.is_accumulating(acc.opt_state) == (i % K < K - 2)
        for batch in big_batches(x, y):
            big, _ = mse_step(big, batch)
    tk.testing.assert_trees_close(acc.params, big.params, rtol=1e-6, atol=1e-9)
    assert optim.count(acc.opt_state) == optim.count(big.opt_state) == 4  # the schedule advanced per applied update
    assert acc.lr == big.lr == pytest.approx(0.05 * 0.6)


def test_pure_and_donated_accumulation_are_bit_identical():
    x, y = data(2)
    state = tk.TrainState.create(model(), optim.MultiSteps(optim.chain(tx_of(), optim.param_ema(0.9)), every_k=K))
    pure = donated = state
    with tk.donating():
        donated = donated.clone()
        for batch in micro_batches(x, y):
            donated, _ = mse_step(donated, batch)
    for batch in micro_batches(x, y):
        pure, _ = mse_step(pure, batch)
    tk.testing.assert_trees_equal((donated.params, donated.opt_state), (pure.params, pure.opt_state))


def test_equals_a_hand_written_torch_accumulation_loop():
    x, y = data(3)
    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1, foreach=False)
    for i, (xb, yb) in enumerate(micro_batches(x, y)):
        (F.mse_loss(net(xb), yb) / K).backward()  # what a Lightning user's accumulate_grad_batches does
        if (i + 1) % K == 0:
            opt.step()
            opt.zero_grad()
    state = tk.TrainState.create(model(), optim.MultiSteps(tx_of(), every_k=K))
    state, _ = tk.fit(mse_step, state, micro_batches(x, y), epochs=1, progress=False)
    tk.testing.assert_trees_close(state.params, {n: p.detach() for n, p in net.named_parameters()}, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bad_at", [0, 1, K - 1])
def test_fp16_a_non_finite_micro_batch_skips_the_whole_accumulated_update(bad_at):
    g = torch.Generator().manual_seed(0)
    good = [(torch.rand(8, 4, generator=g) * 0.1, torch.zeros(8, 1)) for _ in range(2 * K)]
    huge = (torch.full((8, 4), 1e4), torch.zeros(8, 1))  # d(loss * 2**16)/d(output) overflows float16
    torch.manual_seed(0)
    state0 = tk.TrainState.create(torch.nn.Linear(4, 1), optim.MultiSteps(optim.adam(optim.linear_schedule(0.1, 0.0, 100)), every_k=K))
    step = tk.mixed_precision(mse_step_f32, dtype=torch.float16)
    state = state0
    for i in range(K):  # the first accumulation has one bad micro-batch: no update at all
        state, m = step(state, huge if i == bad_at else good[i])
    tk.testing.assert_trees_equal(state.params, state0.params)
    assert optim.count(state.opt_state) == 0 and state.lr == 0.1 and state.slots["mixed_precision"]["skipped_steps"] == 1
    assert optim.find_state(state.opt_state, "mini_step") == 0 and optim.find_state(state.opt_state, "poisoned") is False
    for i in range(K):  # the next accumulation starts clean and updates
        state, _ = step(state, good[K + i])
    assert optim.count(state.opt_state) == 1
    clean = state0
    for i in range(K):
        clean, _ = step(clean, good[K + i])
    tk.testing.assert_trees_close(state.params, clean.params)  # as if the poisoned accumulation never happened


def mse_step_f32(state, batch):
    x, y = batch

    def loss_fn(p):
        return F.mse_loss(state.apply(p, x)[0].float(), y)

    loss, grads = tk.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def test_map_accumulated_and_is_accumulating_for_the_distributed_side():
    p = {"w": torch.zeros(2)}
    tx = optim.MultiSteps(optim.sgd(1.0), every_k=2)
    s = optim.init(tx, p)
    assert optim.is_accumulating(s)
    _, s = optim.apply_gradients(tx, {"w": torch.ones(2)}, s, p, donate=False)
    assert not optim.is_accumulating(s)
    s = optim.map_accumulated(s, lambda acc: {n: a * 3 for n, a in acc.items()})  # e.g. an all-reduce (sum over 3 ranks)
    new, s = optim.apply_gradients(tx, {"w": torch.ones(2)}, s, p, donate=False)
    assert new["w"].tolist() == [-2.0, -2.0]  # (3 * 1 + 1) / 2
    assert optim.is_accumulating(s)
    assert not optim.is_accumulating(optim.init(optim.MultiSteps(optim.sgd(1.0), every_k=1), p))


def test_under_jit_equals_eager_and_compiles_at_most_three_graphs():
    x, y = data(2)
    x, y = x.float(), y.float()
    make = lambda: tk.TrainState.create(model().float(), optim.MultiSteps(tx_of(schedule=True), every_k=K))  # noqa: E731
    jitted = tk.jit(mse_step, backend="aot_eager")
    s_jit, s_eager = make(), make()
    for batch in micro_batches(x, y):
        s_jit, _ = jitted(s_jit, batch)
        s_eager, _ = mse_step(s_eager, batch)
    tk.testing.assert_trees_close(s_jit.params, s_eager.params, rtol=1e-5, atol=1e-6)
    assert optim.count(s_jit.opt_state) == 2 and s_jit.lr == pytest.approx(s_eager.lr)
    assert isinstance(s_jit.lr, float)
    print("MultiSteps under jit: compiles", jitted.compiles, jitted.recompile_reasons)
    assert jitted.compiles <= 3, jitted.recompile_reasons


@pytest.mark.slow
def test_under_inductor_equals_eager():
    x, y = data(2)
    x, y = x.float(), y.float()
    make = lambda: tk.TrainState.create(model().float(), optim.MultiSteps(tx_of(schedule=True), every_k=K))  # noqa: E731
    jitted = tk.jit(mse_step)
    s_jit, s_eager = make(), make()
    for batch in micro_batches(x, y):
        s_jit, _ = jitted(s_jit, batch)
        s_eager, _ = mse_step(s_eager, batch)
    tk.testing.assert_trees_close(s_jit.params, s_eager.params, rtol=1e-5, atol=1e-6)
    assert optim.count(s_jit.opt_state) == 2 and jitted.compiles <= 3
