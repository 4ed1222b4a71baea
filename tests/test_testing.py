"""check_step catches each defect it promises to catch, with a message that says what to fix."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainkit as tk


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 1)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _good(state, batch):
    x, y = batch
    loss, g = tk.value_and_grad(lambda p: F.mse_loss(state.apply(p, x, train=True)[0], y))(state.params)
    return state.apply_gradients(g), {"loss": loss}


def _state(model=None):
    torch.manual_seed(0)
    return tk.TrainState.create(model or nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)), tk.optim.adam(1e-2))


BATCH = (torch.randn(8, 3), torch.randn(8, 1))


def test_good_step_passes():
    s, m = tk.testing.check_step(_good, _state(), BATCH)
    assert s.step == 1


def test_in_place_mutation_is_caught():
    def impure(state, batch):
        new, m = _good(state, batch)
        with torch.no_grad():
            state.params["0.weight"].mul_(1.0)  # same values, but written: the version counter moves
        return new, m

    with pytest.raises(AssertionError, match=r"modified in place at .*0.weight.*version"):
        tk.testing.check_step(impure, _state(), BATCH)


def test_donated_step_called_without_donation_is_pure():
    s = _state()
    tk.testing.check_step(_good, s, BATCH)  # apply_gradients is pure outside tk.donating()


def test_global_randomness_is_caught():
    def noisy(state, batch):
        new, m = _good(state, batch)
        return new, {**m, "noise": torch.rand(())}

    with pytest.raises(AssertionError, match="two calls .* gave different results"):
        tk.testing.check_step(noisy, _state(), BATCH)


def test_param_without_gradient_is_caught():
    with pytest.raises(AssertionError, match=r"all-zero gradient: \['unused.weight', 'unused.bias'\]"):
        tk.testing.check_step(_good, _state(TwoLayer()), BATCH)
    tk.testing.check_step(_good, _state(TwoLayer()), BATCH, check_grads=False)


def test_host_metric_and_nonfinite_metric_are_caught():
    def host(state, batch):
        new, m = _good(state, batch)
        return new, {"loss": m["loss"].item()}

    with pytest.raises(AssertionError, match="is a float, not a tensor"):
        tk.testing.check_step(host, _state(), BATCH)

    def nan(state, batch):
        new, m = _good(state, batch)
        return new, {"loss": m["loss"] * float("nan")}

    with pytest.raises(AssertionError, match="not finite"):
        tk.testing.check_step(nan, _state(), BATCH)


def test_step_that_bypasses_value_and_grad_is_caught():
    def manual(state, batch):
        return state.replace(step=state.step + 1), {"loss": torch.zeros(())}

    with pytest.raises(AssertionError, match="computed no gradients through trainkit.value_and_grad"):
        tk.testing.check_step(manual, _state(), BATCH)


def test_wrong_return_type_is_caught():
    with pytest.raises(TypeError, match=r"must return \(state, metrics\)"):
        tk.testing.check_step(lambda s, b: _good(s, b)[1], _state(), BATCH)


def test_assert_trees_close_reports_the_path():
    with pytest.raises(AssertionError, match=r"trees differ at \['b'\]\[1\]"):
        tk.testing.assert_trees_close({"a": torch.ones(1), "b": [1, 2]}, {"a": torch.ones(1), "b": [1, 3]})
    with pytest.raises(AssertionError, match="structure"):
        tk.testing.assert_trees_close({"a": 1}, {"b": 1})
