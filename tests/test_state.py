"""TrainState: a pytree, pure by default, deterministic randomness, BatchNorm buffers as state."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

import trainkit as tk
from trainkit.demo import CNN, eval_step, train_step


def _state(model=None, tx=None, **kw):
    torch.manual_seed(0)
    return tk.TrainState.create(model or CNN(), tx or tk.optim.adam(1e-3), **kw)


def _batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_is_a_pytree_and_tree_map_keeps_static_parts():
    s = _state()
    leaves, spec = pytree.tree_flatten(s)
    assert sum(isinstance(x, torch.Tensor) for x in leaves) == len(s.params) + len(s.buffers) + 2 * len(s.params)
    doubled = pytree.tree_map(lambda x: x * 2 if isinstance(x, torch.Tensor) and x.is_floating_point() else x, s)
    assert isinstance(doubled, tk.TrainState) and doubled.module is s.module and doubled.tx is s.tx
    torch.testing.assert_close(doubled.params["head.2.weight"], 2 * s.params["head.2.weight"])


def test_frozen_and_replace():
    s = _state()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.step = 3
    assert s.replace(step=3).step == 3 and s.step == 0
    with pytest.raises(TypeError, match="unknown field"):
        s.replace(stepp=1)


def test_create_copies_and_never_changes_the_module():
    model = CNN()
    w = model.head[2].weight
    before = w.detach().clone()
    state = tk.TrainState.create(model, tk.optim.sgd(0.5))
    assert state.params["head.2.weight"] is not w
    state, _ = tk.fit(train_step, state, [_batch()] * 3, epochs=1, progress=False)
    assert torch.equal(w.detach(), before)
    assert model.head[2].weight is w and isinstance(model.head[2].weight, nn.Parameter)  # not rebound either
    again = tk.TrainState.create(model, tk.optim.sgd(0.5))
    assert torch.equal(again.params["head.2.weight"].detach(), before)


def test_train_apply_is_deterministic_per_step_and_differs_across_steps():
    s = _state()
    x, _ = _batch()
    a, _ = s.apply(None, x, train=True)
    b, _ = s.apply(None, x, train=True)
    assert torch.equal(a, b)
    c, _ = s.replace(step=1).apply(None, x, train=True)
    assert not torch.equal(a, c), "dropout should draw new masks at the next step"
    d, _ = s.replace(rng=1).apply(None, x, train=True)
    assert not torch.equal(a, d)


def test_apply_leaves_global_rng_alone():
    s = _state()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    s.apply(None, _batch()[0], train=True)
    assert torch.equal(torch.rand(3), expected)


def test_batchnorm_buffers_are_returned_not_mutated():
    s = _state()
    before = {k: v.clone() for k, v in s.buffers.items()}
    _, new = s.apply(None, _batch()[0], train=True)
    for k in before:
        assert torch.equal(s.buffers[k], before[k])
    assert not torch.equal(new["features.1.running_mean"], before["features.1.running_mean"])
    assert new["features.1.num_batches_tracked"].item() == 1
    _, same = s.apply(None, _batch()[0])  # eval mode: running stats used, not updated
    assert all(torch.equal(same[k], before[k]) for k in before)


def test_demo_train_step_passes_check_step():
    s = _state()
    new, metrics = tk.testing.check_step(train_step, s, _batch())
    assert new.step == 1 and set(metrics) == {"loss", "acc"}
    assert not torch.equal(new.buffers["features.1.running_mean"], s.buffers["features.1.running_mean"])


def test_donated_step_updates_in_place_and_equals_pure():
    s = _state()
    pure, _ = train_step(s, _batch())
    d = s.clone()
    ptr = d.params["head.2.weight"].data_ptr()
    with tk.donating():
        donated, _ = train_step(d, _batch())
    assert donated.params["head.2.weight"].data_ptr() == ptr
    tk.testing.assert_trees_equal(donated, pure)


def test_to_and_clone():
    s = _state()
    c = s.to("cpu")
    assert c.params["head.2.weight"].data_ptr() != s.params["head.2.weight"].data_ptr()  # a copy, safe to donate
    assert c.params["head.2.weight"].requires_grad and c.device.type == "cpu"
    tk.testing.assert_trees_equal(s.clone(), s)
    assert "TrainState(step=0" in repr(s)


def test_float64_state_and_eval_step():
    s = _state(dtype=torch.float64)
    x, y = _batch()
    m = eval_step(s, (x.double(), y))
    assert m["loss"].dtype == torch.float64


def test_create_rejects_torch_optimizers_and_non_modules():
    with pytest.raises(TypeError, match="trainkit.optim.GradientTransformation"):
        tk.TrainState.create(nn.Linear(1, 1), torch.optim.SGD)
    with pytest.raises(TypeError, match="must be an nn.Module"):
        tk.TrainState.create(F.relu, tk.optim.sgd(0.1))


def test_gradient_tree_mismatch_names_the_fix():
    s = _state(nn.Linear(2, 1), tk.optim.sgd(0.1))
    with pytest.raises(ValueError, match=r"missing \['bias'\]"):
        s.apply_gradients({"weight": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match=r"wrong shapes weight: grad \(2, 1\) vs param \(1, 2\)"):
        s.apply_gradients({"weight": torch.zeros(2, 1), "bias": torch.zeros(1)})
    with pytest.raises(TypeError, match="grads must be a dict like state.params"):
        s.apply_gradients([torch.zeros(1, 2), torch.zeros(1)])
