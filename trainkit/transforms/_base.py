"""What every transform shares: the two call forms, composition, and the record of wrapping."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

__all__ = ["compose", "applied_transforms", "mark", "two_forms"]


F = TypeVar("F", bound=Callable[..., Any])


def compose(*transforms: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``compose(a, b, c)(step) == a(b(c(step)))``: the last transform is the innermost.

    >>> import trainkit as tk
    >>> def tag(name):
    ...     def t(step):
    ...         def wrapped(state, batch):
    ...             s, m = step(state, batch)
    ...             return s, {**m, name: len(m)}
    ...         return wrapped
    ...     return t
    >>> tk.compose(tag("outer"), tag("inner"))(lambda s, b: (s, {}))(None, None)[1]
    {'inner': 0, 'outer': 1}
    """
    for i, t in enumerate(transforms):
        if not callable(t):
            raise TypeError(
                f"compose: argument {i} is a {type(t).__name__}, not a transform. "
                "Pass transforms without the step, e.g. tk.compose(tk.mixed_precision(dtype=torch.bfloat16))."
            )

    def composed(step: Callable[..., Any]) -> Callable[..., Any]:
        for t in reversed(transforms):
            step = t(step)
        return step

    return composed


def applied_transforms(step: Callable[..., Any]) -> tuple[str, ...]:
    """Names of the trainkit transforms wrapped around ``step``, innermost first.

    >>> import torch, trainkit as tk
    >>> step = lambda state, batch: (state, {})
    >>> tk.applied_transforms(step)
    ()
    """
    return getattr(step, "__trainkit_transforms__", ())


def mark(wrapper: F, inner: Callable[..., Any], name: str) -> F:
    """Record on ``wrapper`` that it is transform ``name`` around ``inner`` (for transform authors).

    Keeps the level (batch or epoch step) and the list of transforms applied, so a
    transform can reject an order that cannot work, with a message that says why.
    """
    functools.update_wrapper(wrapper, inner, assigned=("__module__", "__name__", "__qualname__", "__doc__"), updated=())
    wrapper.__wrapped__ = inner  # type: ignore[attr-defined]
    wrapper.__trainkit_transforms__ = applied_transforms(inner) + (name,)  # type: ignore[attr-defined]
    for attr in ("__trainkit_level__", "__trainkit_gauges__"):  # the level, and the metrics that are gauges
        if hasattr(inner, attr):
            setattr(wrapper, attr, getattr(inner, attr))
    return wrapper


def two_forms(step: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Any:
    """Return ``make(step)`` when a step is given, else ``make`` itself (for ``compose``).

    Call it after validating the transform's arguments, so errors come at wrap time.
    """
    if step is None:
        make.__name__ = name
        return make
    if not callable(step):
        raise TypeError(
            f"{name}: the first argument must be a step function (state, batch) -> (state, metrics), "
            f"got {type(step).__name__}. For tk.compose, call {name}(...) with keyword arguments only."
        )
    return make(step)
