"""tk.jit: the whole step compiled as one graph.

Inductor compiles cost seconds each (about 20 s cold on 2 cores), so the compiled
steps are module-scoped fixtures shared by the tests, and the tests of the wrapper's
own logic (errors, the recompile guard, arguments) use the "eager"/"aot_eager"
backends, which trace with dynamo exactly as inductor does but compile in a blink.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainkit as tk
from trainkit.testing import assert_trees_close
from trainkit.transforms.jit import JitError, JittedStep, RecompileError, RecompileWarning

TOL = dict(rtol=1e-5, atol=1e-5)


def mlp(dropout: float = 0.0) -> nn.Module:
    # no bias before BatchNorm: its gradient would be rounding noise, which Adam amplifies
    layers = [nn.Linear(16, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(32, 4))


def train_step(state, batch):
    x, y = batch

    def loss_fn(params):
        logits, buffers = state.apply(params, x, train=True)
        return F.cross_entropy(logits, y), (logits, buffers)

    (loss, (logits, buffers)), grads = tk.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads, buffers=buffers), {"loss": loss, "acc": (logits.argmax(-1) == y).float().mean()}


def batches(n: int, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 16, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(n)]


def make_state(dropout: float = 0.0, seed: int = 0) -> tk.TrainState:
    torch.manual_seed(seed)
    # a schedule: the LR (a Python float in the state) changes every step, and must not recompile
    tx = tk.optim.adam(tk.optim.cosine_decay_schedule(1e-2, 50))
    return tk.TrainState.create(mlp(dropout), tx, seed=seed)


def assert_states_close(a: tk.TrainState, b: tk.TrainState) -> None:
    assert a.step == b.step
    assert a.lr == pytest.approx(b.lr, rel=1e-9)
    tensors = lambda s: (s.params, s.buffers, tk.optim.find_state(s.opt_state, "mu"), tk.optim.find_state(s.opt_state, "nu"))
    assert_trees_close(tensors(a), tensors(b), **TOL)


@pytest.fixture(scope="module")
def jitted() -> JittedStep:
    """One inductor-compiled step (MLP with BatchNorm, Adam with a schedule), shared by the tests below; compiled here."""
    step = tk.jit(train_step)
    step(make_state(), batches(1)[0])
    assert step.compiles == 1
    return step


# --------------------------------------------------------------------------- inductor: equivalence


@pytest.mark.slow
def test_jit_equals_step_over_several_steps(jitted):
    s_jit = s_eager = make_state()
    for batch in batches(6):
        s_jit, m_jit = jitted(s_jit, batch)
        s_eager, m_eager = train_step(s_eager, batch)
        assert_states_close(s_jit, s_eager)
        assert_trees_close(m_jit, m_eager, **TOL)
    assert s_jit.step == 6 and s_jit.lr < make_state().lr  # the schedule moved
    assert all(t.requires_grad for t in s_jit.params.values())


@pytest.mark.slow
def test_no_recompiles_across_same_shaped_batches(jitted):
    state = make_state(seed=1)  # another seed: the state's rng is dynamic too
    state, _ = jitted(state, batches(1)[0])
    compiles = jitted.compiles
    for batch in batches(15, seed=2):  # new values, same shapes; step, count, lr change every call
        state, _ = jitted(state, batch)
    assert state.step == 16
    assert jitted.compiles == compiles, jitted.recompile_reasons


@pytest.mark.slow
def test_donated_jit_updates_in_place_and_equals_the_eager_step(jitted):
    compiles = jitted.compiles
    s_eager = make_state()
    s_jit = s_eager.clone()
    weight = s_jit.params["0.weight"]
    mean = s_jit.buffers["1.running_mean"]
    with tk.donating():
        for batch in batches(4, seed=3):
            s_jit, _ = jitted(s_jit, batch)
    for batch in batches(4, seed=3):
        s_eager, _ = train_step(s_eager, batch)
    assert s_jit.params["0.weight"] is weight and s_jit.buffers["1.running_mean"] is mean  # in place
    assert_states_close(s_jit, s_eager)
    assert jitted.compiles == compiles  # the pure call runs the donated graph on a copy: one graph for both


@pytest.mark.parametrize("b1, b2", [(0.9, 0.999), (0.0, 0.99)])
def test_traced_adam_bias_correction_equals_the_eager_one(b1, b2):
    # Under a trace Adam's bias correction is computed as tensors (exp(t log b), so that inductor
    # keeps it out of the element loops); b = 0 takes the log(0) = -inf path. aot_eager traces as
    # inductor does, with eager's kernels: what differs is only that formula (and the traced backward's rounding).
    def fresh() -> tk.TrainState:
        torch.manual_seed(0)
        return tk.TrainState.create(mlp(), tk.optim.adam(1e-2, b1=b1, b2=b2))

    step = tk.jit(train_step, backend="aot_eager")
    s_jit = s_eager = fresh()
    for batch in batches(4, seed=3):
        s_jit, _ = step(s_jit, batch)
        s_eager, _ = train_step(s_eager, batch)
    assert tk.optim.count(s_jit.opt_state) == 4
    nu = lambda s: tk.optim.find_state(s.opt_state, "nu")
    assert_trees_close((s_jit.params, nu(s_jit)), (s_eager.params, nu(s_eager)), **TOL)
    moved = [(a - b).abs().max().item() for a, b in zip(s_jit.params.values(), fresh().params.values(), strict=True)]
    assert max(moved) > 1e-3  # it trained


@pytest.mark.parametrize("b1, b2", [(0.9, 0.999), (0.0, 0.99), (0.5, 0.0), (0.0, 0.0)])
def test_the_traced_bias_correction_is_the_python_one(b1, b2):
    from trainkit.optim._stages import _traced_bias_correction

    for t in (1, 2, 7, 1000):
        eps_c2, c = _traced_bias_correction(t, b1, b2, 1e-8)
        c2 = math.sqrt(1 - b2**t)
        assert eps_c2.item() == pytest.approx(1e-8 * c2, rel=1e-12) and c.item() == pytest.approx(c2 / (1 - b1**t), rel=1e-12)


@pytest.mark.slow
def test_jit_passes_check_step_when_not_donating(jitted):
    state = make_state()
    new_state, metrics = tk.testing.check_step(jitted, state, batches(1)[0])
    eager_state, eager_metrics = train_step(state, batches(1)[0])
    assert_states_close(new_state, eager_state)
    assert_trees_close(metrics, eager_metrics, **TOL)


@pytest.mark.slow
def test_fit_with_a_jitted_step_equals_fit_with_the_step(jitted):
    data = batches(4, seed=4)
    val = batches(2, seed=5)

    def eval_step(state, batch):
        x, y = batch
        return {"loss": F.cross_entropy(state.apply(None, x)[0], y)}

    state = make_state()
    compiles = jitted.compiles
    s_jit, h_jit = tk.fit(jitted, state, data, epochs=2, eval_step=eval_step, val_loader=val, progress=False)
    s_eager, h_eager = tk.fit(train_step, state, data, epochs=2, eval_step=eval_step, val_loader=val, progress=False)
    assert_states_close(s_jit, s_eager)
    assert [round(h["val_loss"], 4) for h in h_jit] == [round(h["val_loss"], 4) for h in h_eager]
    assert jitted.compiles == compiles  # fit donates: the same graph, and the eager eval steps do not disturb it


# --------------------------------------------------------------------------- inductor: randomness


@pytest.mark.slow
def test_dropout_is_seeded_from_the_state_outside_the_graph():
    step = tk.jit(train_step)
    state = make_state(dropout=0.5)
    batch = batches(1)[0]
    rng_before = torch.get_rng_state()
    _, m1 = step(state, batch)
    _, m2 = step(state, batch)
    _, m3 = step(state.replace(step=7), batch)
    _, m4 = step(state.replace(rng=123), batch)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left as it was
    assert torch.equal(m1["loss"], m2["loss"])  # deterministic: same (rng, step), same masks
    assert not torch.equal(m1["loss"], m3["loss"]) and not torch.equal(m1["loss"], m4["loss"])
    assert step.compiles == 1, step.recompile_reasons  # step and rng are dynamic: one graph
    tk.testing.check_step(step, state, batch)  # pure and deterministic, with dropout


@pytest.mark.slow
def test_fallback_random_gives_the_eager_dropout_masks():
    step = tk.jit(train_step, options={"fallback_random": True})
    s_jit = s_eager = make_state(dropout=0.5)
    for batch in batches(3, seed=6):
        s_jit, m_jit = step(s_jit, batch)
        s_eager, m_eager = train_step(s_eager, batch)
        assert_states_close(s_jit, s_eager)
        assert_trees_close(m_jit, m_eager, **TOL)


# --------------------------------------------------------------------------- the wrapper's logic (fast backends)


def test_graph_break_under_fullgraph_explains_what_to_fix():
    def branchy(state, batch):
        state, metrics = train_step(state, batch)
        if metrics["loss"] > 1:  # a Python branch on a tensor's value
            metrics = {**metrics, "big": metrics["loss"]}
        return state, metrics

    with pytest.raises(JitError) as e:
        tk.jit(branchy, backend="eager")(make_state(), batches(1)[0])
    msg = str(e.value)
    assert "cannot be compiled as one graph" in msg and "branchy" in msg
    assert "if metrics[\"loss\"] > 1" in msg  # dynamo's pointer to the line
    assert "torch.where" in msg and "fullgraph=False" in msg  # how to fix it


def test_item_in_a_step_is_an_error_that_says_why():
    def syncing(state, batch):
        state, metrics = train_step(state, batch)
        return state, {"loss": metrics["loss"].item()}

    with pytest.raises(JitError, match=r"metric 'loss' .* is a float, not a tensor.*\.item\(\)"):
        tk.jit(syncing, backend="eager")(make_state(), batches(1)[0])


def test_fullgraph_false_allows_graph_breaks():
    def printing(state, batch):
        state, metrics = train_step(state, batch)
        print("loss", metrics["loss"])  # a graph break
        return state, metrics

    step = tk.jit(printing, backend="eager", fullgraph=False)
    s1, m1 = step(make_state(), batches(1)[0])
    s2, m2 = train_step(make_state(), batches(1)[0])
    assert_states_close(s1, s2)


def test_recompile_guard_warns_with_the_reason():
    step = tk.jit(train_step, backend="eager", max_recompiles=0)
    state = make_state()
    state, _ = step(state, batches(1, size=32)[0])
    with pytest.warns(RecompileWarning, match=r"compiled 2 times, more than 1 \+ max_recompiles=0(.|\n)*size"):
        step(state, batches(1, size=24)[0])  # another batch size: a recompile
    assert step.compiles == 2 and len(step.recompile_reasons) == 1


def test_recompile_guard_can_raise():
    step = tk.jit(train_step, backend="eager", max_recompiles=0, on_recompile="raise")
    step(make_state(), batches(1, size=32)[0])
    with pytest.raises(RecompileError, match="max_recompiles=0"):
        step(make_state(), batches(1, size=8)[0])


def test_within_the_limit_no_warning_and_none_disables_the_guard():
    for limit in (1, None):
        step = tk.jit(train_step, backend="eager", max_recompiles=limit)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RecompileWarning)
            for size in (32, 24, 16, 8):  # after one recompile the batch dimension is dynamic
                step(make_state(), batches(1, size=size)[0])
        assert step.compiles == 2


def test_python_branch_on_the_count_compiles_twice_then_never():
    # SGD with momentum branches on opt_state["count"] == 0 (torch's first-step rule): dynamo
    # specialises that branch, so step 0 and the steps after it are two graphs.
    step = tk.jit(train_step, backend="eager")
    state = tk.TrainState.create(mlp(), tk.optim.sgd(0.1, momentum=0.9))
    eager = state
    for batch in batches(5):
        state, _ = step(state, batch)
        eager, _ = train_step(eager, batch)
    assert step.compiles == 2
    assert "count" in step.recompile_reasons[0]
    assert_trees_close(state.params, eager.params, **TOL)


def test_each_jitted_step_has_its_own_cache():
    a = tk.jit(train_step, backend="eager")
    b = tk.jit(train_step, backend="eager")
    a(make_state(), batches(1)[0])
    b(make_state(), batches(1)[0])
    assert (a.compiles, b.compiles) == (1, 1)


def test_dynamo_config_is_left_as_it_was():
    before = (torch._dynamo.config.trace_autograd_ops, torch.compiler.config.dynamic_sources)
    tk.jit(train_step, backend="eager")(make_state(), batches(1)[0])
    assert (torch._dynamo.config.trace_autograd_ops, torch.compiler.config.dynamic_sources) == before


def test_outer_hooks_reach_the_compiled_step():
    class Double(tk.StepHook):
        def grads(self, grads, params):
            return [2 * g for g in grads]

    step = tk.jit(train_step, backend="eager")
    with tk.hooks(Double(), params=make_state().params):
        s_jit, _ = step(make_state(), batches(1)[0])
        s_eager, _ = train_step(make_state(), batches(1)[0])
    assert_states_close(s_jit, s_eager)
    plain, _ = train_step(make_state(), batches(1)[0])
    assert not torch.allclose(plain.params["0.weight"], s_jit.params["0.weight"])


def test_two_forms_and_compose():
    step = tk.compose(tk.jit(backend="eager"))(train_step)
    assert isinstance(step, JittedStep) and tk.applied_transforms(step) == ("jit",)
    assert step.__name__ == "train_step"
    state, metrics = step(make_state(), batches(1)[0])
    assert state.step == 1 and set(metrics) == {"loss", "acc"}


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"mode": "fastest"}, ValueError, "mode must be one of"),
        ({"max_recompiles": -1}, ValueError, "max_recompiles"),
        ({"on_recompile": "ignore"}, ValueError, "on_recompile"),
        ({"fullgraph": 1}, TypeError, "fullgraph must be True or False"),
        ({"backend": "eager", "mode": "reduce-overhead"}, ValueError, "need backend='inductor'"),
        ({"options": ["fallback_random"]}, TypeError, "options must be a dict"),
    ],
)
def test_bad_arguments_fail_at_wrap_time(kwargs, err, match):
    with pytest.raises(err, match=match):
        tk.jit(train_step, **kwargs)
    with pytest.raises(err, match=match):
        tk.jit(**kwargs)


def test_rejects_epoch_steps_and_double_jit():
    with pytest.raises(TypeError, match="got an epoch step"):
        tk.jit(tk.epoch_step(train_step))
    with pytest.raises(ValueError, match="already wrapped by jit"):
        tk.jit(tk.jit(train_step, backend="eager"))
    with pytest.raises(TypeError, match="must be a TrainState"):
        tk.jit(train_step, backend="eager")({"params": {}}, None)


# --------------------------------------------------------------------------- compositions


def mixed_precision():
    pytest.importorskip("trainkit.transforms.mixed_precision", reason="mixed_precision (issue 3) is not in the tree")
    return tk.mixed_precision


@pytest.mark.slow
def test_jit_of_bf16_mixed_precision_compiles_autocast_into_the_graph():
    mp = mixed_precision()
    bare = mp(train_step, dtype=torch.bfloat16)
    step = tk.jit(bare)  # the recommended order: jit outermost, autocast inside the graph
    s_jit = s_eager = make_state()
    for batch in batches(4, seed=7):
        s_jit, m_jit = step(s_jit, batch)
        s_eager, m_eager = bare(s_eager, batch)
    assert step.compiles == 1
    assert all(p.dtype == torch.float32 for p in s_jit.params.values())
    # bf16 keeps 8 bits of mantissa, and inductor may fuse (so round) differently from eager;
    # measured here: params within 2e-8, losses within 2e-7
    assert_trees_close(s_jit.params, s_eager.params, rtol=0, atol=1e-4)
    assert_trees_close(m_jit, m_eager, rtol=0, atol=1e-3)
    assert tk.applied_transforms(step) == ("mixed_precision", "jit")


def test_bf16_mixed_precision_outside_jit_traces_under_autocast():
    mp = mixed_precision()
    step = mp(tk.jit(train_step, backend="aot_eager"), dtype=torch.bfloat16)
    bare = mp(train_step, dtype=torch.bfloat16)
    s1, m1 = step(make_state(), batches(1)[0])
    s2, m2 = bare(make_state(), batches(1)[0])
    assert_trees_close(s1.params, s2.params, rtol=0, atol=1e-6)  # aot_eager runs eager's kernels


@pytest.mark.parametrize("order", ["jit outside", "jit inside"])
def test_fp16_loss_scaling_cannot_be_one_graph_and_says_what_to_do(order):
    mp = mixed_precision()
    if order == "jit outside":
        step = tk.jit(mp(train_step, dtype=torch.float16), backend="eager")
    else:
        step = mp(tk.jit(train_step, backend="eager"), dtype=torch.float16)
    with pytest.raises(JitError, match=r"(?s)veto of the update.*dtype=torch.bfloat16.*fullgraph=False"):
        step(make_state(), batches(1)[0])


def test_fp16_loss_scaling_with_fullgraph_false_equals_the_eager_step():
    mp = mixed_precision()
    bare = mp(train_step, dtype=torch.float16)
    step = tk.jit(bare, backend="aot_eager", fullgraph=False)
    s1 = s2 = make_state()
    for batch in batches(3, seed=8):
        s1, m1 = step(s1, batch)
        s2, m2 = bare(s2, batch)
    assert_trees_close(s1.params, s2.params, **TOL)
    assert s1.slots["mixed_precision"] == s2.slots["mixed_precision"]


# --------------------------------------------------------------------------- seeding only where the graph draws


def test_the_rng_is_seeded_only_for_graphs_that_draw_random_numbers():
    plain = tk.jit(train_step, backend="eager")
    plain(make_state(), batches(1)[0])
    assert plain._draws_random is False  # no dropout: calls skip seeding the generator

    def noisy(state, batch):
        x, y = batch
        return train_step(state, (x + 0.01 * torch.randn_like(x), y))

    for step, state in ((train_step, make_state(dropout=0.5)), (noisy, make_state())):
        j = tk.jit(step, backend="eager")
        _, m1 = j(state, batches(1)[0])
        _, m2 = j(state, batches(1)[0])  # the second call runs the cached graph, seeded before the call
        assert j._draws_random is True and torch.equal(m1["loss"], m2["loss"])


def test_epoch_level_transforms_wrap_the_fold_of_a_jitted_step():
    jitted_step = tk.jit(train_step, backend="aot_eager")

    def eval_step(state, batch):
        x, y = batch
        return {"loss": F.cross_entropy(state.apply(None, x)[0], y)}

    step = tk.early_stop(tk.epoch_step(jitted_step, eval_step), monitor="val_loss", patience=1, min_delta=10.0)
    state, history = tk.fit(step, make_state(), batches(3), val_loader=batches(1, seed=9), epochs=20, progress=False)
    assert len(history) == 2 and tk.should_stop(state)  # no improvement of 10 after the first epoch: stop at the second
    assert jitted_step.compiles == 1


@pytest.mark.slow
def test_find_lr_sweeps_a_jitted_step_without_recompiling(jitted):
    # the LR changes every step of the sweep: it is a graph input, not a constant
    compiles = jitted.compiles
    result = tk.find_lr(jitted, make_state(), batches(16, seed=10), min_lr=1e-5, max_lr=1.0, num_steps=12)
    assert len(result.lrs) == 12 and result.lrs[0] == pytest.approx(1e-5) and result.lrs[-1] == pytest.approx(1.0)
    assert jitted.compiles == compiles, jitted.recompile_reasons


@pytest.mark.parametrize("name", ["lr_range_test", "early_stop", "data_parallel"])
def test_transforms_that_cannot_be_inside_one_graph_are_rejected_at_wrap_time(name):
    inner = {
        "lr_range_test": lambda: tk.lr_range_test(train_step, num_steps=5),
        "early_stop": lambda: tk.early_stop(train_step, monitor="loss"),
        "data_parallel": lambda: tk.data_parallel(train_step, devices=["cpu", "cpu"]),
    }[name]()
    with pytest.raises(ValueError, match=rf"wrapped by {name}; it cannot run inside one compiled graph"):
        tk.jit(inner)


def test_data_parallel_around_jit_is_a_clear_error_not_a_deadlock():
    # Either side may say it first (data_parallel checks at wrap time, jit at call time); what
    # must not happen is two replica threads waiting for each other inside a compile.
    with pytest.raises((ValueError, JitError), match=r"(?i)data_parallel.*without (tk\.)?jit"):
        step = tk.data_parallel(tk.jit(train_step, backend="eager"), devices=["cpu", "cpu"])
        step(make_state(), batches(1)[0])


def test_a_jitted_step_hidden_from_data_parallel_still_fails_clearly():
    jitted_step = tk.jit(train_step, backend="eager")
    step = tk.data_parallel(lambda state, batch: jitted_step(state, batch), devices=["cpu", "cpu"])  # no marks to see
    with pytest.raises(Exception, match="runs under data_parallel, which cannot be inside one compiled graph"):
        step(make_state(), batches(1)[0])
    assert jitted_step.compiles == 0  # refused before any trace
