"""reduce_on_plateau equals torch's ReduceLROnPlateau fed the same metrics; the reduced LR lasts and survives resume."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trainkit as tk
from trainkit import optim
from trainkit.transforms.reduce_on_plateau import reduce_on_plateau


def replay(values):
    """An 'epoch' that reports values[i] as val_loss on its i-th call, and trains one update."""

    def epoch(state, data):
        grads = {n: torch.ones_like(p) for n, p in state.params.items()}
        return state.apply_gradients(grads), {"val_loss": torch.tensor(values[state.step])}

    return epoch


def groups_state(lr_a, lr_b):
    tx = optim.partition({"w": optim.sgd(lr_a), "b": optim.sgd(lr_b)}, lambda n, p: "w" if p.ndim > 1 else "b")
    return tk.TrainState.create(torch.nn.Linear(2, 1), tx)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.sampled_from([1.0, 0.99995, 0.9, 0.8, 1.2, float("nan")]), min_size=1, max_size=25),
    st.floats(0.05, 0.9),
    st.integers(0, 3),
    st.integers(0, 2),
    st.sampled_from([0.0, 1e-3, 0.02]),
    st.sampled_from(["min", "max"]),
    st.sampled_from([0.0, 1e-4, 0.05]),
    st.sampled_from(["rel", "abs"]),
)
def test_equals_torch_reduce_lr_on_plateau(values, factor, patience, cooldown, min_lr, mode, threshold, threshold_mode):
    kw = dict(factor=factor, patience=patience, cooldown=cooldown, min_lr=min_lr, mode=mode, threshold=threshold)
    kw["threshold_mode"] = threshold_mode
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in (0.1, 0.05)])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)
    stepper = reduce_on_plateau(replay(values), **kw)
    state = groups_state(0.1, 0.05)
    for v in values:
        sched.step(v)
        state, _ = stepper(state, None)
        assert optim.get_lrs(state.opt_state) == [g["lr"] for g in opt.param_groups]
        slot = state.slots["reduce_on_plateau"]
        assert (slot["num_bad_epochs"], slot["cooldown_counter"]) == (sched.num_bad_epochs, sched.cooldown_counter)


def test_the_reduced_lr_is_used_lasts_and_survives_resume(tmp_path):
    values = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    make = lambda: tk.TrainState.create(torch.nn.Linear(2, 1), optim.adam(0.05))  # noqa: E731
    stepper = reduce_on_plateau(replay(values), patience=1)
    state = make()
    for _ in range(3):
        state, _ = stepper(state, None)
    assert state.lr == pytest.approx(0.005)
    tk.save(state, tmp_path / "c.pt")
    resumed = tk.load(tmp_path / "c.pt", like=make())
    assert resumed.lr == pytest.approx(0.005) and resumed.slots["reduce_on_plateau"] == state.slots["reduce_on_plateau"]
    uninterrupted = state
    for _ in range(3):
        uninterrupted, _ = stepper(uninterrupted, None)
        resumed, _ = stepper(resumed, None)
    assert resumed.lr == uninterrupted.lr == pytest.approx(0.0005)
    tk.testing.assert_trees_equal(resumed.params, uninterrupted.params)


def test_on_a_schedule_a_reduction_multiplies_the_schedule():
    sched = optim.cosine_decay_schedule(1.0, 100)
    state = tk.TrainState.create(torch.nn.Linear(2, 1), optim.sgd(sched))
    stepper = reduce_on_plateau(replay([1.0] * 4), patience=0, factor=0.5)
    state, _ = stepper(state, None)  # the first evaluation improves on inf
    state, _ = stepper(state, None)
    assert state.lr == pytest.approx(0.5 * sched(2))
    state, _ = stepper(state, None)
    assert state.lr == pytest.approx(0.25 * sched(3))


def test_a_missing_monitor_lists_the_keys_and_bad_arguments_say_the_fix():
    state = tk.TrainState.create(torch.nn.Linear(2, 1), optim.sgd(0.1))
    with pytest.raises(KeyError, match=r"monitor='val_loss' is not among the metrics the step returned: \['loss'\]. There are no val_"):
        reduce_on_plateau(lambda s, b: (s, {"loss": torch.tensor(1.0)}))(state, None)
    for kw, match in [
        (dict(factor=1.0), r"factor must be a number in \(0.0, 1.0\)"),
        (dict(patience=-1), "patience must be an int >= 0"),
        (dict(patience=True), "patience must be an int >= 0"),
        (dict(min_lr=None), "min_lr must be a number"),
        (dict(mode="lower"), 'mode must be "min"'),
        (dict(threshold_mode="pct"), 'threshold_mode must be "rel" or "abs"'),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            reduce_on_plateau(**kw)
    with pytest.raises(ValueError, match="already wrapped by reduce_on_plateau"):
        reduce_on_plateau(reduce_on_plateau(replay([1.0])))
    no_lr = tk.TrainState.create(torch.nn.Linear(2, 1), optim.clip_by_global_norm(1.0))
    with pytest.raises(ValueError, match="no scale_by_learning_rate stage"):
        stepper = reduce_on_plateau(lambda s, b: (s, {"val_loss": torch.tensor(1.0)}), patience=0)
        for _ in range(2):
            no_lr, _ = stepper(no_lr, None)


def test_composes_with_early_stop_and_fit():
    values = [1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    state = tk.TrainState.create(torch.nn.Linear(2, 1), optim.sgd(0.1))
    stepper = tk.compose(tk.early_stop(monitor="val_loss", patience=4), reduce_on_plateau(patience=1))(replay(values))
    while not tk.should_stop(state):
        state, _ = stepper(state, None)
    assert state.step == 6 and state.lr == pytest.approx(0.001)
