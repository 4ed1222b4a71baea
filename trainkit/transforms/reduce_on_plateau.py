"""``reduce_on_plateau``: lower the LR when a monitored metric stops improving, lastingly, through the state.

Numerically ``torch.optim.lr_scheduler.ReduceLROnPlateau`` fed the same metrics:
an evaluation improves when it beats the best by ``threshold`` (relative or
absolute); after more than ``patience`` evaluations without improvement, every LR
becomes ``max(lr * factor, min_lr)`` (unless that changes it by ``eps`` or less),
then ``cooldown`` evaluations are ignored. The counters live in
``state.slots["reduce_on_plateau"]`` and the LR in the optimizer state (a lasting
change, :func:`trainkit.optim.set_lr`), so both are checkpointed: a resumed run
goes on with the reduced LR and the same counters.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping

from torch import Tensor

from .. import dist, optim
from ..state import TrainState
from ._base import mark, two_forms
from .table import check_order

__all__ = ["reduce_on_plateau", "decide"]

NAME = "reduce_on_plateau"
_log = logging.getLogger("trainkit.reduce_on_plateau")
_KEYS = ("best", "num_bad_epochs", "cooldown_counter", "evaluations", "reductions")


def reduce_on_plateau(
    step: Callable[..., Any] | None = None,
    *,
    monitor: str = "val_loss",
    factor: float = 0.1,
    patience: int = 10,
    cooldown: int = 0,
    min_lr: float = 0.0,
    mode: str = "min",
    threshold: float = 1e-4,
    threshold_mode: str = "rel",
    eps: float = 1e-8,
) -> Any:
    """Multiply the LR by ``factor`` when ``metrics[monitor]`` has not improved for more than ``patience`` evaluations.

    Args:
      step: an epoch step (``tk.epoch_step(train_step, eval_step)``: one evaluation
        per epoch) or a batch step. Omit it to get a transform for :func:`trainkit.compose`.
      monitor: the metric to watch; a missing key is an error that lists the keys there are.
      factor: the LR's multiplier on a plateau, in ``(0, 1)``.
      patience, cooldown: evaluations without improvement tolerated; evaluations ignored after a reduction.
      min_lr: the LR is never reduced below it.
      mode, threshold, threshold_mode: ``"min"``/``"max"``; an improvement beats the best
        by ``threshold`` relative to it (``"rel"``) or absolute (``"abs"``).
      eps: a reduction smaller than this is not made.

    Returns:
      The wrapped step. After each evaluation the slot holds ``best``,
      ``num_bad_epochs``, ``cooldown_counter``, ``evaluations`` and ``reductions``;
      ``state.lr`` is the LR of the next update. Every LR stage (each param group)
      is reduced, each by its own LR. On a schedule, a reduction multiplies the schedule
      from then on (see :func:`trainkit.optim.set_lr`).

    Where it stands: outside the epoch step, like ``early_stop`` (in either order with
    it), so that it decides on metrics already averaged across ranks; under
    ``torch.distributed`` rank 0's decision is broadcast. Host syncs: one read of the
    monitored value per evaluation.

    >>> import torch, trainkit as tk
    >>> losses = [1.0, 0.9, 0.95, 0.97, 0.99]
    >>> def epoch(state, data):  # stands for an epoch: reports a val_loss
    ...     return state.replace(step=state.step + 1), {"val_loss": torch.tensor(losses[state.step])}
    >>> state = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.adam(0.05))
    >>> stepper = reduce_on_plateau(epoch, patience=2)
    >>> for _ in losses:
    ...     state, _ = stepper(state, None)
    ...     print(round(state.lr, 6), end=" ")
    0.05 0.05 0.05 0.05 0.005
    """
    cfg = _validate(monitor, factor, patience, cooldown, min_lr, mode, threshold, threshold_mode, eps)

    def make(inner: Callable[..., Any]) -> Callable[..., Any]:
        check_order(NAME, inner)

        def wrapped(state: TrainState, data: Any) -> tuple[TrainState, Any]:
            if not isinstance(state, TrainState):
                raise TypeError(f"reduce_on_plateau: the state must be a TrainState, got {type(state).__name__}.")
            out = inner(state, data)
            if type(out) is not tuple or len(out) != 2 or not isinstance(out[0], TrainState) or not isinstance(out[1], Mapping):
                raise TypeError(
                    f"reduce_on_plateau: the step must return (state, metrics), got {type(out).__name__}. "
                    'Return e.g. (state, {"val_loss": loss}).'
                )
            new_state, metrics = out
            slot, reduce = dist.broadcast(decide(_slot(state), _read(metrics, cfg["monitor"]), cfg))
            opt_state = new_state.opt_state
            if reduce:
                opt_state = optim.set_lr(opt_state, lambda lr: _reduced(lr, cfg))
                slot = {**slot, "reductions": slot["reductions"] + 1}
                if dist.is_main_process():
                    lrs = optim.get_lrs(opt_state)
                    _log.info(f"reduce_on_plateau: {cfg['monitor']!r} plateaued at evaluation {slot['evaluations']}; lr -> {lrs}")
            return new_state.replace(opt_state=opt_state, slots={**new_state.slots, NAME: slot}), metrics

        return mark(wrapped, inner, NAME)

    return two_forms(step, NAME, make)


def _reduced(lr: float, cfg: Mapping[str, Any]) -> float:
    new = max(float(lr) * cfg["factor"], cfg["min_lr"])
    return new if float(lr) - new > cfg["eps"] else float(lr)


def _validate(
    monitor: Any, factor: Any, patience: Any, cooldown: Any, min_lr: Any, mode: Any, threshold: Any, threshold_mode: Any, eps: Any
) -> dict:
    who = "reduce_on_plateau"
    if not isinstance(monitor, str) or not monitor:
        raise TypeError(f'{who}: monitor must be the name of a metric, e.g. "val_loss", got {monitor!r}.')
    if mode not in ("min", "max"):
        raise ValueError(f'{who}: mode must be "min" (lower is better) or "max", got {mode!r}.')
    if threshold_mode not in ("rel", "abs"):
        raise ValueError(f'{who}: threshold_mode must be "rel" or "abs", got {threshold_mode!r}.')
    cfg = {
        "monitor": monitor,
        "mode": mode,
        "threshold_mode": threshold_mode,
        "factor": optim._base.check_number(who, "factor", factor, low=0.0, high=1.0, low_open=True, high_open=True, example=0.1),
        "patience": optim._base.check_int(who, "patience", patience, low=0, example=10),
        "cooldown": optim._base.check_int(who, "cooldown", cooldown, low=0, example=0),
        "min_lr": optim._base.check_number(who, "min_lr", min_lr, low=0.0, example=0.0),
        "threshold": optim._base.check_number(who, "threshold", threshold, low=0.0, example=1e-4),
        "eps": optim._base.check_number(who, "eps", eps, low=0.0, example=1e-8),
    }
    return cfg


def _read(metrics: Mapping[str, Any], monitor: str) -> float:
    if monitor not in metrics:
        hint = ""
        if monitor.startswith("val_") and not any(k.startswith("val_") for k in metrics):
            hint = " There are no val_* metrics: give tk.epoch_step an eval_step and fit a val_loader."
        raise KeyError(f"reduce_on_plateau: monitor={monitor!r} is not among the metrics the step returned: {sorted(metrics)}.{hint}")
    v = metrics[monitor]
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"reduce_on_plateau: metric {monitor!r} must be a scalar, got shape {tuple(v.shape)}.")
        return float(v.detach())  # the host sync of this evaluation
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise TypeError(f"reduce_on_plateau: metric {monitor!r} must be a number or a scalar tensor, got {type(v).__name__}.")


def _slot(state: TrainState) -> dict[str, Any]:
    slot = state.slots.get(NAME)
    if slot is None:
        return {"best": None, "num_bad_epochs": 0, "cooldown_counter": 0, "evaluations": 0, "reductions": 0}
    if not isinstance(slot, Mapping) or not set(_KEYS) <= set(slot):
        raise ValueError(
            f"reduce_on_plateau: state.slots[{NAME!r}] is not a plateau state ({slot!r}); "
            "another transform wrote this slot, or the state comes from elsewhere."
        )
    return dict(slot)


def decide(slot: Mapping[str, Any], current: float, cfg: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """One evaluation of torch's ReduceLROnPlateau rule: the new counters, and whether to reduce the LR now.

    ``best`` is ``None`` before the first evaluation (torch's ``inf``: an evaluation
    always improves on it, unless it is NaN).

    >>> cfg = {"mode": "min", "threshold_mode": "rel", "threshold": 0.0, "patience": 1, "cooldown": 0}
    >>> slot = {"best": None, "num_bad_epochs": 0, "cooldown_counter": 0, "evaluations": 0, "reductions": 0}
    >>> for value in (3.0, 3.0, 3.0):
    ...     slot, reduce = decide(slot, value, cfg)
    >>> reduce, slot["num_bad_epochs"], slot["best"]
    (True, 0, 3.0)
    """
    best = slot["best"]
    worst = math.inf if cfg["mode"] == "min" else -math.inf
    bad, cooling = int(slot["num_bad_epochs"]), int(slot["cooldown_counter"])
    if _better(current, worst if best is None else float(best), cfg):
        best, bad = current, 0
    else:
        bad += 1
    if cooling > 0:  # in cooldown: count it down and ignore bad evaluations
        cooling, bad = cooling - 1, 0
    reduce = bad > cfg["patience"]
    if reduce:
        cooling, bad = cfg["cooldown"], 0
    new = {**slot, "best": best, "num_bad_epochs": bad, "cooldown_counter": cooling, "evaluations": int(slot["evaluations"]) + 1}
    return new, reduce


def _better(a: float, best: float, cfg: Mapping[str, Any]) -> bool:
    t = cfg["threshold"]
    if cfg["mode"] == "min":
        return a < best * (1.0 - t) if cfg["threshold_mode"] == "rel" else a < best - t
    return a > best * (t + 1.0) if cfg["threshold_mode"] == "rel" else a > best + t
