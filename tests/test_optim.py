"""trainkit.optim equals torch.optim, in the pure and in the donated mode."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trainkit as tk
from trainkit import optim

shapes = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5)), min_size=1, max_size=3)
lrs = st.floats(1e-4, 0.5)
decay = st.sampled_from([0.0, 0.0, 1e-3, 0.1])


def _run(tx, torch_cls, torch_kwargs, shape_list, steps, seed, donate):
    g = torch.Generator().manual_seed(seed)
    params0 = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shape_list]
    grads = [[torch.randn(*s, generator=g, dtype=torch.float64) for s in shape_list] for _ in range(steps)]

    ref = [p.clone().requires_grad_() for p in params0]
    opt = torch_cls(ref, **torch_kwargs)
    for gs in grads:
        for p, gi in zip(ref, gs):
            p.grad = gi.clone()
        opt.step()

    params = {f"p{i}": p.clone().requires_grad_() for i, p in enumerate(params0)}
    state = tk.TrainState(step=0, params=params, buffers={}, opt_state=tx.init(list(params.values())), rng=0, module=None, tx=tx)
    for gs in grads:
        grads_d = {f"p{i}": gi for i, gi in enumerate(gs)}
        if donate:
            with tk.donating():
                new = state.apply_gradients(grads_d)
            assert new.params["p0"] is state.params["p0"], "donated update must be in place"
        else:
            before = [p.clone() for p in state.params.values()]
            new = state.apply_gradients(grads_d)
            for b, p in zip(before, state.params.values()):
                assert torch.equal(b, p), "pure update changed the caller's params"
        state = new
    for p, r in zip(state.params.values(), ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-9)
    return state


@settings(max_examples=25, deadline=None)
@given(shapes, lrs, st.sampled_from([0.0, 0.5, 0.9]), st.booleans(), decay, st.integers(1, 6), st.integers(0, 999), st.booleans())
def test_sgd_matches_torch(shape_list, lr, momentum, nesterov, wd, steps, seed, donate):
    nesterov = nesterov and momentum > 0
    tx = optim.sgd(lr, momentum, nesterov=nesterov, weight_decay=wd)
    _run(tx, torch.optim.SGD, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd), shape_list, steps, seed, donate)


@settings(max_examples=25, deadline=None)
@given(shapes, lrs, st.floats(0.5, 0.99), st.floats(0.9, 0.9999), st.sampled_from([1e-8, 1e-6, 1e-3]), decay,
       st.integers(1, 6), st.integers(0, 999), st.booleans(), st.booleans())
def test_adam_and_adamw_match_torch(shape_list, lr, b1, b2, eps, wd, steps, seed, donate, decoupled):
    if decoupled:
        tx, cls = optim.adamw(lr, b1, b2, eps, weight_decay=wd), torch.optim.AdamW
    else:
        tx, cls = optim.adam(lr, b1, b2, eps, weight_decay=wd), torch.optim.Adam
    _run(tx, cls, dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, foreach=False), shape_list, steps, seed, donate)


@settings(max_examples=15, deadline=None)
@given(shapes, st.floats(0.01, 5.0), st.integers(0, 999))
def test_clip_by_global_norm_matches_torch(shape_list, max_norm, seed):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(*s, generator=g, dtype=torch.float64) * 3 for s in shape_list]
    ref = [torch.zeros_like(x, requires_grad=True) for x in grads]
    for r, x in zip(ref, grads):
        r.grad = x.clone()
    torch.nn.utils.clip_grad_norm_(ref, max_norm)
    tx = optim.clip_by_global_norm(max_norm)
    out, _ = tx.update(grads, tx.init(grads), grads)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r.grad, rtol=1e-6, atol=1e-12)


def test_donated_and_pure_are_bit_identical():
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20)))
    a = _run(tx, torch.optim.AdamW, {}, [(3, 4)], 0, 0, False)  # 0 steps: just builds the state
    grads = {"p0": torch.randn(3, 4, dtype=torch.float64)}
    pure = a.apply_gradients(grads)
    donated_in = a.clone()
    with tk.donating():
        donated = donated_in.apply_gradients(grads)
    tk.testing.assert_trees_equal(donated, pure)


def test_schedules_match_torch_schedulers():
    p = [torch.zeros(1, requires_grad=True)]
    opt = torch.optim.SGD(p, lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=50)
    ours = optim.one_cycle_schedule(0.1, 50)
    for i in range(50):
        assert math.isclose(opt.param_groups[0]["lr"], ours(i), rel_tol=1e-9), i
        opt.step()
        sched.step() if i < 49 else None
    opt = torch.optim.SGD(p, lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    ours = optim.cosine_decay_schedule(0.1, 20)
    for i in range(20):
        assert math.isclose(opt.param_groups[0]["lr"], ours(i), rel_tol=1e-9, abs_tol=1e-12), i
        opt.step()
        sched.step()


def test_schedule_advances_with_updates_and_lr_is_settable():
    tx = optim.sgd(optim.linear_schedule(1.0, 0.0, 10))
    state = tk.TrainState.create(torch.nn.Linear(2, 1), tx)
    assert state.lr == 1.0
    g = {k: torch.ones_like(v) for k, v in state.params.items()}
    s1 = state.apply_gradients(g)
    assert s1.lr == pytest.approx(0.9) and s1.opt_state["count"] == 1
    s2 = s1.with_lr(0.5)
    w = s2.params["weight"].detach().clone()
    s3 = s2.apply_gradients(g)
    torch.testing.assert_close(s3.params["weight"].detach(), w - 0.5)  # the overridden LR was used...
    assert s3.lr == pytest.approx(0.8)  # ...and the schedule takes over again


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: optim.sgd(-1.0), "lr must be a non-negative"),
        (lambda: optim.adam(1e-3, b1=1.5), "b1 must be a number in"),
        (lambda: optim.sgd(0.1, nesterov=True), "nesterov=True needs momentum"),
        (lambda: optim.chain(optim.sgd(0.1), torch.optim.SGD), "expected a GradientTransformation"),
        (lambda: optim.clip_by_global_norm(0.0), "max_norm must be > 0"),
    ],
)
def test_bad_hyperparameters_are_rejected_at_construction(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize(
    "tx",
    [
        optim.sgd(0.1, 0.9, nesterov=True, weight_decay=0.01),
        optim.adam(0.01, weight_decay=0.1),
        optim.adamw(0.01, weight_decay=0.1),
        optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(0.01)),
    ],
)
def test_fused_apply_equals_update_then_add(tx):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    fused, unfused = [p.clone() for p in params], [p.clone() for p in params]
    s_fused, s_unfused = tx.init(fused), tx.init(unfused)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        s_fused = optim.apply_updates(tx, grads, s_fused, fused)
        updates, s_unfused = tx.update(grads, s_unfused, unfused)
        torch._foreach_add_(unfused, updates)
    tk.testing.assert_trees_close(fused, unfused, rtol=1e-12, atol=1e-14)
    tk.testing.assert_trees_close(s_fused, s_unfused, rtol=1e-12, atol=1e-14)
