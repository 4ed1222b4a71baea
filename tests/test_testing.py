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


def test_default_tolerances_follow_the_dtype():
    close = tk.testing.assert_trees_close
    close(torch.ones(3), torch.ones(3) + 5e-6)  # float32: atol 1e-5
    with pytest.raises(AssertionError, match=r"rtol=1.3e-06, atol=1e-05"):
        close(torch.ones(3), torch.ones(3) + 1e-4)
    close(torch.ones(3, dtype=torch.float16), torch.full((3,), 1.0009765625, dtype=torch.float16))  # one fp16 ulp
    with pytest.raises(AssertionError, match=r"rtol=1e-07, atol=1e-07"):
        close(torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64) + 1e-6)
    with pytest.raises(AssertionError, match=r"actual 9007199254740993, expected 9007199254740992"):
        close(torch.tensor([2**53 + 1]), torch.tensor([2**53]))  # integers exact, compared without rounding
    close(torch.ones(3), torch.ones(3) + 1e-3, rtol=1e-2, atol=0.0)
    with pytest.raises(ValueError, match="give both rtol and atol or neither, got rtol=0.1, atol=None"):
        close(torch.ones(1), torch.ones(1), rtol=0.1)


def test_nans_in_the_same_places_are_equal_and_a_nan_against_a_number_is_not():
    nan = float("nan")
    tk.testing.assert_trees_equal({"w": torch.tensor([1.0, nan, float("inf")])}, {"w": torch.tensor([1.0, nan, float("inf")])})
    with pytest.raises(AssertionError, match=r"NaN against a number at 1 places, the first at index \(1,\)"):
        tk.testing.assert_trees_close(torch.tensor([1.0, nan]), torch.tensor([1.0, 2.0]))
    with pytest.raises(AssertionError, match="max abs diff inf"):
        tk.testing.assert_trees_close(torch.tensor([float("inf")]), torch.tensor([float("-inf")]))


def test_the_message_names_the_leaf_and_its_largest_differences():
    a = {"params": {"w": torch.zeros(2, 3), "b": torch.zeros(3)}}
    b = {"params": {"w": torch.zeros(2, 3), "b": torch.tensor([0.0, 4.0, 1.0])}}
    with pytest.raises(AssertionError) as e:
        tk.testing.assert_trees_close(a, b)
    assert str(e.value) == (
        "trees differ at ['params']['b']: 2 of 3 elements differ (66.7%); max abs diff 4 at index (1,) "
        "(actual 0.0, expected 4.0), max rel diff 1 (rtol=1.3e-06, atol=1e-05)"
    )
    with pytest.raises(AssertionError, match=r"trees differ at \[0\]: shape \(2,\) != expected \(3,\)"):
        tk.testing.assert_trees_close([torch.zeros(2)], [torch.zeros(3)])
    with pytest.raises(AssertionError, match=r"dtype torch.float32 != expected torch.float64"):
        tk.testing.assert_trees_equal([torch.zeros(2)], [torch.zeros(2, dtype=torch.float64)])
    with pytest.raises(AssertionError, match=r"actual is a float, expected a Tensor"):
        tk.testing.assert_trees_close([1.0], [torch.ones(())])


_FRESH = """
import sys, time
import torch
import torch.nn.functional as F
import trainkit as tk
import trainkit.testing

def step(state, batch):
    x, y = batch
    loss, g = tk.value_and_grad(lambda p: F.mse_loss(state.apply(p, x, train=True)[0], y))(state.params)
    return state.apply_gradients(g), {"loss": loss}

state = tk.TrainState.create(torch.nn.Linear(3, 1), tk.optim.adam(1e-2))
batch = (torch.randn(8, 3), torch.randn(8, 1))
step(state, batch)  # what the step itself imports on its first call is not check_step's cost
before = set(sys.modules)
t0 = time.perf_counter()
trainkit.testing.check_step(step, state, batch)
trainkit.testing.assert_trees_close({"w": torch.ones(2)}, {"w": torch.ones(2)})
seconds = time.perf_counter() - t0
print(repr((seconds, sorted(set(sys.modules) - before), "torch.testing" in before)))
"""


def test_first_check_step_imports_nothing_heavy():
    # `import torch` already imports the torch.testing package here (torch 2.13), so the check is
    # on what check_step's first call adds to a step already run once: torch.testing.assert_close's
    # first call imported sympy and torch.distributed.tensor (3-4.5 s cold).
    import ast
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seconds, added, _ = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    heavy = [m for m in added if m.split(".")[0] in ("sympy", "mpmath") or m.startswith(("torch.distributed", "torch.testing"))]
    assert heavy == [], heavy
    assert seconds < 1.0, f"the first check_step took {seconds:.2f} s"
