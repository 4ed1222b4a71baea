"""value_and_grad: correct gradients, clear errors, hooks in composition order."""

import pytest
import torch

import trainkit as tk


def test_matches_autograd_and_writes_no_grad_attribute():
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(3)
    loss, g = tk.value_and_grad(lambda p: (p["w"] * x).sum() ** 2)({"w": w})
    expected = 2 * (w * x).sum() * x
    torch.testing.assert_close(g["w"], expected.detach())
    assert w.grad is None and not loss.requires_grad


def test_has_aux_and_params_without_requires_grad():
    (loss, aux), g = tk.value_and_grad(lambda p: ((p["w"] ** 2).sum(), "aux"), has_aux=True)({"w": torch.ones(2)})
    assert aux == "aux" and g["w"].tolist() == [2.0, 2.0]


@pytest.mark.parametrize(
    "fn, exc, match",
    [
        (lambda p: p["w"] * 2, ValueError, r"loss must be a scalar, got shape \(3,\).*loss.mean\(\)"),
        (lambda p: 1.0, TypeError, "must return a scalar Tensor"),
        (lambda p: torch.tensor(1.0), ValueError, "does not depend on the params"),
        (lambda p: (p["w"] > 0).sum(), TypeError, "floating-point"),
    ],
)
def test_bad_losses_get_clear_errors(fn, exc, match):
    with pytest.raises(exc, match=match):
        tk.value_and_grad(fn)({"w": torch.ones(3)})


def test_has_aux_requires_a_pair():
    with pytest.raises(TypeError, match=r"must return \(loss, aux\)"):
        tk.value_and_grad(lambda p: p["w"].sum(), has_aux=True)({"w": torch.ones(3)})


def test_hooks_see_loss_inner_first_and_grads_outer_first():
    seen = []

    class H(tk.StepHook):
        def __init__(self, name, factor):
            self.name, self.factor = name, factor

        def loss(self, loss, params):
            seen.append(("loss", self.name))
            return loss * self.factor

        def grads(self, grads, params):
            seen.append(("grads", self.name))
            return [g / self.factor for g in grads]

    params = {"w": torch.ones(2)}
    with tk.hooks(H("outer", 2.0), params=params):
        with tk.hooks(H("inner", 8.0), params=params):
            loss, g = tk.value_and_grad(lambda p: (p["w"] ** 2).sum())(params)
    assert seen == [("loss", "inner"), ("loss", "outer"), ("grads", "outer"), ("grads", "inner")]
    assert loss.item() == 2.0 and g["w"].tolist() == [2.0, 2.0]
    with pytest.raises(TypeError, match="StepHook"):
        with tk.hooks(object(), params=params):
            pass
    with pytest.raises(TypeError, match="params=state.params"):
        with tk.hooks(H("x", 1.0), params=[torch.ones(1)]):
            pass


def test_skip_update_veto_keeps_params_and_optimizer_state():
    class Veto(tk.StepHook):
        def skip_update(self, grads):
            return True

    s = tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.adam(0.1))
    g = {k: torch.ones_like(v) for k, v in s.params.items()}
    with tk.hooks(Veto(), params=s.params):
        s2 = s.apply_gradients(g)
    assert s2.step == 1 and s2.params is s.params and s2.opt_state is s.opt_state
    other = tk.TrainState.create(torch.nn.Linear(3, 2, bias=False), tk.optim.adam(0.1))
    with tk.hooks(Veto(), params=s.params):  # another state's params: not in the hooks' scope
        o2 = other.apply_gradients({"weight": torch.ones(2, 3)})
    assert o2.params is not other.params


def test_a_discarded_update_does_no_optimizer_work():
    class Replica(tk.StepHook):
        def applies_update(self):
            return False

    s = tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.adam(0.1))
    with tk.hooks(Replica(), params=s.params):
        s2 = s.apply_gradients({k: torch.ones_like(v) for k, v in s.params.items()})
    assert s2.step == 1 and s2.params is s.params and s2.opt_state is s.opt_state


def test_hooks_see_only_the_gradient_of_the_scoped_params():
    calls = []

    class Count(tk.StepHook):
        def loss(self, loss, params):
            calls.append("loss")
            return loss

        def grads(self, grads, params):
            calls.append("grads")
            return [10 * g for g in grads]

    s = tk.TrainState.create(torch.nn.Linear(3, 1), tk.optim.sgd(0.1))
    x = torch.randn(4, 3)
    with tk.hooks(Count(), params=s.params):
        # an input-gradient metric: plain math, no hook
        gx = tk.grad(lambda i: s.apply(None, i["x"])[0].sum())({"x": x})
        assert calls == [] and torch.allclose(gx["x"], s.params["weight"].expand(4, 3))
        # a subset of the params is not the state's params either
        tk.grad(lambda p: s.apply({**s.params, **p}, x)[0].sum())({"bias": s.params["bias"]})
        assert calls == []
        g = tk.grad(lambda p: s.apply(p, x)[0].sum())(dict(s.params))  # the params, another dict: hooked
    assert calls == ["loss", "grads"] and torch.allclose(g["bias"], torch.tensor([40.0]))
