"""tk.jit(step, steps_per_call=K): K steps in one compiled call, equal to K single steps.

The wrapper's logic is tested on the aot_eager backend (dynamo traces as for inductor, and
unrolls the K steps into one graph, but compiles in a blink); one slow test compiles with inductor.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_jit import TOL, assert_states_close, batches, make_state, train_step

import trainkit as tk
from trainkit.testing import assert_trees_close
from trainkit.transforms.jit import JitError, RecompileWarning


def singles(state, data):
    """The reference: one eager step per batch, metrics stacked."""
    per_step = []
    for b in data:
        state, m = train_step(state, b)
        per_step.append(m)
    return state, {k: torch.stack([m[k] for m in per_step]) for k in per_step[0]}


def groups(data, k):
    return [data[i : i + k] for i in range(0, len(data), k)]


def run(step, state, data, k):
    out = []
    for g in groups(data, k):
        state, m = step(state, g)
        out.append(m)
    return state, {key: torch.cat([m[key] for m in out]) for key in out[0]}


def test_k_steps_per_call_equal_k_single_steps_with_a_schedule():
    step = tk.jit(train_step, backend="aot_eager", steps_per_call=4)
    assert step.steps_per_call == 4
    data = batches(12)
    s_k, m_k = run(step, make_state(), data, 4)
    s_1, m_1 = singles(make_state(), data)
    assert_states_close(s_k, s_1)  # step 12, the cosine schedule's LR after 12 updates, params, moments
    assert_trees_close(m_k, m_1, **TOL)
    assert m_k["loss"].shape == (12,)
    assert step._multi.compiles == 1 and step._single.compiles == 1  # the first group ran as single calls
    assert step.compiles == 2, step.recompile_reasons


def test_a_shorter_last_group_does_not_recompile_each_epoch():
    step = tk.jit(train_step, backend="aot_eager", steps_per_call=4)
    data = batches(10)  # groups of 4, 4, 2
    state = make_state()
    state, _ = run(step, state, data, 4)
    compiles = step.compiles
    for _ in range(2):
        state, m = run(step, state, data, 4)
        assert m["loss"].shape == (10,)
    assert step.compiles == compiles == 2, step.recompile_reasons
    s_1, _ = singles(make_state(), data * 3)
    assert_states_close(state, s_1)


def test_batches_of_differing_shapes_in_a_group_run_as_single_steps_under_the_guard():
    step = tk.jit(train_step, backend="aot_eager", steps_per_call=3, max_recompiles=0)
    state, _ = step(make_state(), batches(3))
    state, _ = step(state, batches(3))  # the 3-step graph
    mixed = batches(2) + batches(1, size=8)  # a smaller last batch in a full group
    with pytest.warns(RecompileWarning, match="size"):  # the one-step graph recompiles, reported as ever
        state, m = step(state, mixed)
    assert m["loss"].shape == (3,) and state.step == 9
    assert step._multi.compiles == 1  # never a recompile of the K-step graph for it


def test_the_k_step_graph_has_its_own_recompile_guard():
    step = tk.jit(train_step, backend="aot_eager", steps_per_call=2, max_recompiles=0)
    state, _ = step(make_state(), batches(2))
    state, _ = step(state, batches(2))  # the 2-step graph, batches of 32
    with pytest.warns(RecompileWarning, match=r"its 2-step graph\) compiled 2 times(.|\n)*size"):
        state, _ = step(state, batches(2, size=24))  # whole groups of another size: that graph recompiles
    assert step._multi.compiles == 2 and state.step == 6


def test_outer_hooks_reach_every_sub_step():
    class Double(tk.StepHook):
        def grads(self, grads, params):
            return [2 * g for g in grads]

    step = tk.jit(train_step, backend="aot_eager", steps_per_call=2)
    with tk.hooks(Double(), params=make_state().params):
        s_k, _ = run(step, make_state(), batches(4), 2)
        s_1, _ = singles(make_state(), batches(4))
    assert step._multi.compiles == 1
    assert_states_close(s_k, s_1)


def test_dropout_draws_per_sub_step_as_the_single_step_does():
    from test_jit import make_state as make

    k1 = tk.jit(train_step, backend="aot_eager")
    k4 = tk.jit(train_step, backend="aot_eager", steps_per_call=4)
    data = batches(8)
    s1 = make(dropout=0.5)
    per_step = []
    for b in data:
        s1, m = k1(s1, b)
        per_step.append(m["loss"])
    s4, m4 = run(k4, make(dropout=0.5), data, 4)
    assert torch.equal(m4["loss"], torch.stack(per_step))  # the same masks: seeded from (rng, step + i)
    assert_states_close(s4, s1)
    assert k4._draws_random and k4._multi.compiles == 0  # a step that draws runs as single calls


def test_donated_groups_update_in_place_and_pure_groups_leave_the_state():
    step = tk.jit(train_step, backend="aot_eager", steps_per_call=2)
    state = make_state()
    weight = state.params["0.weight"]
    with tk.donating():
        for g in groups(batches(6), 2):
            state, _ = step(state, g)
    assert state.params["0.weight"] is weight and step._multi.compiles == 1
    # pure when not donated (check_step wants scalar metrics: checked by hand here)
    state = make_state()
    before = state.clone()
    versions = [t._version for t in state.params.values()]
    a, ma = step(state, batches(2))
    b, mb = step(state, batches(2))
    assert [t._version for t in state.params.values()] == versions
    assert_trees_close(state.params, before.params, rtol=0, atol=0)
    assert_trees_close((a.params, ma), (b.params, mb), rtol=0, atol=0) and a.step == 2


@pytest.mark.parametrize("k", [0, -1, True, 2.0, "4"])
def test_bad_steps_per_call_fails_at_wrap_time(k):
    with pytest.raises(ValueError, match="steps_per_call must be an int >= 1"):
        tk.jit(train_step, steps_per_call=k)


def test_a_group_of_the_wrong_length_or_kind_says_what_to_pass():
    step = tk.jit(train_step, backend="aot_eager", steps_per_call=2)
    with pytest.raises(ValueError, match=r"takes a list of 1 to 2 batches, got 3 batches"):
        step(make_state(), batches(3))
    with pytest.raises(ValueError, match=r"got 0 batches"):
        step(make_state(), [])
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match=r"got Tensor"):
        step(make_state(), x)


def test_data_parallel_with_steps_per_call_is_rejected_when_wrapping():
    with pytest.raises(ValueError, match="wrapped by data_parallel; it cannot run inside one compiled graph"):
        tk.jit(tk.data_parallel(train_step, devices=["cpu", "cpu"]), steps_per_call=4)
    with pytest.raises((ValueError, JitError), match=r"(?i)data_parallel.*without (tk\.)?jit"):
        tk.data_parallel(tk.jit(train_step, backend="eager", steps_per_call=4), devices=["cpu", "cpu"])


def test_steps_per_call_one_is_todays_step():
    step = tk.jit(train_step, backend="aot_eager", steps_per_call=1)
    state, m = step(make_state(), batches(1)[0])  # one batch, not a list
    assert step._multi is None and state.step == 1 and m["loss"].shape == ()


def test_fit_groups_batches_by_steps_per_call():
    step = tk.jit(train_step, backend="aot_eager", steps_per_call=4)

    def eval_step(state, batch):
        x, y = batch
        return {"loss": F.cross_entropy(state.apply(None, x)[0], y)}

    data, val = batches(10, seed=4), batches(2, seed=5)
    s_k, h_k = tk.fit(step, make_state(), data, epochs=2, eval_step=eval_step, val_loader=val, progress=False)
    s_1, h_1 = tk.fit(train_step, make_state(), data, epochs=2, eval_step=eval_step, val_loader=val, progress=False)
    assert_states_close(s_k, s_1)
    for key in ("train_loss", "val_loss"):  # per-step metrics, averaged over the epoch as for single steps
        assert [round(h[key], 5) for h in h_k] == [round(h[key], 5) for h in h_1]
    assert [h["step"] for h in h_k] == [10, 20]
    assert step._multi.compiles == 1 and step.compiles == 2  # groups 4, 4, 2: no compile per epoch


@pytest.mark.slow
def test_inductor_k_step_graph_equals_single_steps():
    step = tk.jit(train_step, steps_per_call=2)
    data = batches(6, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecompileWarning)
        s_k, m_k = run(step, make_state(), data, 2)
    s_1, m_1 = singles(make_state(), data)
    assert_states_close(s_k, s_1)
    assert_trees_close(m_k, m_1, **TOL)
    assert step._multi.compiles == 1 and step.compiles == 2
    # on CPU the K-step graph gets inductor's C++ wrapper (faster to compile and to call), the one-step graph not
    assert step._multi.backend.last_config["cpp_wrapper"] is True
    assert "cpp_wrapper" not in step._single.backend.last_config


# --------------------------------------------------------------------------- the lean call


@pytest.mark.parametrize("lr", [1e-2, "schedule"])
def test_donated_calls_reuse_the_lr_tensors_without_recompiling(lr):
    tx = tk.optim.adam(tk.optim.cosine_decay_schedule(1e-2, 50) if lr == "schedule" else lr)
    torch.manual_seed(0)
    from test_jit import mlp

    state = tk.TrainState.create(mlp(), tx)
    eager = state.clone()
    step = tk.jit(train_step, backend="aot_eager", max_recompiles=0, on_recompile="raise")
    with tk.donating():
        for b in batches(6):
            state, _ = step(state, b)
            assert type(state.lr) is float
    for b in batches(6):
        eager, _ = train_step(eager, b)
    assert step.compiles == 1
    assert_states_close(state, eager)
    changed = state.with_lr(0.5)  # a new optimizer state: converted afresh, not the cached tensors
    with tk.donating():
        changed, _ = step(changed, batches(1)[0])
    eager, _ = train_step(eager.with_lr(0.5), batches(1)[0])
    assert_states_close(changed, eager)
    assert step.compiles == 1


@pytest.mark.parametrize("lr", [1e-2, "schedule"])
def test_fit_with_k_steps_per_call_never_recompiles_across_epochs(lr):
    # a constant LR hands back its base_lr tensor as the lr: reused as is, the two would alias
    tx = tk.optim.adam(tk.optim.cosine_decay_schedule(1e-2, 50) if lr == "schedule" else lr)
    torch.manual_seed(0)
    from test_jit import mlp

    step = tk.jit(train_step, backend="aot_eager", steps_per_call=4, max_recompiles=0, on_recompile="raise")
    state, _ = tk.fit(step, tk.TrainState.create(mlp(), tx), batches(10), epochs=3, progress=False)
    assert state.step == 30 and step.compiles == 2 and type(state.lr) is float
