"""Tools to unit-test steps: purity, determinism, gradients, tree comparisons.

A step is a plain function, so testing one needs no runner, logger or process
group: call it, and check what came back.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .functional import StepHook, hooks
from .run import _check_step_output
from .state import TrainState

__all__ = ["check_step", "assert_trees_close", "assert_trees_equal", "snapshot"]


def _leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    leaves, _ = pytree.tree_flatten_with_path(tree)
    return [(pytree.keystr(path) or "<root>", leaf) for path, leaf in leaves]


def assert_trees_close(actual: Any, expected: Any, *, rtol: float | None = None, atol: float | None = None) -> None:
    """Assert two pytrees (states, dicts, lists of tensors) have the same structure and close leaves.

    Tensors compare with ``torch.testing.assert_close`` (``rtol``/``atol`` as there, NaNs equal);
    other leaves with ``==``. The error names the first differing leaf by its path.

    >>> import torch
    >>> assert_trees_close({"w": torch.ones(2)}, {"w": torch.ones(2) + 1e-9})
    >>> assert_trees_close({"w": torch.ones(2)}, {"w": torch.zeros(2)})
    Traceback (most recent call last):
    ...
    AssertionError: trees differ at ['w']: ...
    """
    a, b = _leaves_with_paths(actual), _leaves_with_paths(expected)
    if [p for p, _ in a] != [p for p, _ in b]:
        raise AssertionError(f"trees differ in structure:\n  actual:   {[p for p, _ in a]}\n  expected: {[p for p, _ in b]}")
    for (path, x), (_, y) in zip(a, b):
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            try:
                torch.testing.assert_close(x, y, rtol=rtol, atol=atol, check_device=False, equal_nan=True)
            except AssertionError as e:
                first = str(e).strip().splitlines()[0]
                raise AssertionError(f"trees differ at {path}: {first}\n{e}") from None
        elif isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            continue
        elif x != y:
            raise AssertionError(f"trees differ at {path}: {x!r} != {y!r}")


def assert_trees_equal(actual: Any, expected: Any) -> None:
    """Assert two pytrees are equal bit for bit (same dtypes, same values, NaNs in the same places).

    >>> import torch
    >>> assert_trees_equal([torch.tensor(float("nan"))], [torch.tensor(float("nan"))])
    """
    assert_trees_close(actual, expected, rtol=0.0, atol=0.0)


def snapshot(tree: Any) -> list[tuple[str, Any, Any]]:
    """Copies of every tensor leaf with its version counter, to check later nothing changed."""
    out = []
    for path, x in _leaves_with_paths(tree):
        is_t = isinstance(x, Tensor)
        out.append((path, x.detach().clone() if is_t else x, x._version if is_t else None))
    return out


def _assert_unchanged(before: list[tuple[str, Any, Any]], tree: Any, what: str) -> None:
    after = _leaves_with_paths(tree)
    for (path, copy, version), (_, x) in zip(before, after):
        if isinstance(x, Tensor):
            if x._version != version:
                raise AssertionError(
                    f"{what}: the input state was modified in place at {path} (tensor version "
                    f"{version} -> {x._version}). A pure step must not mutate its input; "
                    "write new tensors, or only mutate under trainkit.donating()."
                )
            if not torch.equal(x.detach(), copy) and not (copy.is_floating_point() and torch.equal(x.isnan(), copy.isnan())):
                raise AssertionError(f"{what}: the input state's value changed at {path}.")


class _RecordGrads(StepHook):
    def __init__(self) -> None:
        self.calls: list[list[Tensor]] = []

    def grads(self, grads: list[Tensor], params: Any) -> list[Tensor]:
        self.calls.append([g.detach().clone() for g in grads])
        return grads


def check_step(
    step: Callable[[TrainState, Any], Any],
    state: TrainState,
    batch: Any,
    *,
    check_grads: bool = True,
    deterministic: bool = True,
) -> tuple[TrainState, Mapping[str, Any]]:
    """Assert that ``step`` behaves as a trainkit step on ``(state, batch)``; return its output.

    Checks, each with a message saying what to fix:

    1. it returns ``(TrainState, dict)`` and every metric is a finite scalar tensor
       (a float metric means the step synced with the host: keep tensors);
    2. the input ``state`` is unchanged: values and tensor version counters;
    3. called twice it returns the same state and metrics, bit for bit
       (``deterministic=False`` skips this, e.g. for non-deterministic GPU kernels);
    4. every parameter receives a nonzero gradient (``check_grads=False`` skips this,
       e.g. for an eval step or a frozen layer).

    >>> import torch, trainkit as tk
    >>> state = tk.TrainState.create(torch.nn.Linear(3, 2), tk.optim.adam(1e-3))
    >>> def step(state, batch):
    ...     x, y = batch
    ...     def loss_fn(p):
    ...         out, _ = state.apply(p, x, train=True)
    ...         return torch.nn.functional.cross_entropy(out, y)
    ...     loss, grads = tk.value_and_grad(loss_fn)(state.params)
    ...     return state.apply_gradients(grads), {"loss": loss}
    >>> new_state, metrics = tk.testing.check_step(step, state, (torch.randn(4, 3), torch.tensor([0, 1, 0, 1])))
    >>> new_state.step
    1
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"check_step: state must be a TrainState, got {type(state).__name__}.")
    before = snapshot(state)
    recorder = _RecordGrads()
    with hooks(recorder):
        out1 = step(state, batch)
    new_state, metrics = _check_step_output(out1, "check_step: step")
    for k, v in metrics.items():
        if not isinstance(v, Tensor):
            raise AssertionError(
                f"check_step: metric {k!r} is a {type(v).__name__}, not a tensor. Steps keep metrics as tensors "
                "(no .item(): it stalls the device); the runner reads them at log intervals."
            )
        if v.numel() != 1:
            raise AssertionError(f"check_step: metric {k!r} has shape {tuple(v.shape)}; metrics must be scalars.")
        if not bool(torch.isfinite(v.detach()).all()):
            raise AssertionError(f"check_step: metric {k!r} is not finite: {v.item()}.")
    _assert_unchanged(before, state, "check_step")
    if deterministic:
        out2 = step(state, batch)
        _assert_unchanged(before, state, "check_step (second call)")
        try:
            assert_trees_equal(out2, out1)
        except AssertionError as e:
            raise AssertionError(
                "check_step: two calls with the same (state, batch) gave different results. Draw randomness "
                f"from the state (state.apply(..., train=True) does) rather than from global RNG.\n{e}"
            ) from None
    if check_grads:
        if not recorder.calls:
            raise AssertionError(
                "check_step: the step computed no gradients through trainkit.value_and_grad, so transforms "
                "cannot hook into it. Use tk.value_and_grad(loss_fn)(state.params), or check_grads=False."
            )
        names = list(state.params)
        grads = recorder.calls[-1]
        zero = [n for n, g in zip(names, grads) if not bool(g.ne(0).any())]
        if zero:
            raise AssertionError(
                f"check_step: parameters with an all-zero gradient: {zero}. They do not reach the loss "
                "(unused layer? detached tensor? a param captured from state.params instead of the "
                "loss function's argument?)."
            )
    return new_state, metrics
