"""``mixed_precision``: autocast (bf16, fp16) around a step; fp16 dynamic loss scaling kept in the state.

Parameters and optimizer state stay float32: only the operations inside the
step run in the lower precision (``torch.autocast`` on the state's device
type). With float16, the loss is multiplied by a scale before backward and the
gradients divided by it after, so that small gradients do not underflow; a
step whose gradients are not finite is skipped (params, optimizer state and so
the LR schedule unchanged), counted, and the scale halved. This is PyTorch's
``GradScaler`` policy, with the scale in ``state.slots["mixed_precision"]`` so
that it is checkpointed and resumed with the run.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import Tensor

from ..contract import gauges
from ..functional import StepHook, hooks
from ..state import TrainState
from ._base import mark, two_forms
from .table import check_order

__all__ = ["mixed_precision"]

NAME = "mixed_precision"
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_UNSET: Any = object()
_F32_MAX = torch.finfo(torch.float32).max


def _f32(x: float) -> float:
    """``x`` rounded to float32, as GradScaler keeps its scale (inf when it overflows)."""
    return float(torch.tensor(x, dtype=torch.float64).to(torch.float32))


class _LossScaler(StepHook):
    """Scales the loss, unscales the gradients, and vetoes the update when they are not finite."""

    owner = NAME
    traceable = True  # (float16's veto is read on the host: under tk.jit it needs fullgraph=False)

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.inv_scale = _f32(1.0 / scale) if scale != 1.0 else 1.0
        self.nonfinite: list[Tensor] = []  # one 0-d bool tensor per value_and_grad call
        self._found: bool | None = None

    def loss(self, loss: Tensor, params: Sequence[Tensor]) -> Tensor:
        return loss * self.scale if self.scale != 1.0 else loss

    def grads(self, grads: list[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
        if not grads:
            return grads
        # Out of place: autograd may hand back expanded views, and an outer hook may hold them.
        if self.inv_scale != 1.0:
            grads = torch._foreach_mul(grads, self.inv_scale)
        # max |g| per tensor is inf or nan exactly when the tensor holds an inf or nan; it never overflows.
        nonempty = [g for g in grads if g.numel()]
        if not nonempty:
            return list(grads)
        amax = torch.stack([n.float() for n in torch._foreach_norm(nonempty, math.inf)])
        self.nonfinite.append(~torch.isfinite(amax).all())
        self._found = None
        return list(grads)

    def found_nonfinite(self) -> bool:
        if self._found is None:
            # A host sync, once per step (GradScaler does the same): the update must be vetoed
            # before apply_gradients writes the params, in place when the state is donated.
            self._found = bool(torch.stack(self.nonfinite).any()) if self.nonfinite else False
        return self._found

    def skip_update(self, grads: Mapping[str, Tensor]) -> bool:
        return self.found_nonfinite()


def mixed_precision(
    step: Callable[..., Any] | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    loss_scale: Union[str, float, None] = _UNSET,
    init_scale: float = _UNSET,
    growth_factor: float = _UNSET,
    backoff_factor: float = _UNSET,
    growth_interval: int = _UNSET,
) -> Any:
    """Run ``step`` under ``torch.autocast(dtype)``; for float16, scale the loss dynamically.

    Args:
      step: a batch step ``(state, batch) -> (state, metrics)`` that computes its
        gradients with :func:`trainkit.value_and_grad` and updates with
        ``state.apply_gradients`` (the hook points). Omit it to get a transform for
        :func:`trainkit.compose`.
      dtype: ``torch.bfloat16`` (no loss scaling needed: bf16 has float32's range),
        ``torch.float16`` (loss scaling), or ``torch.float32`` (the step unchanged,
        bit for bit: a switch to turn mixed precision off).
      loss_scale: float16 only. ``"dynamic"`` (the default): PyTorch's ``GradScaler``
        policy; a number: a fixed scale; ``None``: no scaling. In every case a
        float16 step whose gradients are not finite is skipped and counted.
      init_scale, growth_factor, backoff_factor, growth_interval: the dynamic policy,
        defaults as ``GradScaler``: ``2**16``, ``x2`` after ``2000`` consecutive finite
        steps, ``x0.5`` on a non-finite step (the growth count restarts after either;
        a growth that would overflow float32 is dropped).

    Returns:
      The wrapped step (or the transform). Params stay float32. With float16 the
      metrics gain ``loss_scale`` (the scale the step used) and ``skipped_steps``
      (skipped so far), and ``state.slots["mixed_precision"]`` holds ``scale``,
      ``growth_tracker`` and ``skipped_steps``. A skipped step leaves params and
      optimizer state (and so the LR schedule) as they were, while ``state.step``
      and BatchNorm buffers advance, as with ``GradScaler``.

    Raises:
      ValueError: on a dtype other than these three, a ``loss_scale`` (or policy
        argument) with bfloat16/float32, an invalid policy, or an order of
        transforms that cannot work (below).

    Where it stands: around a **batch** step, inside the scale-out transforms
    (``tk.compose(tk.distributed(), tk.mixed_precision(...))``), so that the
    finiteness check sees the reduced gradients and every replica skips the same
    steps. Around an epoch step it is rejected (one scale update per epoch cannot
    work): wrap the batch step, then build the epoch with ``epoch_step``.
    ``early_stop`` and ``lr_range_test`` may stand on either side. The step's
    ``eval_step`` is not wrapped: evaluation runs in the params' float32 unless
    you call it under ``torch.autocast`` yourself.

    Host syncs: with float16 the "all gradients finite" flag is read on the host
    once per step, before the update (``GradScaler.step`` does the same).

    >>> import torch, trainkit as tk
    >>> _ = torch.manual_seed(0)
    >>> state = tk.TrainState.create(torch.nn.Linear(4, 1), tk.optim.sgd(0.1))
    >>> def step(state, batch):
    ...     x, y = batch
    ...     loss_fn = lambda p: torch.nn.functional.mse_loss(state.apply(p, x)[0], y)
    ...     loss, grads = tk.value_and_grad(loss_fn)(state.params)
    ...     return state.apply_gradients(grads), {"loss": loss}
    >>> fp16 = tk.mixed_precision(step, dtype=torch.float16)
    >>> new, metrics = fp16(state, (torch.full((8, 4), 0.1), torch.zeros(8, 1)))
    >>> sorted(metrics), new.params["weight"].dtype, new.slots["mixed_precision"]["scale"]
    (['loss', 'loss_scale', 'skipped_steps'], torch.float32, 65536.0)
    >>> huge = (torch.full((8, 4), 1e4), torch.zeros(8, 1))  # fp16 gradients overflow
    >>> skipped, metrics = fp16(new, huge)
    >>> skipped.params["weight"].equal(new.params["weight"]), metrics["skipped_steps"].item()
    (True, 1)
    >>> skipped.slots["mixed_precision"]["scale"]
    32768.0
    """
    if dtype not in _DTYPES:
        raise ValueError(
            f"mixed_precision: dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype!r}. "
            "bfloat16 needs no loss scaling; float16 scales the loss dynamically; float32 turns it off."
        )
    policy_given = {
        k: v
        for k, v in (
            ("init_scale", init_scale),
            ("growth_factor", growth_factor),
            ("backoff_factor", backoff_factor),
            ("growth_interval", growth_interval),
        )
        if v is not _UNSET
    }
    if dtype != torch.float16:
        given = ([("loss_scale", loss_scale)] if loss_scale is not _UNSET and loss_scale is not None else []) + list(policy_given.items())
        if given:
            names = ", ".join(f"{k}={v!r}" for k, v in given)
            raise ValueError(
                f"mixed_precision: {names} is meaningless with dtype={dtype}: loss scaling is for float16 only "
                f"({_DTYPES[dtype]} {'has the exponent range of float32' if dtype == torch.bfloat16 else 'does not underflow'}). "
                "Drop the argument, or use dtype=torch.float16."
            )
        cfg: dict[str, Any] = {}
    else:
        if loss_scale is _UNSET:
            loss_scale = "dynamic"
        cfg = _validate_fp16(loss_scale, policy_given)

    def make(inner: Callable[..., Any]) -> Callable[..., Any]:
        check_order(NAME, inner)
        if dtype == torch.float32:
            # Off: the very same step, bit for bit (no autocast, no hook, no slot, no metrics).
            def off(state: TrainState, batch: Any) -> Any:
                return inner(state, batch)

            return mark(off, inner, NAME)
        if dtype == torch.bfloat16:

            def bf16(state: TrainState, batch: Any) -> Any:
                with torch.autocast(device_type=_device_type(state), dtype=torch.bfloat16):
                    return inner(state, batch)

            return mark(bf16, inner, NAME)

        def fp16(state: TrainState, batch: Any) -> Any:
            _check_state(state)
            slot = state.slots.get(NAME) or {"scale": cfg["init_scale"], "growth_tracker": 0, "skipped_steps": 0}
            scale = float(slot["scale"])
            scaler = _LossScaler(scale)
            with hooks(scaler, params=state.params), torch.autocast(device_type=_device_type(state), dtype=torch.float16):
                out = inner(state, batch)
            if type(out) is not tuple or len(out) != 2 or not isinstance(out[0], TrainState) or not isinstance(out[1], Mapping):
                raise TypeError(
                    f"mixed_precision: the step must return (state, metrics), got {type(out).__name__}. "
                    'Return e.g. (state.apply_gradients(grads), {"loss": loss}).'
                )
            new_state, metrics = out
            found = scaler.found_nonfinite()
            new_slot = _update(slot, found, cfg)
            device = state.device
            metrics = {
                **metrics,
                "loss_scale": torch.tensor(scale, dtype=torch.float32, device=device),
                "skipped_steps": torch.tensor(new_slot["skipped_steps"], device=device),
            }
            return new_state.replace(slots={**new_state.slots, NAME: new_slot}), metrics

        return gauges("loss_scale", "skipped_steps")(mark(fp16, inner, NAME))  # their epoch value is the last

    return two_forms(step, NAME, make)


def _validate_fp16(loss_scale: Any, policy: dict[str, Any]) -> dict[str, Any]:
    if loss_scale == "dynamic":
        cfg = {"dynamic": True, "init_scale": 2.0**16, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, **policy}
        s, g, b, n = cfg["init_scale"], cfg["growth_factor"], cfg["backoff_factor"], cfg["growth_interval"]
        if not _number(s) or not 0 < s <= _F32_MAX:
            raise ValueError(f"mixed_precision: init_scale must be a finite number > 0 (float32), got {s!r}; GradScaler uses 2**16.")
        if not _number(g) or not 1 < g < math.inf:
            raise ValueError(f"mixed_precision: growth_factor must be a finite number > 1, got {g!r}; GradScaler uses 2.0.")
        if not _number(b) or not 0 < b < 1:
            raise ValueError(f"mixed_precision: backoff_factor must be a number in (0, 1), got {b!r}; GradScaler uses 0.5.")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"mixed_precision: growth_interval must be an int >= 1, got {n!r}; GradScaler uses 2000.")
        cfg["init_scale"] = _f32(float(s))
        return cfg
    if policy:
        raise ValueError(
            f"mixed_precision: {', '.join(sorted(policy))} set the dynamic loss-scaling policy, but loss_scale={loss_scale!r}. "
            'Use loss_scale="dynamic" (the default) with them, or drop them.'
        )
    if loss_scale is None:
        return {"dynamic": False, "init_scale": 1.0}
    if _number(loss_scale) and 0 < loss_scale <= _F32_MAX:
        return {"dynamic": False, "init_scale": _f32(float(loss_scale))}
    raise ValueError(
        f'mixed_precision: loss_scale must be "dynamic", a finite number > 0 or None, got {loss_scale!r}. '
        'Use "dynamic" unless you know a scale that never overflows.'
    )


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _update(slot: dict[str, Any], found_nonfinite: bool, cfg: dict[str, Any]) -> dict[str, Any]:
    """GradScaler's ``_amp_update_scale_``: the next scale and growth count after one step."""
    scale, tracker = float(slot["scale"]), int(slot["growth_tracker"])
    skipped = int(slot["skipped_steps"]) + bool(found_nonfinite)
    if cfg["dynamic"]:
        if found_nonfinite:
            scale, tracker = _f32(scale * cfg["backoff_factor"]), 0
        elif tracker + 1 == cfg["growth_interval"]:
            grown = _f32(scale * cfg["growth_factor"])
            scale, tracker = (grown if math.isfinite(grown) else scale), 0
        else:
            tracker += 1
    return {"scale": scale, "growth_tracker": tracker, "skipped_steps": skipped}


def _device_type(state: Any) -> str:
    if not isinstance(state, TrainState):
        raise TypeError(f"mixed_precision: the state must be a TrainState, got {type(state).__name__}.")
    return state.device.type


def _check_state(state: Any) -> None:
    if not isinstance(state, TrainState):
        raise TypeError(f"mixed_precision: the state must be a TrainState, got {type(state).__name__}.")
    slot = state.slots.get(NAME)
    if slot is not None and not (isinstance(slot, dict) and {"scale", "growth_tracker", "skipped_steps"} <= set(slot)):
        raise ValueError(
            f"mixed_precision: state.slots[{NAME!r}] is not a loss-scaling state (got {slot!r}); "
            "another transform wrote this slot, or the state comes from elsewhere."
        )
