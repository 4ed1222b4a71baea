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

from .contract import check_step_output
from .functional import StepHook, hooks
from .state import TrainState

__all__ = ["check_step", "assert_trees_close", "assert_trees_equal", "snapshot"]


def _leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    leaves, _ = pytree.tree_flatten_with_path(tree)
    return [(pytree.keystr(path) or "<root>", leaf) for path, leaf in leaves]


# Default (rtol, atol) per dtype, the same as torch.testing.assert_close's. trainkit does not
# call torch.testing: its first assert_close imports sympy and torch.distributed.tensor
# (measured 0.4 s warm, 3-4.5 s cold), which the first check_step of a test session paid.
_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.complex32: (1e-3, 1e-5),
    torch.complex64: (1.3e-6, 1e-5),
    torch.complex128: (1e-7, 1e-7),
}


def _tolerances(dtype: torch.dtype, rtol: float | None, atol: float | None) -> tuple[float, float]:
    if (rtol is None) != (atol is None):
        raise ValueError(
            f"assert_trees_close: give both rtol and atol or neither, got rtol={rtol}, atol={atol}. "
            "Pass e.g. rtol=1e-5, atol=1e-8."
        )
    if rtol is not None and atol is not None:
        return float(rtol), float(atol)
    return _TOLERANCES.get(dtype, (0.0, 0.0))  # integers and bools: exact


def _tensor_mismatch(x: Tensor, y: Tensor, rtol: float | None, atol: float | None) -> str | None:
    """Why ``x`` is not close to ``y`` (shape, dtype, then values), or ``None`` when it is."""
    if x.shape != y.shape:
        return f"shape {tuple(x.shape)} != expected {tuple(y.shape)}"
    if x.dtype != y.dtype:
        return f"dtype {x.dtype} != expected {y.dtype}"
    r, a = _tolerances(x.dtype, rtol, atol)
    x, y = (t.detach().cpu().resolve_conj().resolve_neg() for t in (x, y))
    x, y = (t.to_dense() if t.layout != torch.strided else t for t in (x, y))
    same = (x == y) | (x.isnan() & y.isnan())  # in the tensors' own dtype: int64 stays exact
    # differences computed without overflow or rounding (int64 stays exact)
    wide = torch.complex128 if x.is_complex() else torch.float64 if x.is_floating_point() else torch.int64
    xw, yw = x.to(wide), y.to(wide)
    if r == 0 and a == 0:
        bad = ~same
    else:  # torch.isclose's rule: |x - y| <= atol + rtol * |y|; infinities must be equal
        bad = ~same & (~((xw - yw).abs() <= a + r * yw.abs()) | xw.isinf() | yw.isinf())
    n_bad = int(bad.sum())
    return None if n_bad == 0 else _describe(xw, yw, bad, n_bad, r, a)


def _index(flat: int, shape: torch.Size) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape)) if len(shape) else ()


def _describe(x: Tensor, y: Tensor, bad: Tensor, n_bad: int, rtol: float, atol: float) -> str:
    total = bad.numel()
    out = f"{n_bad} of {total} elements differ ({100.0 * n_bad / total:.1f}%)"
    nan_bad = bad & (x.isnan() | y.isnan())  # a NaN against a number
    num_bad = bad & ~nan_bad
    if bool(num_bad.any()):
        abs_diff = torch.where(num_bad, (x - y).abs(), 0).double()
        where = _index(int(abs_diff.flatten().argmax()), x.shape)
        rel_diff = torch.where(num_bad, abs_diff / y.abs().double(), 0)  # inf where expected is 0
        out += (
            f"; max abs diff {float(abs_diff.max()):.6g} at index {where} (actual {x[where].item()}, "
            f"expected {y[where].item()}), max rel diff {float(rel_diff.max()):.6g} (rtol={rtol:g}, atol={atol:g})"
        )
    if bool(nan_bad.any()):
        where = _index(int(nan_bad.flatten().nonzero()[0]), x.shape)
        out += (
            f"; NaN against a number at {int(nan_bad.sum())} places, the first at index {where} "
            f"(actual {x[where].item()}, expected {y[where].item()})"
        )
    return out


def _leaf_mismatch(x: Any, y: Any, rtol: float | None, atol: float | None) -> str | None:
    if isinstance(x, Tensor) and isinstance(y, Tensor):
        return _tensor_mismatch(x, y, rtol, atol)
    if isinstance(x, Tensor) or isinstance(y, Tensor):
        return f"actual is a {type(x).__name__}, expected a {type(y).__name__}"
    if type(x) is float and type(y) is float:  # Python floats (a metric, a loss scale): close as float64
        if math.isnan(x) and math.isnan(y):
            return None
        r, a = _tolerances(torch.float64, rtol, atol)
        return None if x == y or abs(x - y) <= a + r * abs(y) else f"{x!r} != {y!r} (rtol={r:g}, atol={a:g})"
    return None if x == y else f"{x!r} != {y!r}"


def assert_trees_close(actual: Any, expected: Any, *, rtol: float | None = None, atol: float | None = None) -> None:
    """Assert two pytrees (states, dicts, lists of tensors) have the same structure and close leaves.

    Tensors must have the same shape and dtype (not device) and ``|actual - expected| <=
    atol + rtol * |expected|`` elementwise, with ``torch.testing.assert_close``'s default
    ``rtol``/``atol`` for each dtype (exact for integers and bools); NaNs in the same places
    are equal. Python floats compare the same way (float64 tolerances); other leaves with
    ``==``. The error names the path of the first differing leaf and its largest
    absolute and relative differences.

    >>> import torch
    >>> assert_trees_close({"w": torch.ones(2)}, {"w": torch.ones(2) + 1e-9})
    >>> assert_trees_close({"w": torch.ones(2)}, {"w": torch.zeros(2)})
    Traceback (most recent call last):
    ...
    AssertionError: trees differ at ['w']: 2 of 2 elements differ (100.0%); max abs diff 1 at index (0,) ...
    """
    a, b = _leaves_with_paths(actual), _leaves_with_paths(expected)
    if [p for p, _ in a] != [p for p, _ in b]:
        raise AssertionError(f"trees differ in structure:\n  actual:   {[p for p, _ in a]}\n  expected: {[p for p, _ in b]}")
    for (path, x), (_, y) in zip(a, b, strict=True):
        why = _leaf_mismatch(x, y, rtol, atol)
        if why is not None:
            raise AssertionError(f"trees differ at {path}: {why}")


def assert_trees_equal(actual: Any, expected: Any) -> None:
    """Assert two pytrees are equal bit for bit (same dtypes, same values, NaNs in the same places).

    >>> import torch
    >>> assert_trees_equal([torch.tensor(float("nan"))], [torch.tensor(float("nan"))])
    """
    assert_trees_close(actual, expected, rtol=0.0, atol=0.0)


def snapshot(tree: Any) -> list[tuple[str, Any, Any]]:
    """Copies of every tensor leaf with its version counter, to check later nothing changed.

    >>> import torch
    >>> [(path, version) for path, _, version in snapshot({"w": torch.ones(2), "n": 3})]
    [("['w']", 0), ("['n']", None)]
    """
    out = []
    for path, x in _leaves_with_paths(tree):
        is_t = isinstance(x, Tensor)
        out.append((path, x.detach().clone() if is_t else x, x._version if is_t else None))
    return out


def _assert_unchanged(before: list[tuple[str, Any, Any]], tree: Any, what: str) -> None:
    after = _leaves_with_paths(tree)
    for (path, copy, version), (_, x) in zip(before, after, strict=True):
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
    with hooks(recorder, params=state.params):
        out1 = step(state, batch)
    new_state, metrics = check_step_output(out1, "check_step: step")
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
        zero = [n for n, g in zip(names, grads, strict=True) if not bool(g.ne(0).any())]
        if zero:
            raise AssertionError(
                f"check_step: parameters with an all-zero gradient: {zero}. They do not reach the loss "
                "(unused layer? detached tensor? a param captured from state.params instead of the "
                "loss function's argument?)."
            )
    return new_state, metrics
