"""trainkit.optim equals torch.optim, pure and donated bit for bit; update is pure; bad inputs say the fix."""

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


def assert_unchanged(before, tree):
    """Values and tensor version counters as in ``before`` (a tk.testing.snapshot)."""
    after = tk.testing.snapshot(tree)
    assert [a[0] for a in after] == [b[0] for b in before]
    for (path, copy, version), (_, now, now_version) in zip(before, after, strict=True):
        assert now_version == version, f"{path} was written in place"
        assert torch.equal(now, copy) if isinstance(copy, torch.Tensor) else now == copy, f"{path} changed"


def make_problem(shape_list, steps, seed):
    g = torch.Generator().manual_seed(seed)
    params = {f"p{i}": torch.randn(*s, generator=g, dtype=torch.float64) for i, s in enumerate(shape_list)}
    grads = [{n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()} for _ in range(steps)]
    return params, grads


def torch_reference(params, grads, torch_cls, groups=None, **kwargs):
    ref = {n: p.clone().requires_grad_() for n, p in params.items()}
    opt = torch_cls(groups(ref) if groups else list(ref.values()), **kwargs)
    for gs in grads:
        for n, r in ref.items():
            r.grad = gs[n].clone()
        opt.step()
    return {n: r.detach() for n, r in ref.items()}


def run_ours(tx, params, grads, donate):
    p = {n: t.clone() for n, t in params.items()}
    s = optim.init(tx, p)
    for gs in grads:
        before = (tk.testing.snapshot(p), tk.testing.snapshot(s))
        new_p, new_s = optim.apply_gradients(tx, gs, s, p, donate=donate)
        if donate:
            assert all(new_p[n] is p[n] for n in p), "a donated update is in place"
        else:
            assert_unchanged(before[0], p)
            assert_unchanged(before[1], s)
        p, s = new_p, new_s
    return p, s


def assert_matches_torch(tx, params, grads, expected):
    pure, s_pure = run_ours(tx, params, grads, donate=False)
    donated, s_donated = run_ours(tx, params, grads, donate=True)
    tk.testing.assert_trees_close(pure, expected, rtol=1e-6, atol=1e-9)
    tk.testing.assert_trees_equal(donated, pure)
    tk.testing.assert_trees_equal(s_donated, s_pure)


@settings(max_examples=20, deadline=None)
@given(shapes, lrs, st.sampled_from([0.0, 0.5, 0.9]), st.booleans(), st.sampled_from([0.0, 0.0, 0.3]), decay,
       st.integers(1, 6), st.integers(0, 999))
def test_sgd_matches_torch(shape_list, lr, momentum, nesterov, dampening, wd, steps, seed):
    nesterov = nesterov and momentum > 0
    dampening = 0.0 if nesterov else dampening
    params, grads = make_problem(shape_list, steps, seed)
    kw = dict(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd)
    expected = torch_reference(params, grads, torch.optim.SGD, lr=lr, **kw)
    assert_matches_torch(optim.sgd(lr, **kw), params, grads, expected)


@settings(max_examples=20, deadline=None)
@given(shapes, lrs, st.floats(0.5, 0.99), st.floats(0.9, 0.9999), st.sampled_from([1e-8, 1e-6, 1e-3]), decay,
       st.integers(1, 6), st.integers(0, 999), st.booleans())
def test_adam_and_adamw_match_torch(shape_list, lr, b1, b2, eps, wd, steps, seed, decoupled):
    params, grads = make_problem(shape_list, steps, seed)
    ours, cls = (optim.adamw, torch.optim.AdamW) if decoupled else (optim.adam, torch.optim.Adam)
    expected = torch_reference(params, grads, cls, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, foreach=False)
    assert_matches_torch(ours(lr, b1, b2, eps, weight_decay=wd), params, grads, expected)


@settings(max_examples=10, deadline=None)
@given(shapes, st.floats(0.01, 5.0), st.integers(0, 999))
def test_clip_by_global_norm_and_clip_match_torch(shape_list, limit, seed):
    params, (grads,) = make_problem(shape_list, 1, seed)
    grads = {n: 3 * g for n, g in grads.items()}
    for ours, theirs in ((optim.clip_by_global_norm, torch.nn.utils.clip_grad_norm_), (optim.clip, torch.nn.utils.clip_grad_value_)):
        ref = {n: torch.zeros_like(g, requires_grad=True) for n, g in grads.items()}
        for n, r in ref.items():
            r.grad = grads[n].clone()
        theirs(list(ref.values()), limit)
        tx = ours(limit)
        out, _ = tx.update(grads, tx.init(params), params)
        tk.testing.assert_trees_close(out, {n: r.grad for n, r in ref.items()}, rtol=1e-6, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(shapes, st.integers(1, 5), st.integers(0, 999))
def test_chain_with_a_schedule_and_clipping_pure_and_donated_bit_identical(shape_list, steps, seed):
    params, grads = make_problem(shape_list, steps, seed)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20)))
    pure, s_pure = run_ours(tx, params, grads, donate=False)
    donated, s_donated = run_ours(tx, params, grads, donate=True)
    tk.testing.assert_trees_equal((donated, s_donated), (pure, s_pure))


@pytest.mark.parametrize(
    "tx",
    [
        optim.sgd(0.1, 0.9, nesterov=True, weight_decay=0.01),
        optim.adam(0.01, weight_decay=0.1),
        optim.adamw(0.01, weight_decay=0.1, mask=optim.decay_mask),
        optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(optim.cosine_decay_schedule(0.01, 10))),
        optim.MultiSteps(optim.chain(optim.adamw(0.01), optim.param_ema(0.9)), every_k=2),
        optim.partition({"a": optim.adam(0.01), "b": optim.sgd(0.1, 0.9)}, lambda n, p: "a" if p.ndim > 1 else "b"),
    ],
)
def test_update_is_pure_and_equals_the_fused_donated_apply(tx):
    params, grads = make_problem([(3, 2), (4,)], 4, seed=0)
    s_fused = optim.init(tx, params)
    fused = {n: p.clone() for n, p in params.items()}
    unfused, s = dict(params), s_fused
    for gs in grads:
        before = [tk.testing.snapshot(x) for x in (gs, s, unfused)]
        updates, new_s = tx.update(gs, s, unfused)
        for snap, x in zip(before, (gs, s, unfused), strict=True):
            assert_unchanged(snap, x)  # values and version counters
        unfused, s = optim.apply_updates(unfused, updates), new_s
        fused, s_fused = optim.apply_gradients(tx, gs, s_fused, fused, donate=True)
    tk.testing.assert_trees_close(fused, unfused, rtol=1e-12, atol=1e-14)
    tk.testing.assert_trees_close(s_fused, s, rtol=1e-12, atol=1e-14)


def test_a_transformation_is_optax_pair():
    init_fn, update_fn = optim.adamw(1e-3)  # as Optax's: unpacks in two
    p = {"w": torch.ones(2)}
    updates, _ = update_fn({"w": torch.ones(2)}, init_fn(p), p)
    assert updates["w"].shape == (2,)


def test_aliases_are_chains_of_stages_with_one_lr_stage():
    p = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    kinds = lambda tx: tk.optim._base.stage_kinds(optim.init(tx, p))  # noqa: E731
    assert kinds(optim.adamw(1e-3)) == ["scale_by_adam", "add_decayed_weights", "scale_by_learning_rate"]
    assert kinds(optim.adam(1e-3, weight_decay=0.1)) == ["add_decayed_weights", "scale_by_adam", "scale_by_learning_rate"]
    assert kinds(optim.sgd(0.1, momentum=0.9)) == ["trace", "scale_by_learning_rate"]
    s = optim.init(optim.adam(1e-3), p)
    assert sorted(optim.find_state(s, "mu")) == ["b", "w"] and optim.count(s) == 0


# --------------------------------------------------------------------------- schedules


def torch_lrs(make_scheduler, steps, lr=0.1):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = make_scheduler(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def assert_schedule_equals(ours, theirs):
    for i, (a, b) in enumerate(zip([ours(i) for i in range(len(theirs))], theirs, strict=True)):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12), (i, a, b)


@settings(max_examples=15, deadline=None)
@given(st.floats(1e-3, 1.0), st.integers(2, 60), st.floats(0.1, 0.9), st.floats(2.0, 50.0), st.floats(10.0, 1e4), st.floats(0.0, 0.5),
       st.floats(0.1, 1.0), st.floats(0.0, 1.0))
def test_one_cycle_cosine_and_linear_match_torch(lr, total, pct, div, final_div, alpha, start, end):
    S = torch.optim.lr_scheduler
    assert_schedule_equals(
        optim.one_cycle_schedule(lr, total, pct, div, final_div),
        torch_lrs(lambda o: S.OneCycleLR(o, lr, total_steps=total, pct_start=pct, div_factor=div, final_div_factor=final_div), total - 1),
    )
    assert_schedule_equals(
        optim.cosine_decay_schedule(lr, total, alpha),
        torch_lrs(lambda o: S.CosineAnnealingLR(o, T_max=total, eta_min=alpha * lr), total, lr),
    )
    assert_schedule_equals(
        optim.linear_schedule(lr * start, lr * end, total),
        torch_lrs(lambda o: S.LinearLR(o, start_factor=start, end_factor=end, total_iters=total), total + 5, lr),
    )


@settings(max_examples=15, deadline=None)
@given(st.floats(1e-3, 1.0), st.floats(0.05, 0.99), st.integers(1, 7), st.lists(st.integers(1, 40), min_size=1, max_size=4),
       st.floats(0.0, 3.0), st.integers(1, 30), st.integers(5, 60))
def test_new_schedules_match_their_torch_twins(lr, gamma, step_size, milestones, power, total, steps):
    S = torch.optim.lr_scheduler
    assert_schedule_equals(optim.step_schedule(lr, step_size, gamma), torch_lrs(lambda o: S.StepLR(o, step_size, gamma), steps, lr))
    assert_schedule_equals(
        optim.multistep_schedule(lr, milestones, gamma), torch_lrs(lambda o: S.MultiStepLR(o, milestones, gamma), steps, lr)
    )
    assert_schedule_equals(optim.exponential_schedule(lr, gamma), torch_lrs(lambda o: S.ExponentialLR(o, gamma), steps, lr))
    assert_schedule_equals(
        optim.polynomial_schedule(lr, 0.0, power, total), torch_lrs(lambda o: S.PolynomialLR(o, total_iters=total, power=power), steps, lr)
    )
    # ConstantLR is piecewise constant: lr * gamma until total, then lr.
    assert_schedule_equals(
        optim.piecewise_constant_schedule(lr * gamma, {total: 1 / gamma}), torch_lrs(lambda o: S.ConstantLR(o, gamma, total), steps, lr)
    )
    scales = {m: gamma for m in sorted(set(milestones))}
    lam = lambda e: gamma ** sum(e >= m for m in scales)  # noqa: E731
    assert_schedule_equals(optim.piecewise_constant_schedule(lr, scales), torch_lrs(lambda o: S.LambdaLR(o, lam), steps, lr))


def test_schedules_advance_with_updates_not_with_skipped_steps():
    tx = optim.sgd(optim.linear_schedule(1.0, 0.0, 10))
    p = {"w": torch.zeros(1)}
    s = optim.init(tx, p)
    _, s = optim.apply_gradients(tx, {"w": torch.ones(1)}, s, p, donate=False)
    assert optim.count(s) == 1 and optim.get_lr(s) == pytest.approx(0.9)
    assert optim.skip_update(tx, s) is s


# --------------------------------------------------------------------------- the LR in the state


def step_with_ones(tx, s, p, n=1):
    for _ in range(n):
        p, s = optim.apply_gradients(tx, {k: torch.ones_like(v) for k, v in p.items()}, s, p, donate=False)
    return p, s


def test_set_lr_is_lasting_and_override_lr_lasts_one_update():
    tx, p = optim.adam(0.05), {"w": torch.zeros(2)}
    s = optim.set_lr(optim.init(tx, p), 0.005)
    _, s = step_with_ones(tx, s, p, 3)
    assert optim.get_lr(s) == 0.005  # a lasting change stays exactly
    s = optim.override_lr(s, 0.5)
    assert optim.get_lr(s) == 0.5
    _, s = step_with_ones(tx, s, p)
    assert optim.get_lr(s) == 0.005


def test_set_lr_multiplies_a_schedule_from_then_on():
    sched = optim.cosine_decay_schedule(1.0, 10)
    tx, p = optim.sgd(sched), {"w": torch.zeros(1)}
    _, s = step_with_ones(tx, optim.init(tx, p), p, 2)
    s = optim.set_lr(s, optim.get_lr(s) * 0.1)  # what a plateau rule does
    assert optim.get_lr(s) == pytest.approx(0.1 * sched(2))
    w, s2 = step_with_ones(tx, s, {"w": torch.zeros(1)})
    assert w["w"].item() == pytest.approx(-0.1 * sched(2))  # the changed LR was used...
    assert optim.get_lr(s2) == pytest.approx(0.1 * sched(3))  # ...and the schedule keeps its shape
    warm = optim.sgd(optim.linear_schedule(0.0, 1.0, 5))
    with pytest.raises(ValueError, match="the schedule is 0 at update 0.*override_lr"):
        optim.set_lr(optim.init(warm, p), 0.1)


def test_lasting_lr_survives_a_checkpoint(tmp_path):
    state = tk.TrainState.create(torch.nn.Linear(2, 1), optim.adam(0.05)).with_lr(0.005)
    state = state.apply_gradients({k: torch.ones_like(v) for k, v in state.params.items()})
    tk.save(state, tmp_path / "ckpt.pt")
    like = tk.TrainState.create(torch.nn.Linear(2, 1), optim.adam(0.05))
    resumed = tk.load(tmp_path / "ckpt.pt", like=like)
    assert resumed.lr == 0.005 and like.lr == 0.05


def test_lr_accessors_work_through_groups_multisteps_and_a_wrapper_of_ones_own():
    p = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    label = lambda n, t: "decay" if t.ndim > 1 else "none"  # noqa: E731
    groups = optim.partition({"decay": optim.adamw(0.1), "none": optim.adamw(0.2, weight_decay=0.0)}, label)
    s = optim.init(optim.MultiSteps(groups, every_k=2), p)
    assert optim.get_lr(s) == 0.1 and optim.get_lrs(s) == [0.1, 0.2]
    assert optim.get_lrs(optim.set_lr(s, lambda lr: lr / 2)) == [0.05, 0.1]
    assert optim.get_lrs(optim.map_lr(s, lambda lr: torch.tensor(lr))) == [torch.tensor(0.1), torch.tensor(0.2)]

    def wrapper(inner):  # a user's own wrapper: keeps the inner state in a dict
        return optim.GradientTransformation(lambda ps: {"inner": inner.init(ps)}, lambda u, st, ps: _wrap(inner, u, st, ps))

    def _wrap(inner, u, st, ps):
        u, s2 = inner.update(u, st["inner"], ps)
        return u, {"inner": s2}

    tx = wrapper(optim.sgd(0.3))
    s = optim.init(tx, p)
    assert optim.get_lr(s) == 0.3 and optim.get_lr(optim.set_lr(s, 0.1)) == 0.1
    _, s = step_with_ones(tx, s, p)
    assert optim.count(s) == 1

    own = optim.GradientTransformation(lambda ps: (), lambda u, st, ps: ({n: -0.1 * g for n, g in u.items()}, st))
    with pytest.raises(ValueError, match=r"no scale_by_learning_rate stage.*scale_by_learning_rate\(lr\)"):
        optim.get_lr(optim.init(own, p))


def test_weight_decay_lives_in_the_state():
    tx, p = optim.adamw(0.1, weight_decay=0.1), {"w": torch.ones(1)}
    s = optim.set_weight_decay(optim.init(tx, p), 0.0)
    new, _ = optim.apply_gradients(tx, {"w": torch.zeros(1)}, s, p, donate=False)
    assert new["w"].item() == 1.0  # no gradient, no decay
    with pytest.raises(ValueError, match="no add_decayed_weights stage"):
        optim.set_weight_decay(optim.init(optim.sgd(0.1), p), 0.1)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: optim.sgd(-1.0), r"sgd: lr must be a number in \[0.0, inf\], got -1.0. Pass e.g. lr=0.001"),
        (lambda: optim.sgd(0.1, momentum=None), r"sgd: momentum must be a number in \[0.0, 1.0\], got None. Pass e.g. momentum=0.9"),
        (lambda: optim.sgd(True), "sgd: lr must be a number"),
        (lambda: optim.sgd(0.1, momentum="0.9"), "sgd: momentum must be a number"),
        (lambda: optim.sgd(0.1, nesterov=1), "nesterov must be True or False"),
        (lambda: optim.adam(1e-3, b1=1.5), r"adam: b1 must be a number in \[0.0, 1.0\)"),
        (lambda: optim.adamw(1e-3, weight_decay=None), "adamw: weight_decay must be a number"),
        (lambda: optim.sgd(0.1, nesterov=True), "nesterov=True needs momentum > 0"),
        (lambda: optim.chain(optim.sgd(0.1), torch.optim.SGD), "expected a GradientTransformation"),
        (lambda: optim.clip_by_global_norm(0.0), r"max_norm must be a number in \(0.0, inf\]"),
        (lambda: optim.MultiSteps(optim.sgd(0.1), every_k=0), "every_k must be an int >= 1, got 0. Pass e.g. every_k=4"),
        (lambda: optim.MultiSteps(optim.sgd(0.1), every_k=2.0), "every_k must be an int >= 1"),
        (lambda: optim.step_schedule(0.1, step_size=0), "step_size must be an int >= 1"),
        (lambda: optim.param_ema(1.5), "param_ema: decay must be a number"),
    ],
)
def test_bad_hyperparameters_are_rejected_at_construction(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_a_chain_given_the_wrong_number_of_states_says_the_fix():
    p = {"w": torch.zeros(1)}
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1))
    wrong = optim.init(optim.chain(optim.sgd(0.1)), p)
    with pytest.raises(ValueError, match=r"chain: a chain of 2 stages got a tuple of 1 states. Make the state with this chain's init"):
        tx.update({"w": torch.ones(1)}, wrong, p)
    with pytest.raises(ValueError, match="chain: a chain of 2 stages got"):
        optim.apply_gradients(tx, {"w": torch.ones(1)}, wrong, p, donate=True)


def test_the_lr_range_test_and_set_lr_refuse_bad_lrs():
    s = optim.init(optim.sgd(0.1), {"w": torch.zeros(1)})
    for bad in (None, True, "0.1", -1.0, float("nan")):
        with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
            optim.set_lr(s, bad)


# --------------------------------------------------------------------------- under trainkit.jit


def _mse_step(state, batch):
    x, y = batch
    loss, grads = tk.value_and_grad(lambda p: torch.nn.functional.mse_loss(state.apply(p, x)[0], y))(state.params)
    return state.apply_gradients(grads), {"loss": loss}


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.cosine_decay_schedule(0.01, 20), mask=optim.decay_mask)),
        lambda: optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda: optim.chain(
            optim.partition({"w": optim.adam(0.01), "b": optim.sgd(0.1)}, lambda n, p: "w" if p.ndim > 1 else "b"), optim.param_ema(0.9)
        ),
    ],
)
def test_every_stage_runs_under_jit_with_tensor_lrs_and_a_lasting_change_does_not_recompile(make_tx):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)) for _ in range(5)]
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    jitted = tk.jit(_mse_step, backend="aot_eager")
    s_jit = s_eager = tk.TrainState.create(net, make_tx())
    for i, batch in enumerate(batches):
        if i == 3:  # a lasting change mid-run (a plateau rule's): an input of the graph, not a constant
            s_jit, s_eager = s_jit.with_lr(s_jit.lr * 0.5), s_eager.with_lr(s_eager.lr * 0.5)
        s_jit, _ = jitted(s_jit, batch)
        s_eager, _ = _mse_step(s_eager, batch)
    tk.testing.assert_trees_close((s_jit.params, s_jit.opt_state), (s_eager.params, s_eager.opt_state), rtol=1e-5, atol=1e-6)
    assert isinstance(s_jit.lr, float) and s_jit.lr == pytest.approx(s_eager.lr)
    assert jitted.compiles <= 2, jitted.recompile_reasons  # sgd's momentum: torch's first-step rule is a second graph


def test_donated_adam_is_torchs_fused_kernel_bit_for_bit():
    # The donated (and pure) apply of a plain adam chain is one call of torch's fused Adam kernel.
    params, grads = make_problem([(5, 7), (7,)], 4, seed=1)
    params = {n: p.float() for n, p in params.items()}
    grads = [{n: g.float() for n, g in gs.items()} for gs in grads]
    expected = torch_reference(params, grads, torch.optim.Adam, lr=0.01, fused=True)
    tk.testing.assert_trees_equal(run_ours(optim.adam(0.01), params, grads, donate=True)[0], expected)
    tk.testing.assert_trees_equal(run_ours(optim.adam(0.01), params, grads, donate=False)[0], expected)
