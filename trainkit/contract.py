"""The step contract, in one leaf module: what a step returns, what an epoch step consumes, how a
step declares its metrics. The runner, the transforms and ``trainkit.testing`` all check it here.

* A **batch step** is ``(state, batch) -> (state, metrics)``; an **epoch step** is
  ``(state, EpochData) -> (state, metrics)`` and carries the marker ``__trainkit_level__ = "epoch"``
  (:func:`trainkit.epoch_step` sets it; :func:`trainkit.transforms.mark` and ``functools.wraps``
  carry it over to a wrapper).
* ``metrics`` is a dict of scalar tensors. The runner averages them over an epoch,
  weighted by batch size, except the names a step declares with :func:`gauges`
  (counters and gauges such as a loss scale), whose epoch value is the last one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, TypeVar

from torch import Tensor

from .state import TrainState

__all__ = ["EpochData", "check_step_output", "check_eval_output", "batch_size", "is_epoch_step", "gauges", "gauges_of"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class EpochData:
    """What an epoch step consumes: the loaders, and the runner's per-step callback.

    ``on_step(state, metrics, n) -> bool`` is called after every train step (the
    runner logs and checkpoints there; ``True`` ends the epoch early). ``skip`` train
    batches are drawn and dropped first (to resume mid-epoch exactly). ``train_mean``,
    when given, is the running mean of the epoch's train metrics: the runner owns it
    so that a mid-epoch checkpoint holds it and a resumed epoch reports whole-epoch means.
    For a step that runs K steps a call (``tk.jit(step, steps_per_call=K)``) the fold passes
    ``on_step`` a list of K metric dicts, and never runs a group past ``max_steps``.
    """

    train: Iterable[Any]
    val: Iterable[Any] | None = None
    epoch: int = 0
    skip: int = 0
    on_step: Callable[[Any, Any, int], bool] | None = field(default=None, repr=False)
    train_mean: Any = field(default=None, repr=False)
    max_steps: int | None = None


def check_step_output(out: Any, where: str = "step_fn") -> tuple[Any, Mapping[str, Any]]:
    """``out`` if it is ``(TrainState, dict)``, else a TypeError that says what a step returns.

    >>> check_step_output(3, "my_step")
    Traceback (most recent call last):
    ...
    TypeError: my_step must return (state, metrics): a TrainState and a dict of scalar tensors, got int. ...
    """
    if type(out) is not tuple or len(out) != 2 or not isinstance(out[0], TrainState) or not isinstance(out[1], Mapping):
        got = type(out).__name__
        if isinstance(out, tuple):
            got = "tuple(" + ", ".join(type(o).__name__ for o in out) + ")"
        raise TypeError(
            f"{where} must return (state, metrics): a TrainState and a dict of scalar tensors, got {got}. "
            'Return e.g. (state.apply_gradients(grads), {"loss": loss}).'
        )
    return out


def check_eval_output(out: Any) -> Mapping[str, Any]:
    """``out`` if it is a dict of metrics, else a TypeError that says what an eval step returns.

    >>> check_eval_output({"loss": 1.0})
    {'loss': 1.0}
    """
    if not isinstance(out, Mapping):
        raise TypeError(
            f"eval_step must return a dict of scalar metrics, got {type(out).__name__}. "
            'Return e.g. {"loss": loss, "acc": acc}.'
        )
    return out


def batch_size(batch: Any) -> int:
    """The size of the first dimension of the first tensor in ``batch`` (1 if there is none).

    >>> import torch
    >>> batch_size((torch.zeros(5, 2), torch.zeros(5)))
    5
    """
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for b in batch:
            if isinstance(b, (Tensor, list, tuple, Mapping)):
                return batch_size(b)
    return 1


def is_epoch_step(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` consumes an :class:`EpochData` (made by :func:`trainkit.epoch_step`, maybe wrapped).

    >>> import trainkit as tk
    >>> tk.is_epoch_step(lambda s, b: (s, {})), tk.is_epoch_step(tk.epoch_step(lambda s, b: (s, {})))
    (False, True)
    """
    return getattr(fn, "__trainkit_level__", "batch") == "epoch"


def gauges(*names: str) -> Callable[[F], F]:
    """Declare metrics of a step that are counters or gauges: their epoch value is the last, not the mean.

    >>> import trainkit as tk
    >>> @tk.gauges("skipped")
    ... def step(state, batch):
    ...     return state, {}
    >>> sorted(tk.contract.gauges_of(step))
    ['skipped']
    """
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"gauges: metric names must be strings, got {n!r}. Write e.g. @tk.gauges('loss_scale').")

    def mark(step: F) -> F:
        step.__trainkit_gauges__ = gauges_of(step) | frozenset(names)  # type: ignore[attr-defined]
        return step

    return mark


def gauges_of(step: Callable[..., Any]) -> frozenset[str]:
    """The metric names ``step`` (or a transform inside it) declared with :func:`gauges`.

    >>> gauges_of(lambda s, b: (s, {}))
    frozenset()
    """
    return getattr(step, "__trainkit_gauges__", frozenset())
