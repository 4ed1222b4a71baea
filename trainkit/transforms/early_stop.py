"""``early_stop``: stop the run when a monitored metric stops improving; optionally hand back the best params.

The counters live in ``state.slots["early_stop"]``, so they are checkpointed and
resumed with the run; ``{"stop": True}`` there is what makes :func:`trainkit.fit`
stop (see :func:`trainkit.should_stop`).

Semantics (Keras's and Lightning's): ``patience`` counts consecutive evaluations
without improvement, and the run stops on the ``patience``-th; improvement is
strict, ``current + min_delta < best`` in ``"min"`` mode (``current - min_delta >
best`` in ``"max"``); the first evaluation always improves; an evaluation that does
not improve never moves the best. Before that, in this order: a NaN/inf value stops
at once (``check_finite``), then ``stopping_threshold`` (reached: stop, strictly
better than it) and ``divergence_threshold`` (strictly worse: stop).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping

from torch import Tensor

from .. import dist
from ..contract import is_epoch_step
from ..state import TrainState
from ._base import mark, two_forms
from .table import check_order

__all__ = ["early_stop", "best_state"]

NAME = "early_stop"
_log = logging.getLogger("trainkit.early_stop")
_DECISION = ("best", "wait", "evaluations", "best_evaluation", "stop", "reason", "stopped_evaluation")


def early_stop(
    step: Callable[..., Any] | None = None,
    *,
    monitor: str,
    mode: str = "min",
    patience: int = 3,
    min_delta: float = 0.0,
    stopping_threshold: float | None = None,
    divergence_threshold: float | None = None,
    check_finite: bool = True,
    restore_best: bool = False,
) -> Any:
    """Stop when ``metrics[monitor]`` has not improved for ``patience`` evaluations.

    Args:
      step: an epoch step (``tk.epoch_step(train_step, eval_step)``: one evaluation
        per epoch, monitor e.g. ``"val_loss"``) or a batch step (one evaluation per
        step, monitor e.g. ``"loss"``). Omit it to get a transform for :func:`trainkit.compose`.
      monitor: the key of the step's metrics to watch. A missing key raises an
        error that lists the keys the step returned.
      mode: ``"min"`` (lower is better) or ``"max"``.
      patience: stop on the ``patience``-th consecutive evaluation without improvement (>= 1).
      min_delta: an improvement must beat the best by more than ``abs(min_delta)``.
      stopping_threshold: stop as soon as the metric is strictly better than this.
      divergence_threshold: stop as soon as the metric is strictly worse than this.
      check_finite: stop as soon as the metric is NaN or infinite.
      restore_best: keep a copy of the params and buffers of the best evaluation in
        the slot, and put them back into the state when stopping. When the run ends
        without stopping, :func:`best_state` (also ``tk.early_stop.best_state``) gives
        the state with the best params.

    Returns:
      The wrapped step (or the transform). Its metrics are the inner step's. After
      each evaluation ``state.slots["early_stop"]`` holds ``best``, ``wait``,
      ``evaluations`` (1-based count), ``best_evaluation``, ``stop``, ``reason``
      (a sentence naming the evaluation and where the best was) and
      ``stopped_evaluation``; with ``restore_best``, ``best_params`` and ``best_buffers``.

    Where it stands: outermost, around the epoch step (``tk.early_stop(tk.epoch_step(
    tk.distributed(step), eval_step), monitor="val_loss")``), so that it decides on
    metrics the runner has already averaged across ranks. As a safeguard, when
    ``torch.distributed`` is initialised, rank 0's decision is broadcast to every rank
    (one small collective per evaluation), so that ranks never disagree and hang
    (Lightning #379). Wrapped twice it is rejected (the two would share one slot).

    Host syncs: the monitored value is read on the host once per evaluation (a
    decision needs it); around a batch step that is once per step.

    A state that has stopped stays stopped when ``fit(resume=...)`` loads it; calling
    the step on it again carries the counters on (it stops again at the next
    evaluation that does not improve). Remove ``state.slots["early_stop"]`` to start afresh.

    >>> import torch, trainkit as tk
    >>> losses = [1.0, 0.5, 0.6, 0.55, 0.7, 0.4]
    >>> def step(state, batch):  # stands for an epoch: reports a val_loss
    ...     return state.replace(step=state.step + 1), {"val_loss": torch.tensor(losses[state.step])}
    >>> state = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1))
    >>> stepper = tk.early_stop(step, monitor="val_loss", patience=3)
    >>> while not tk.should_stop(state):
    ...     state, _ = stepper(state, None)
    >>> state.step, state.slots["early_stop"]["reason"]
    (5, "early_stop: 'val_loss' did not improve for 3 evaluations (patience=3); stopped at evaluation 5, best 0.5 at evaluation 2.")
    """
    cfg = _validate(monitor, mode, patience, min_delta, stopping_threshold, divergence_threshold, check_finite, restore_best)

    def make(inner: Callable[..., Any]) -> Callable[..., Any]:
        check_order(NAME, inner)

        def wrapped(state: TrainState, data: Any) -> tuple[TrainState, Any]:
            if not isinstance(state, TrainState):
                raise TypeError(f"early_stop: the state must be a TrainState, got {type(state).__name__}.")
            out = inner(state, data)
            if type(out) is not tuple or len(out) != 2 or not isinstance(out[0], TrainState) or not isinstance(out[1], Mapping):
                raise TypeError(
                    f"early_stop: the step must return (state, metrics), got {type(out).__name__}. "
                    'Return e.g. (state, {"val_loss": loss}).'
                )
            new_state, metrics = out
            current = _read(metrics, cfg["monitor"], inner)
            slot = _slot(state)
            decision, improved = decide(slot, current, cfg)
            decision, improved = _agree(decision, improved)
            new_slot = {**slot, **decision}
            if cfg["restore_best"]:
                new_slot.setdefault("best_params", None)
                new_slot.setdefault("best_buffers", None)
            if cfg["restore_best"] and improved:
                # Copies: under donation the state's own tensors are updated in place later.
                new_slot["best_params"] = {n: t.detach().clone() for n, t in new_state.params.items()}
                new_slot["best_buffers"] = {n: t.detach().clone() for n, t in new_state.buffers.items()}
            if decision["stop"]:
                if dist.is_main_process():
                    _log.info(decision["reason"])
                if cfg["restore_best"] and new_slot.get("best_params") is not None:
                    new_state = _with_best(new_state, new_slot)
            return new_state.replace(slots={**new_state.slots, NAME: new_slot}), metrics

        return mark(wrapped, inner, NAME)

    return two_forms(step, NAME, make)


def _validate(
    monitor: Any,
    mode: Any,
    patience: Any,
    min_delta: Any,
    stopping_threshold: Any,
    divergence_threshold: Any,
    check_finite: Any,
    restore_best: Any,
) -> dict[str, Any]:
    if not isinstance(monitor, str) or not monitor:
        raise TypeError(f'early_stop: monitor must be the name of a metric, e.g. "val_loss", got {monitor!r}.')
    if mode not in ("min", "max"):
        raise ValueError(f'early_stop: mode must be "min" (lower is better) or "max", got {mode!r}.')
    if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
        raise ValueError(f"early_stop: patience must be an int >= 1 (evaluations without improvement before stopping), got {patience!r}.")
    if not _finite_number(min_delta):
        raise ValueError(f"early_stop: min_delta must be a finite number, got {min_delta!r}.")
    for name, v in (("stopping_threshold", stopping_threshold), ("divergence_threshold", divergence_threshold)):
        if v is not None and not _finite_number(v):
            raise ValueError(f"early_stop: {name} must be a finite number or None, got {v!r}.")
    if stopping_threshold is not None and divergence_threshold is not None:
        better = stopping_threshold < divergence_threshold if mode == "min" else stopping_threshold > divergence_threshold
        if not better:
            raise ValueError(
                f"early_stop: with mode={mode!r} the stopping_threshold ({stopping_threshold}) must be "
                f"{'below' if mode == 'min' else 'above'} the divergence_threshold ({divergence_threshold})."
            )
    for name, v in (("check_finite", check_finite), ("restore_best", restore_best)):
        if not isinstance(v, bool):
            raise TypeError(f"early_stop: {name} must be True or False, got {v!r}.")
    return {
        "monitor": monitor,
        "mode": mode,
        "patience": patience,
        "min_delta": abs(float(min_delta)),
        "stopping_threshold": None if stopping_threshold is None else float(stopping_threshold),
        "divergence_threshold": None if divergence_threshold is None else float(divergence_threshold),
        "check_finite": check_finite,
        "restore_best": restore_best,
    }


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _read(metrics: Mapping[str, Any], monitor: str, inner: Callable[..., Any]) -> float:
    if monitor not in metrics:
        hint = ""
        if monitor.startswith("val_") and not any(k.startswith("val_") for k in metrics):
            hint = (
                " There are no val_* metrics: give tk.epoch_step an eval_step and fit a val_loader "
                "(validation runs inside the epoch step, before early_stop reads it)."
            )
        elif is_epoch_step(inner) and not monitor.startswith(("train_", "val_")):
            hint = " An epoch step prefixes its metrics with train_ and val_."
        raise KeyError(f"early_stop: monitor={monitor!r} is not among the metrics the step returned: {sorted(metrics)}.{hint}")
    v = metrics[monitor]
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"early_stop: metric {monitor!r} must be a scalar, got shape {tuple(v.shape)}.")
        return float(v.detach())  # the host sync of this evaluation
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise TypeError(f"early_stop: metric {monitor!r} must be a number or a scalar tensor, got {type(v).__name__}.")


def _slot(state: TrainState) -> dict[str, Any]:
    slot = state.slots.get(NAME)
    if slot is None:
        return {
            "best": None,
            "wait": 0,
            "evaluations": 0,
            "best_evaluation": None,
            "stop": False,
            "reason": None,
            "stopped_evaluation": None,
        }
    if not isinstance(slot, Mapping) or not set(_DECISION) <= set(slot):
        raise ValueError(
            f"early_stop: state.slots[{NAME!r}] is not an early-stopping state "
            f"({sorted(slot) if isinstance(slot, Mapping) else slot!r}); "
            "another transform wrote this slot, or the state comes from elsewhere."
        )
    return dict(slot)


def decide(slot: Mapping[str, Any], current: float, cfg: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """One evaluation of the stopping rule: the new counters, and whether ``current`` is a new best.

    ``slot`` holds the counters so far (``best``, ``wait``, ``evaluations``, ...);
    ``cfg`` the arguments of :func:`early_stop`. Pure: used by the transform, and
    by tests to check the rule on sequences of values.

    >>> cfg = {"monitor": "m", "mode": "min", "patience": 2, "min_delta": 0.0, "check_finite": True,
    ...        "stopping_threshold": None, "divergence_threshold": None}
    >>> slot = {"best": None, "wait": 0, "evaluations": 0, "best_evaluation": None, "stop": False}
    >>> for value in (3.0, 2.0, 2.0, 2.5):
    ...     slot, improved = decide(slot, value, cfg)
    >>> slot["stop"], slot["best"], slot["best_evaluation"], slot["evaluations"]
    (True, 2.0, 2, 4)
    """
    monitor, mode, patience, delta = cfg["monitor"], cfg["mode"], cfg["patience"], cfg["min_delta"]
    n = int(slot["evaluations"]) + 1
    best, wait, best_at = slot["best"], int(slot["wait"]), slot["best_evaluation"]
    better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
    stop, reason, improved = False, None, False

    def where_best() -> str:
        return "no finite best yet" if best is None else f"best {best:.6g} at evaluation {best_at}"

    if cfg["check_finite"] and not math.isfinite(current):
        stop = True
        reason = f"early_stop: {monitor!r} is {current} at evaluation {n} (check_finite=True); {where_best()}."
    elif cfg["stopping_threshold"] is not None and better(current, cfg["stopping_threshold"]):
        stop = True
        reason = (
            f"early_stop: {monitor!r} = {current:.6g} reached stopping_threshold={cfg['stopping_threshold']} "
            f"at evaluation {n}; {where_best()}."
        )
    elif cfg["divergence_threshold"] is not None and better(cfg["divergence_threshold"], current):
        stop = True
        reason = (
            f"early_stop: {monitor!r} = {current:.6g} passed divergence_threshold={cfg['divergence_threshold']} "
            f"at evaluation {n}; {where_best()}."
        )
    elif (best is None and not math.isnan(current)) or (
        best is not None and better(current + delta if mode == "min" else current - delta, best)
    ):
        best, wait, best_at, improved = current, 0, n, True
    else:
        wait += 1
        if wait >= patience:
            stop = True
            reason = (
                f"early_stop: {monitor!r} did not improve for {wait} evaluations (patience={patience}); "
                f"stopped at evaluation {n}, {where_best()}."
            )
    decision = {
        "best": best,
        "wait": wait,
        "evaluations": n,
        "best_evaluation": best_at,
        "stop": stop,
        "reason": reason,
        "stopped_evaluation": n if stop else None,
    }
    return decision, improved


def _agree(decision: dict[str, Any], improved: bool) -> tuple[dict[str, Any], bool]:
    """Under torch.distributed, every rank takes rank 0's decision (one small broadcast)."""
    return dist.broadcast((decision, improved))


def _with_best(state: TrainState, slot: Mapping[str, Any]) -> TrainState:
    params = {n: t.clone().requires_grad_(state.params[n].requires_grad) for n, t in slot["best_params"].items()}
    buffers = {n: t.clone() for n, t in slot["best_buffers"].items()}
    return state.replace(params=params, buffers=buffers)


def best_state(state: TrainState) -> TrainState:
    """The state with the params and buffers of the best evaluation (needs ``restore_best=True``).

    Use it when ``fit`` ends without early stopping (when it stopped, the state
    already holds the best params). Optimizer state, step and slots are kept.

    >>> import torch, trainkit as tk
    >>> def step(state, batch):  # each call moves the weight by +1 and reports it as the loss
    ...     w = state.params["weight"].detach() + 1
    ...     return state.replace(params={**state.params, "weight": w}), {"loss": w.sum()}
    >>> state = tk.TrainState.create(torch.nn.Linear(1, 1, bias=False), tk.optim.sgd(0.1))
    >>> state = state.replace(params={"weight": torch.zeros(1, 1)})
    >>> stepper = tk.early_stop(step, monitor="loss", patience=5, restore_best=True)
    >>> for _ in range(3):
    ...     state, _ = stepper(state, None)
    >>> state.params["weight"].item(), tk.early_stop.best_state(state).params["weight"].item()
    (3.0, 1.0)
    """
    slot = state.slots.get(NAME)
    if not isinstance(slot, Mapping):
        raise ValueError("best_state: the state has no early_stop slot; wrap the step with tk.early_stop(..., restore_best=True).")
    if slot.get("best_params") is None:
        why = (
            "no evaluation has improved yet"
            if "best_params" in slot
            else "the step was wrapped without restore_best=True, so no copy of the best params was kept"
        )
        raise ValueError(f"best_state: no best params in state.slots[{NAME!r}]: {why}.")
    return _with_best(state, slot)


early_stop.best_state = best_state  # type: ignore[attr-defined]
