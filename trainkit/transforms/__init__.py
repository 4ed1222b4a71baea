"""Transforms: functions from a step to a step. One transform per module.

How to write a transform of your own
------------------------------------

A transform takes a step and returns a step of the same shape. trainkit's own
follow four conventions, and yours should too:

* **Two call forms.** ``my_t(step, **options)`` wraps ``step``; ``my_t(**options)``
  returns the transform, for :func:`compose`. :func:`two_forms` does both; validate
  ``options`` before calling it, so a bad option fails when wrapping, not at step 10,000.
* **The marker.** Return ``mark(wrapper, inner, "my_t")``: it records the transform
  (:func:`applied_transforms`) and carries over the *level* of ``inner``. The level
  says what the step consumes: a **batch step** takes ``(state, batch)``; an **epoch
  step** (made by :func:`trainkit.epoch_step`) takes ``(state, EpochData)``.
  ``fit`` folds a batch step into an epoch step itself, so a wrapper around an epoch
  step that is not marked is taken for a batch step (``functools.wraps(inner)``
  carries the marker too).
* **The slot.** A transform that keeps state keeps it in ``state.slots["my_t"]``
  (plain numbers, tensors and containers, so it is checkpointed), and reads it back
  from the state it is given: never in a closure, so it survives resume.
* **Its place.** ``register(TransformInfo("my_t", level="batch", kind="user"))``
  declares it in the table (:mod:`trainkit.transforms.table`), and
  ``check_order("my_t", inner)`` checks the level, a second application and the order
  rules when wrapping. A transform that needs the gradients reaches them through a
  :class:`trainkit.StepHook` installed with ``tk.hooks(hook, params=state.params)``.

>>> import torch, trainkit as tk
>>> from trainkit.transforms import mark, two_forms
>>> def count_steps(step=None, *, every=1):
...     if not isinstance(every, int) or every < 1:
...         raise ValueError(f"count_steps: every must be an int >= 1, got {every!r}.")
...     def make(inner):
...         def wrapped(state, batch):
...             state, metrics = inner(state, batch)
...             n = state.slots.get("count_steps", 0) + 1
...             return state.replace(slots={**state.slots, "count_steps": n}), metrics
...         return mark(wrapped, inner, "count_steps")
...     return two_forms(step, "count_steps", make)
>>> step = tk.compose(count_steps(every=1))(lambda s, b: (s.replace(step=s.step + 1), {}))
>>> state = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1))
>>> state, _ = step(*step(state, None)[:1], None)
>>> state.slots["count_steps"], tk.applied_transforms(step)
(2, ('count_steps',))
"""

from ._base import applied_transforms, compose, mark, two_forms
from .table import TRANSFORMS, TransformInfo, check_order, register

__all__ = ["compose", "applied_transforms", "mark", "two_forms", "TransformInfo", "TRANSFORMS", "register", "check_order"]
