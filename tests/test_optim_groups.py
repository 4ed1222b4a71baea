"""Param groups: masked and partition see names and tensors; the no-decay recipe equals torch.optim.AdamW with two groups."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trainkit as tk
from trainkit import optim


def model_params(seed, width):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.LayerNorm(width), torch.nn.Linear(width, 2))
    return {n: p.detach().double().clone() for n, p in m.named_parameters()}


def grads_for(params, steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()} for _ in range(steps)]


def run(tx, params, grads, donate):
    p = {n: t.clone() for n, t in params.items()}
    s = optim.init(tx, p)
    for gs in grads:
        p, s = optim.apply_gradients(tx, gs, s, p, donate=donate)
    return p, s


def torch_groups(params, grads, make_groups, cls, **kw):
    ref = {n: p.clone().requires_grad_() for n, p in params.items()}
    opt = cls(make_groups(ref), **kw)
    for gs in grads:
        for n, r in ref.items():
            r.grad = gs[n].clone()
        opt.step()
    return {n: r.detach() for n, r in ref.items()}


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 5), st.floats(1e-4, 0.1), st.floats(1e-3, 0.5), st.integers(1, 6), st.integers(0, 999))
def test_no_decay_on_biases_and_norms_equals_torch_adamw_with_two_groups(width, lr, wd, steps, seed):
    params = model_params(seed, width)
    grads = grads_for(params, steps, seed)

    def two_groups(ref):  # what a Lightning user writes in configure_optimizers
        decay = [p for n, p in ref.items() if p.ndim >= 2]
        no_decay = [p for n, p in ref.items() if p.ndim < 2]
        return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]

    expected = torch_groups(params, grads, two_groups, torch.optim.AdamW, lr=lr, foreach=False)
    tx = optim.adamw(lr, weight_decay=wd, mask=optim.decay_mask)  # the one-line recipe
    pure, s_pure = run(tx, params, grads, donate=False)
    donated, s_donated = run(tx, params, grads, donate=True)
    tk.testing.assert_trees_close(pure, expected, rtol=1e-6, atol=1e-9)
    tk.testing.assert_trees_equal((donated, s_donated), (pure, s_pure))
    # The same recipe with the general tools: a masked decay stage, or two groups by label.
    masked_decay = optim.masked(optim.add_decayed_weights(wd), optim.decay_mask)
    by_mask = optim.chain(optim.scale_by_adam(), masked_decay, optim.scale_by_learning_rate(lr))
    by_label = optim.partition(
        {"decay": optim.adamw(lr, weight_decay=wd), "no_decay": optim.adamw(lr, weight_decay=0.0)},
        lambda name, p: "decay" if p.ndim >= 2 else "no_decay",
    )
    for tx in (by_mask, by_label):
        for donate in (False, True):
            tk.testing.assert_trees_close(run(tx, params, grads, donate)[0], expected, rtol=1e-6, atol=1e-9)


@settings(max_examples=10, deadline=None)
@given(st.floats(1e-3, 0.5), st.floats(1e-3, 0.5), st.sampled_from([0.0, 0.9]), st.integers(1, 5), st.integers(0, 999))
def test_partition_with_different_lrs_and_optimizers_equals_torch_groups(lr_a, lr_b, momentum, steps, seed):
    params = model_params(seed, 3)
    grads = grads_for(params, steps, seed)
    label = lambda name, p: "body" if name.startswith("0.") else "head"  # noqa: E731
    tx = optim.partition({"body": optim.sgd(lr_a, momentum), "head": optim.sgd(lr_b, momentum)}, label)

    def groups(ref):
        return [{"params": [p for n, p in ref.items() if label(n, p) == g], "lr": lr} for g, lr in (("body", lr_a), ("head", lr_b))]

    expected = torch_groups(params, grads, groups, torch.optim.SGD, lr=0.1, momentum=momentum)
    pure, s = run(tx, params, grads, donate=False)
    tk.testing.assert_trees_close(pure, expected, rtol=1e-6, atol=1e-9)
    tk.testing.assert_trees_equal(run(tx, params, grads, donate=True)[0], pure)
    assert optim.get_lr(s) == lr_a and optim.get_lrs(s) == [lr_a, lr_b]  # state.lr: the first group's


def test_a_stage_object_shared_by_two_groups_still_updates_each_group_right():
    params = model_params(0, 3)
    grads = grads_for(params, 3, 0)
    shared = optim.adam(0.01)
    label = lambda name, p: "w" if p.ndim >= 2 else "b"  # noqa: E731
    together = run(shared, params, grads, donate=True)[0]
    for donate in (False, True):
        grouped = run(optim.partition({"w": shared, "b": shared}, label), params, grads, donate)[0]
        tk.testing.assert_trees_close(grouped, together, rtol=1e-12, atol=1e-14)


def test_masks_and_labels_that_miss_params_or_name_unknown_labels_say_the_fix():
    p = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"partition: params labelled with no transform: \{'b': 'bias'\}; the labels are \['w'\]"):
        optim.init(optim.partition({"w": optim.sgd(0.1)}, lambda n, t: "w" if t.ndim > 1 else "bias"), p)
    with pytest.raises(ValueError, match=r"labels must name every param.*missing \['b'\], unknown \['x'\]. The params are \['w', 'b'\]"):
        optim.init(optim.partition({"w": optim.sgd(0.1)}, {"w": "w", "x": "w"}), p)
    with pytest.raises(ValueError, match=r"masked: the mask must give True/False for every param; missing \['b'\], unknown \['x'\]"):
        optim.init(optim.masked(optim.sgd(0.1), {"w": True, "x": False}), p)
    with pytest.raises(ValueError, match=r"must return True or False for each param, got \{'w': 2, 'b': 1\}.*p.ndim >= 2"):
        optim.init(optim.adamw(0.1, mask=lambda n, t: t.ndim), p)
    with pytest.raises(TypeError, match=r"masked: mask must be a function \(name, tensor\) -> bool or a dict"):
        optim.masked(optim.sgd(0.1), None)
    with pytest.raises(TypeError, match="adamw|add_decayed_weights: mask must be"):
        optim.adamw(0.1, mask="bias")
    with pytest.raises(TypeError, match="labels must be strings"):
        optim.partition({1: optim.sgd(0.1)}, lambda n, t: 1)
    with pytest.raises(ValueError, match="params labelled with no transform"):  # at TrainState.create, not at step 10,000
        tk.TrainState.create(torch.nn.Linear(2, 1), optim.partition({"w": optim.sgd(0.1)}, lambda n, t: n))


def test_masked_params_pass_through_and_the_state_names_them():
    p = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    tx = optim.chain(optim.masked(optim.add_decayed_weights(0.5), optim.decay_mask), optim.sgd(1.0))
    s = optim.init(tx, p)
    assert optim.find_state(s, "names") == ["w"]
    new, _ = optim.apply_gradients(tx, {"w": torch.zeros(2, 2), "b": torch.zeros(2)}, s, p, donate=False)
    assert new["w"].eq(0.5).all() and new["b"].eq(1.0).all()
