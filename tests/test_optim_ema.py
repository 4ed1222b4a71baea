"""param_ema: an EMA of the weights in the optimizer state, equal to a hand-written (timm) loop, checkpointed, one line to evaluate."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trainkit as tk
from trainkit import optim


def timm_decay(step, decay, use_warmup, gamma, power):
    """timm's ModelEmaV3.get_decay(step), written out again (update_after_step=0, min_decay=0)."""
    step = max(0, step - 1)
    if step <= 0:
        return 0.0
    return min(1 - (1 + step / gamma) ** -power, decay) if use_warmup else decay


@settings(max_examples=15, deadline=None)
@given(st.floats(0.5, 0.999), st.booleans(), st.floats(0.5, 5.0), st.floats(0.3, 1.0), st.integers(1, 12), st.integers(0, 999),
       st.booleans())
def test_equals_a_hand_written_ema_loop(decay, warmup, gamma, power, steps, seed, donate):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(3, 2, generator=g, dtype=torch.float64), "b": torch.randn(2, generator=g, dtype=torch.float64)}
    grads = [{n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()} for _ in range(steps)]

    ref = {n: p.clone().requires_grad_() for n, p in params.items()}
    opt = torch.optim.AdamW(ref.values(), lr=0.01, foreach=False)
    ema = {n: p.clone() for n, p in params.items()}
    for i, gs in enumerate(grads, start=1):
        for n, r in ref.items():
            r.grad = gs[n].clone()
        opt.step()
        d = timm_decay(i, decay, warmup, gamma, power)
        ema = {n: d * e + (1 - d) * ref[n].detach() for n, e in ema.items()}

    tx = optim.chain(optim.adamw(0.01), optim.param_ema(decay, warmup=warmup, warmup_gamma=gamma, warmup_power=power))
    p = {n: t.clone() for n, t in params.items()}
    s = optim.init(tx, p)
    for gs in grads:
        p, s = optim.apply_gradients(tx, gs, s, p, donate=donate)
    tk.testing.assert_trees_close(optim.ema_params(s), ema, rtol=1e-6, atol=1e-9)
    tk.testing.assert_trees_close(p, {n: r.detach() for n, r in ref.items()}, rtol=1e-6, atol=1e-9)


def test_checkpointed_and_one_line_to_evaluate(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    tx = optim.chain(optim.sgd(0.1), optim.param_ema(0.5))
    state = tk.TrainState.create(net, tx)
    for _ in range(3):
        state = state.apply_gradients({n: torch.ones_like(p) for n, p in state.params.items()})
    ema = optim.ema_params(state.opt_state)
    assert not torch.equal(ema["weight"], state.params["weight"].detach())
    x = torch.randn(4, 3)
    out, _ = state.replace(params=optim.ema_params(state.opt_state)).apply(None, x)  # evaluate with the EMA weights
    torch.testing.assert_close(out, torch.nn.functional.linear(x, ema["weight"], ema["bias"]))
    tk.save(state, tmp_path / "c.pt")
    resumed = tk.load(tmp_path / "c.pt", like=tk.TrainState.create(net, tx))
    tk.testing.assert_trees_equal(optim.ema_params(resumed.opt_state), ema)


def test_an_optimizer_without_ema_says_how_to_add_one():
    with pytest.raises(ValueError, match=r"keeps no EMA of the weights.*optim.param_ema\(0.999\)"):
        optim.ema_params(optim.init(optim.adam(1e-3), {"w": torch.zeros(1)}))


def test_ema_inside_or_outside_multisteps_follows_the_applied_updates_only():
    params = {"w": torch.zeros(2)}
    grads = [{"w": torch.full((2,), float(i))} for i in range(6)]
    inside = optim.MultiSteps(optim.chain(optim.sgd(0.1), optim.param_ema(0.5)), every_k=3)
    outside = optim.chain(optim.MultiSteps(optim.sgd(0.1), every_k=3), optim.param_ema(0.5))
    results = []
    for tx in (inside, outside):
        p = {n: t.clone() for n, t in params.items()}
        s = optim.init(tx, p)
        for gs in grads:
            p, s = optim.apply_gradients(tx, gs, s, p, donate=True)
        results.append((p, optim.ema_params(s), optim.find_state(s, "count")))
    tk.testing.assert_trees_equal(results[0][:2], results[1][:2])
