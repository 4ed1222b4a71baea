"""Leslie Smith's LR range test: ``lr_range_test`` (a transform) and ``find_lr`` (a driver).

The transform sets the LR of each step from a sweep and records ``(lr, loss)``
in ``state.slots["lr_range_test"]``; ``find_lr`` runs it on a copy of the state
and returns an :class:`LRRangeResult` with the curve, the suggestions and a plot.
The caller's state is never touched, so there is nothing to save and restore
(Lightning's finder restores from a temporary file, and forgets the weights it
trained: #6675).

Choices (where the peers differ): the sweep is ``min_lr * (max_lr / min_lr) **
(i / (num_steps - 1))``, both ends included, and the LR recorded is the LR the
step used; the loss is smoothed by an EMA with ``beta = smoothing`` divided by
``1 - beta ** (i + 1)``; the sweep stops when the smoothed loss exceeds
``diverge_threshold`` times its best (or the loss is not finite).

The suggestion (``find_lr(..., suggest=...)``; ``result.suggestions`` holds all
three, ``result.message`` says which rule chose and where). Every rule looks at
the finite points left after dropping ``skip_start`` at the start and ``skip_end``
at the end, against ``log(lr)``:

- ``"valley"`` (**the default**, :func:`suggest_valley`): the middle, in log-LR, of
  the lower half of the loss's descent into its valley: between the point where the
  descent is half done and the lowest point, on a centred running median of the
  recorded losses. Both landmarks are levels, not slopes, so mini-batch noise barely
  moves them; the median has no lag, where the EMA trails by ~50 steps (half a
  default sweep). On a linear regression it lands at 0.13-0.44 x the stable limit 2/L.
- ``"steepest"`` (:func:`suggest_lr`): where the smoothed loss falls fastest, as
  Lightning (and fastai's ``steep``). With mini-batch noise the steepest slope is the
  EMA's early noise, so it lands on the plateau, often on the first point after the
  skipped ones; kept for clean curves and for comparison.
- ``"minimum"``: the LR of the lowest smoothed loss, divided by 10 (fastai's).

``benchmarks/lr_finder.py`` trains at each rule's suggestion, at a grid of LRs and at
Lightning's on four tasks; figures in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Union

import torch
from torch import Tensor

from .. import dist, optim
from ..functional import donating
from ..state import TrainState
from ._base import mark, two_forms
from .table import check_order

__all__ = ["lr_range_test", "find_lr", "LRRangeResult", "suggest_lr", "suggest_valley", "suggest_lrs", "centered_median", "RULES"]

NAME = "lr_range_test"
_MODES = {"exp": "exp", "exponential": "exp", "linear": "linear"}


def sweep_lr(i: int, min_lr: float, max_lr: float, num_steps: int, mode: str) -> float:
    """The LR of step ``i`` (0-based) of the sweep; ``i = 0`` gives ``min_lr``, ``i = num_steps - 1`` gives ``max_lr``.

    >>> [round(sweep_lr(i, 1e-3, 1.0, 4, "exp"), 6) for i in range(4)]
    [0.001, 0.01, 0.1, 1.0]
    >>> [sweep_lr(i, 0.0, 1.0, 3, "linear") for i in range(3)]
    [0.0, 0.5, 1.0]
    """
    i = min(i, num_steps - 1)
    if i == num_steps - 1:
        return float(max_lr)
    t = i / (num_steps - 1)
    if _MODES[mode] == "exp":
        return float(min_lr * (max_lr / min_lr) ** t)
    return float(min_lr + (max_lr - min_lr) * t)


def _validate(min_lr: Any, max_lr: Any, num_steps: Any, mode: Any, smoothing: Any, diverge_threshold: Any, loss_key: Any) -> dict[str, Any]:
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if mode not in _MODES:
        raise ValueError(f'lr_range_test: mode must be "exp" (LRs evenly spaced in log) or "linear", got {mode!r}.')
    low = 0.0 if _MODES[mode] == "linear" else None
    if not number(min_lr) or not (min_lr > 0 or (low == 0.0 and min_lr == 0)):
        raise ValueError(
            f"lr_range_test: min_lr must be a finite number > 0{' (or 0 with mode=linear)' if low is not None else ''}, got {min_lr!r}."
        )
    if not number(max_lr) or not max_lr > min_lr:
        raise ValueError(f"lr_range_test: max_lr must be a finite number > min_lr ({min_lr}), got {max_lr!r}.")
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 2:
        raise ValueError(f"lr_range_test: num_steps must be an int >= 2 (the sweep includes both ends), got {num_steps!r}.")
    if not number(smoothing) or not 0 <= smoothing < 1:
        raise ValueError(f"lr_range_test: smoothing must be in [0, 1) (0: no smoothing; 0.98 as fastai and Lightning), got {smoothing!r}.")
    if diverge_threshold is not None and (not number(diverge_threshold) or not diverge_threshold > 1):
        raise ValueError(f"lr_range_test: diverge_threshold must be a number > 1 or None (never stop early), got {diverge_threshold!r}.")
    if not isinstance(loss_key, str):
        raise TypeError(f'lr_range_test: loss_key must be the name of the loss metric, e.g. "loss", got {loss_key!r}.')
    return {
        "min_lr": float(min_lr),
        "max_lr": float(max_lr),
        "num_steps": num_steps,
        "mode": _MODES[mode],
        "smoothing": float(smoothing),
        "diverge_threshold": None if diverge_threshold is None else float(diverge_threshold),
        "loss_key": loss_key,
    }


def lr_range_test(
    step: Callable[..., Any] | None = None,
    *,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    num_steps: int = 100,
    mode: str = "exp",
    smoothing: float = 0.98,
    diverge_threshold: float | None = 4.0,
    loss_key: str = "loss",
) -> Any:
    """Set the LR of each call from a sweep, and record ``(lr, loss)`` in ``state.slots["lr_range_test"]``.

    Args:
      step: a batch step that updates with ``state.apply_gradients`` (each update's LR
        is set in the state with :func:`trainkit.optim.override_lr`, so any trainkit
        optimizer works: schedules, param groups (all set to the sweep's LR) and
        MultiSteps included). Omit it to get a transform for :func:`trainkit.compose`.
      min_lr, max_lr, num_steps, mode: the sweep: call ``i`` uses
        ``min_lr * (max_lr / min_lr) ** (i / (num_steps - 1))`` (``mode="exp"``) or
        the linear interpolation (``mode="linear"``); calls past the end stay at ``max_lr``.
      smoothing: the EMA factor of the smoothed loss (bias-corrected).
      diverge_threshold: stop when the smoothed loss exceeds this times its best
        (``None``: only at the end of the sweep or on a non-finite loss).
      loss_key: the metric that holds the loss.

    Returns:
      The wrapped step (or the transform). Its metrics gain ``lr`` (the LR used).
      The slot holds ``lrs``, ``losses`` and ``smoothed`` (lists of floats), and
      ``stop: True`` with a ``reason`` when the sweep is complete or diverged, so
      that ``tk.fit`` stops too. Use :func:`find_lr` to run it and read the result. A state that
      went through a sweep is the record of an experiment (and says stop): train a fresh one.

    Where it stands: around a **batch** step (an epoch step is rejected: the sweep
    sets one LR per optimizer update), on either side of ``mixed_precision``.
    Under ``torch.distributed`` every rank records rank 0's loss (one small
    broadcast per step), so every rank stops at the same step. Wrapped twice it
    is rejected (one slot).

    Host syncs: the loss is read on the host at every step (to detect divergence);
    a range test is a short run.

    >>> import torch, trainkit as tk
    >>> state = tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.sgd(0.1))
    >>> def step(state, batch):
    ...     loss_fn = lambda p: state.apply(p, batch)[0].pow(2).mean()
    ...     loss, grads = tk.value_and_grad(loss_fn)(state.params)
    ...     return state.apply_gradients(grads), {"loss": loss}
    >>> sweep = tk.lr_range_test(step, min_lr=1e-3, max_lr=1e-1, num_steps=3)
    >>> for _ in range(3):
    ...     state, metrics = sweep(state, torch.ones(4, 2))
    >>> [round(lr, 6) for lr in state.slots["lr_range_test"]["lrs"]], tk.should_stop(state)
    ([0.001, 0.01, 0.1], True)
    """
    cfg = _validate(min_lr, max_lr, num_steps, mode, smoothing, diverge_threshold, loss_key)

    def make(inner: Callable[..., Any]) -> Callable[..., Any]:
        check_order(NAME, inner)

        def wrapped(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Any]]:
            if not isinstance(state, TrainState):
                raise TypeError(f"lr_range_test: the state must be a TrainState, got {type(state).__name__}.")
            slot = state.slots.get(NAME) or _empty_slot()
            i = len(slot["lrs"])
            lr = sweep_lr(i, cfg["min_lr"], cfg["max_lr"], cfg["num_steps"], cfg["mode"])
            try:
                # For this update only (the lasting LR or schedule is the caller's): a sweep sets every step's LR.
                swept = state.replace(opt_state=optim.override_lr(state.opt_state, lr))
            except ValueError as e:
                raise ValueError(
                    f"lr_range_test: cannot set the LR of this optimizer ({e}). The sweep needs an optimizer "
                    "with a learning rate: trainkit.optim.sgd/adam/adamw, or any chain with optim.scale_by_learning_rate."
                ) from None
            out = inner(swept, batch)
            if type(out) is not tuple or len(out) != 2 or not isinstance(out[0], TrainState) or not isinstance(out[1], Mapping):
                raise TypeError(
                    f"lr_range_test: the step must return (state, metrics), got {type(out).__name__}. "
                    'Return e.g. (state.apply_gradients(grads), {"loss": loss}).'
                )
            new_state, metrics = out
            loss = _agree(_read_loss(metrics, cfg["loss_key"]))
            new_slot = _record(slot, lr, loss, cfg)
            metrics = {**metrics, "lr": torch.tensor(lr, dtype=torch.float32, device=state.device)}
            return new_state.replace(slots={**new_state.slots, NAME: new_slot}), metrics

        return mark(wrapped, inner, NAME)

    return two_forms(step, NAME, make)


def _empty_slot() -> dict[str, Any]:
    return {"lrs": [], "losses": [], "smoothed": [], "avg": 0.0, "best": None, "stop": False, "reason": None}


def _read_loss(metrics: Mapping[str, Any], key: str) -> float:
    if key not in metrics:
        raise KeyError(
            f"lr_range_test: loss_key={key!r} is not among the metrics the step returned: {sorted(metrics)}. "
            "Pass loss_key= the name of the training loss."
        )
    v = metrics[key]
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"lr_range_test: metric {key!r} must be a scalar, got shape {tuple(v.shape)}.")
        return float(v.detach())  # the host sync of this step
    return float(v)


def _agree(loss: float) -> float:
    """Under torch.distributed, every rank takes rank 0's loss, so every rank stops at the same step."""
    return float(dist.broadcast(loss))


def _record(slot: Mapping[str, Any], lr: float, loss: float, cfg: Mapping[str, Any]) -> dict[str, Any]:
    i = len(slot["lrs"])
    beta = cfg["smoothing"]
    avg = beta * float(slot["avg"]) + (1 - beta) * loss
    smoothed = avg / (1 - beta ** (i + 1))
    best = slot["best"]
    if math.isfinite(smoothed) and (best is None or smoothed < best):
        best = smoothed
    stop, reason = False, None
    threshold = cfg["diverge_threshold"]
    if not math.isfinite(loss):
        stop, reason = True, f"the loss is {loss} at lr={lr:.3g} (step {i + 1} of {cfg['num_steps']})"
    elif threshold is not None and best is not None and best > 0 and smoothed > threshold * best:
        stop = True
        reason = (
            f"diverged at lr={lr:.3g}: smoothed loss {smoothed:.4g} > {threshold:g} x best {best:.4g} (step {i + 1} of {cfg['num_steps']})"
        )
    elif i + 1 >= cfg["num_steps"]:
        stop, reason = True, f"sweep complete: {i + 1} steps from lr={cfg['min_lr']:.3g} to {cfg['max_lr']:.3g}"
    return {
        "lrs": [*slot["lrs"], lr],
        "losses": [*slot["losses"], loss],
        "smoothed": [*slot["smoothed"], smoothed],
        "avg": avg,
        "best": best,
        "stop": stop,
        "reason": reason,
    }


# --------------------------------------------------------------------------- the suggestions

RULES = ("valley", "steepest", "minimum")


def _window(
    lrs: list[float], curve: list[float], skip_start: int, skip_end: int, *, finite: bool = True
) -> tuple[list[int], str | None]:
    """The indices a rule looks at (lr > 0, ends skipped, ``curve`` finite), or ``[]`` and why there are too few."""
    n = len(lrs)
    if len(curve) != n:
        raise ValueError(f"suggest_lr: lrs and the loss curve must have one value per step, got {n} and {len(curve)}.")
    idx = [i for i in range(min(skip_start, n), max(n - skip_end, 0)) if (math.isfinite(curve[i]) or not finite) and lrs[i] > 0]
    if len(idx) < 3:
        return [], (
            f"no suggestion: {n} points recorded, {len(idx)} finite ones left after skipping {skip_start} at the start "
            f"and {skip_end} at the end; 3 are needed. Raise num_steps, or lower max_lr if the loss diverged early."
        )
    if any(lrs[b] <= lrs[a] for a, b in zip(idx[:-1], idx[1:], strict=True)):
        return [], "no suggestion: the recorded LRs are not increasing (was the sweep run twice on one state?)."
    return idx, None


def suggest_lr(
    lrs: list[float], smoothed: list[float], *, skip_start: int = 10, skip_end: int = 1
) -> tuple[float | None, float | None, str]:
    """``(steepest, min_div_10, message)`` from a recorded curve (the ``"steepest"`` and ``"minimum"`` rules).

    ``steepest``: the LR where the smoothed loss falls fastest against ``log(lr)``
    (``torch.gradient`` with the log-LRs as coordinates), over the finite points of
    ``[skip_start : len - skip_end]``; ``min_div_10``: the LR of the lowest smoothed
    loss there, divided by 10 (fastai's "minimum / 10"). ``None`` for both, and a
    message saying why, when fewer than 3 points remain. With mini-batch noise the
    steepest point is often the first one after ``skip_start`` (the first smoothed
    values average few losses): :func:`suggest_lrs`' ``"valley"`` is the robust rule.

    >>> lrs = [10 ** (-4 + i / 10) for i in range(41)]
    >>> curve = [1 / (1 + (lr / 1e-2) ** 2) + (lr / 0.5) ** 4 for lr in lrs]  # falls fastest at lr = 1e-2
    >>> steepest, min10, msg = suggest_lr(lrs, curve)
    >>> round(steepest, 4), round(min10, 4)
    (0.01, 0.0126)
    """
    idx, why = _window(lrs, smoothed, skip_start, skip_end)
    if why is not None:
        return None, None, why
    x = torch.tensor([math.log(lrs[i]) for i in idx], dtype=torch.float64)
    y = torch.tensor([smoothed[i] for i in idx], dtype=torch.float64)
    slope = torch.gradient(y, spacing=(x,))[0]
    steep = idx[int(torch.argmin(slope))]
    lowest = idx[int(torch.argmin(y))]
    return lrs[steep], lrs[lowest] / 10, f"steepest descent of the smoothed loss at lr={lrs[steep]:.3g}"


def centered_median(losses: list[float], half_width: int) -> list[float]:
    """The running median of ``losses`` over ``2 * half_width + 1`` points centred on each (non-finite ones left out).

    Zero lag, unlike the EMA; a median, so one spiky mini-batch does not move it. ``nan``
    where the window holds no finite loss; the window shrinks at the ends.

    >>> centered_median([1.0, 9.0, 1.0, 2.0, float("nan"), 3.0], 1)
    [5.0, 1.0, 2.0, 1.5, 2.5, 3.0]
    """
    n, out = len(losses), []
    for i in range(n):
        window = sorted(v for v in losses[max(0, i - half_width) : i + half_width + 1] if math.isfinite(v))
        k = len(window)
        out.append(math.nan if k == 0 else (window[k // 2] if k % 2 else (window[k // 2 - 1] + window[k // 2]) / 2))
    return out


def suggest_valley(
    lrs: list[float], losses: list[float], *, skip_start: int = 10, skip_end: int = 1
) -> tuple[float | None, str]:
    """``(valley, message)``: the middle, in log-LR, of the lower half of the loss's descent into its valley.

    The curve is the centred running median of the recorded ``losses`` over 5% of the
    points on each side (:func:`centered_median`; at least 2): it has no lag, where
    the EMA of the sweep trails by about ``1 / (1 - smoothing)`` = 50 steps, half a
    default sweep, and would put the valley decades too far right. The valley has two
    landmarks that noise barely moves:

    - its **bottom**, the curve's lowest point (at ``lr_low``): past it the LR is too
      large to make progress (on a quadratic, 0.7-0.9 x the stable limit 2/L);
    - its **half-way point** (at ``lr_half``): the last LR before ``lr_low`` where the
      curve is still at or above ``(top + low) / 2``, ``top`` being the plateau (the
      median of the first quarter of the points before ``lr_low``). On a clean S-shaped
      descent that is the steepest point; with noise it stays put, since noise smaller
      than half the drop cannot cross that level far from it (a derivative, by
      contrast, is all noise where the curve is flat).

    The suggestion is the recorded LR nearest ``sqrt(lr_half * lr_low)``: below the
    edge by a margin (typically 2-3x), above the point of fastest descent (where a run
    at a fixed LR is still slow). fastai's ``valley`` takes the middle of the longest
    descending stretch in the same spirit; this finds the stretch without comparing
    noisy neighbours. Same window as :func:`suggest_lr`; ``None`` and a message when
    the curve does not descend.

    >>> lrs = [10 ** (-5 + i / 10) for i in range(51)]
    >>> curve = [0.2 + 1 / (1 + (lr / 1e-2) ** 2) + (lr / 0.3) ** 4 for lr in lrs]  # half-way near 1e-2, lowest near 0.07
    >>> lr, msg = suggest_valley(lrs, curve)
    >>> round(lr, 4), msg[:23]
    (0.02, 'valley: lr=0.02, midway')
    >>> msg[-44:]  # its two landmarks
    'lr=0.00794 and its lowest point at lr=0.0631'
    >>> suggest_valley(lrs, [1.0] * 51)[0] is None  # flat: no valley
    True
    """
    idx, why = _window(lrs, losses, skip_start, skip_end, finite=False)
    if why is not None:
        return None, why
    curve = centered_median(losses, max(2, len(losses) // 20))
    idx = [i for i in idx if math.isfinite(curve[i])]
    if len(idx) < 3:
        return None, f"no suggestion: {len(idx)} points with a finite loss left after skipping; 3 are needed. Raise num_steps."
    low_at = min(idx, key=lambda i: curve[i])
    before = [i for i in idx if i <= low_at]
    head = sorted(curve[i] for i in before[: max(3, len(before) // 4)])
    top = head[len(head) // 2] if len(head) % 2 else (head[len(head) // 2 - 1] + head[len(head) // 2]) / 2
    low = curve[low_at]
    if len(before) < 3 or not top > low:
        return None, (
            f"no valley: the loss does not descend before its lowest point at lr={lrs[low_at]:.3g}; "
            "lower min_lr (the sweep must start where the loss barely moves), or raise max_lr."
        )
    half_at = [i for i in before if curve[i] >= (top + low) / 2][-1]
    middle = (math.log(lrs[half_at]) + math.log(lrs[low_at])) / 2
    at = min(before, key=lambda i: abs(math.log(lrs[i]) - middle))
    return lrs[at], (
        f"valley: lr={lrs[at]:.3g}, midway in log-LR between the half-way point of the descent of the loss "
        f"(running median, {top:.4g} to {low:.4g}) at lr={lrs[half_at]:.3g} and its lowest point at lr={lrs[low_at]:.3g}"
    )


def suggest_lrs(
    lrs: list[float], losses: list[float], smoothed: list[float], *, skip_start: int = 10, skip_end: int = 1
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Every rule's suggestion and message: ``({"valley": lr, "steepest": lr, "minimum": lr}, messages)``.

    ``"valley"`` (:func:`suggest_valley` on the recorded ``losses``; the default of
    :func:`find_lr`), ``"steepest"`` and ``"minimum"`` (the lowest smoothed loss / 10;
    both :func:`suggest_lr` on the ``smoothed`` curve).

    >>> lrs = [10 ** (-5 + i / 10) for i in range(51)]
    >>> curve = [0.2 + 1 / (1 + (lr / 1e-2) ** 2) + (lr / 0.3) ** 4 for lr in lrs]
    >>> lrs_by_rule, messages = suggest_lrs(lrs, curve, curve)
    >>> {k: round(v, 4) for k, v in lrs_by_rule.items()}
    {'valley': 0.02, 'steepest': 0.01, 'minimum': 0.0079}
    """
    valley, valley_msg = suggest_valley(lrs, losses, skip_start=skip_start, skip_end=skip_end)
    steepest, min10, steep_msg = suggest_lr(lrs, smoothed, skip_start=skip_start, skip_end=skip_end)
    minimum_msg = steep_msg if min10 is None else f"minimum: lr={min10:.3g}, the lowest smoothed loss at lr={min10 * 10:.3g}, / 10"
    return {"valley": valley, "steepest": steepest, "minimum": min10}, {
        "valley": valley_msg,
        "steepest": steep_msg if steepest is None else f"steepest: lr={steepest:.3g}, the {steep_msg}",
        "minimum": minimum_msg,
    }


# --------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class LRRangeResult:
    """What :func:`find_lr` found: the curve, the suggestions, and how the sweep ended.

    Fields: ``lrs``, ``losses``, ``smoothed`` (lists of floats, one per step, the LR
    being the one that step used); ``suggestion`` (the chosen rule's LR, or ``None``);
    ``suggestion_min_div_10`` (the LR of the lowest smoothed loss / 10, or ``None``);
    ``message`` (which rule chose and where, or why there is no suggestion);
    ``stop_reason`` (sweep complete, diverged, or non-finite loss); ``diverged`` (the
    sweep ended before ``max_lr`` because the loss blew up); ``suggestions`` (every
    rule's LR: ``{"valley": ..., "steepest": ..., "minimum": ...}``, see
    :func:`suggest_lrs`); ``rule`` (the rule behind ``suggestion``).
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    suggestion_min_div_10: float | None
    message: str
    stop_reason: str
    diverged: bool
    suggestions: Mapping[str, float | None] = field(default_factory=dict)
    rule: str = "valley"

    @property
    def diverged_lr(self) -> float | None:
        """The LR at which the sweep detected divergence (``None`` when it did not)."""
        return self.lrs[-1] if self.diverged and self.lrs else None

    def __repr__(self) -> str:
        fmt = lambda v: "None" if v is None else f"{v:.3g}"
        return (
            f"LRRangeResult(suggestion={fmt(self.suggestion)} ({self.rule}), "
            f"suggestion_min_div_10={fmt(self.suggestion_min_div_10)}, steps={len(self.lrs)}, stop_reason={self.stop_reason!r})"
        )

    def plot(self, path: Union[str, os.PathLike, None] = None, ax: Any = None) -> Any:
        """Draw loss (faint) and smoothed loss against the LR on a log axis, the suggestion marked.

        Draws on ``ax`` when given (e.g. in a notebook), else on a new figure made
        without pyplot (the Agg canvas: no window, no change to the global backend).
        With ``path``, the figure is saved there (a PNG for ``.png``). Returns the axes.

        >>> import tempfile, os
        >>> lrs = [10 ** (-4 + i / 10) for i in range(41)]
        >>> curve = [1 / (1 + (lr / 1e-2) ** 2) for lr in lrs]
        >>> s, m, msg = suggest_lr(lrs, curve)
        >>> r = LRRangeResult(lrs, curve, curve, s, m, msg, "sweep complete", False, rule="steepest")
        >>> path = os.path.join(tempfile.mkdtemp(), "lr.png")
        >>> ax = r.plot(path)
        >>> open(path, "rb").read(4) == b"\\x89PNG", ax.get_xscale()
        (True, 'log')
        """
        if ax is None:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure

            fig = Figure(figsize=(6.4, 4.2))
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
        pts = [(lr, lo, sm) for lr, lo, sm in zip(self.lrs, self.losses, self.smoothed, strict=True) if lr > 0]
        if pts:
            lrs, losses, smoothed = zip(*pts, strict=True)
            ax.plot(lrs, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
            ax.plot(lrs, smoothed, color="tab:blue", linewidth=2, label="smoothed loss")
            finite = [v for v in smoothed if math.isfinite(v)]
            if finite:  # divergence makes the last points huge: keep the interesting part in view
                lo, hi = min(finite), max(finite)
                pad = 0.05 * (hi - lo or abs(hi) or 1.0)
                ax.set_ylim(lo - pad, hi + pad)
        if self.suggestion is not None:
            i = self.lrs.index(self.suggestion)
            ax.axvline(self.suggestion, color="tab:red", linestyle="--", linewidth=1)
            label = f"suggestion ({self.rule}) {self.suggestion:.3g}"
            ax.plot([self.suggestion], [self.smoothed[i]], "o", color="tab:red", markersize=8, label=label)
        if self.suggestion_min_div_10 is not None:
            ax.axvline(
                self.suggestion_min_div_10,
                color="tab:green",
                linestyle=":",
                linewidth=1,
                label=f"min / 10: {self.suggestion_min_div_10:.3g}",
            )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("loss")
        ax.set_title("LR range test")
        ax.legend(loc="best")
        if path is not None:
            ax.figure.savefig(os.fspath(path), dpi=100, bbox_inches="tight")
        return ax


def find_lr(
    step: Callable[..., Any],
    state: TrainState,
    loader: Iterable[Any],
    *,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    num_steps: int = 100,
    mode: str = "exp",
    smoothing: float = 0.98,
    diverge_threshold: float | None = 4.0,
    loss_key: str = "loss",
    skip_start: int = 10,
    skip_end: int = 1,
    suggest: str = "valley",
) -> LRRangeResult:
    """Run the LR range test of ``step`` from ``state`` over ``loader``; return the curve and a suggestion.

    Runs :func:`lr_range_test` on a copy of ``state`` (donated to the steps, so
    they update in place and fast), drawing batches from ``loader`` and starting
    it again when it runs out, until the sweep ends or diverges. The caller's
    ``state`` is not changed in any way (values and tensor versions), nothing is
    written to disk, and the global RNG is restored afterwards, so a later
    ``fit`` is unaffected. Arguments as :func:`lr_range_test` and :func:`suggest_lr`;
    ``suggest`` names the rule behind ``result.suggestion``: ``"valley"`` (the default:
    half-way down the descent of the smoothed loss, robust to mini-batch noise),
    ``"steepest"`` (Lightning's rule, on log-LR) or ``"minimum"`` (the lowest smoothed
    loss / 10). ``result.suggestions`` holds all three.

    Use the suggestion as the LR of a fresh state (or the peak of a one-cycle schedule):
    ``state = make_state(lr=result.suggestion)``.

    >>> import torch, trainkit as tk
    >>> _ = torch.manual_seed(0)
    >>> w = torch.randn(8, 1)
    >>> x = torch.randn(256, 8); data = [(x[i:i + 32], x[i:i + 32] @ w) for i in range(0, 256, 32)]
    >>> state = tk.TrainState.create(torch.nn.Linear(8, 1), tk.optim.sgd(0.1))
    >>> def step(state, batch):
    ...     x, y = batch
    ...     loss_fn = lambda p: torch.nn.functional.mse_loss(state.apply(p, x)[0], y)
    ...     loss, grads = tk.value_and_grad(loss_fn)(state.params)
    ...     return state.apply_gradients(grads), {"loss": loss}
    >>> result = tk.find_lr(step, state, data, min_lr=1e-4, max_lr=10.0, num_steps=60)
    >>> result.diverged, 1e-2 < result.suggestion < 1.0, result.rule, sorted(result.suggestions), state.step
    (True, True, 'valley', ['minimum', 'steepest', 'valley'], 0)
    """
    if not callable(step):
        raise TypeError(f"find_lr: step must be a function (state, batch) -> (state, metrics), got {type(step).__name__}.")
    if not isinstance(state, TrainState):
        raise TypeError(f"find_lr: state must be a TrainState, got {type(state).__name__}.")
    for name, v in (("skip_start", skip_start), ("skip_end", skip_end)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"find_lr: {name} must be an int >= 0, got {v!r}.")
    if suggest not in RULES:
        raise ValueError(
            f'find_lr: suggest must be one of {", ".join(map(repr, RULES))}, got {suggest!r}. '
            'Use "valley" (the default, robust to noise), "steepest" or "minimum" (lowest loss / 10).'
        )
    tested = lr_range_test(
        step,
        min_lr=min_lr,
        max_lr=max_lr,
        num_steps=num_steps,
        mode=mode,
        smoothing=smoothing,
        diverge_threshold=diverge_threshold,
        loss_key=loss_key,
    )
    # A copy we own, without a previous sweep's record; the caller's tensors are never touched.
    work = state.clone()
    work = work.replace(slots={k: v for k, v in work.slots.items() if k != NAME})
    with torch.random.fork_rng(devices=[]), donating():
        done, drawn = False, 0
        while not done:  # cycle through the loader until the sweep ends
            before = drawn
            for batch in loader:
                drawn += 1
                work, _ = tested(work, batch)
                if work.slots[NAME]["stop"]:
                    done = True
                    break
            if not done and drawn == before:
                if drawn == 0:
                    raise ValueError("find_lr: the loader yielded no batches.")
                raise ValueError(
                    f"find_lr: the loader ran out after {drawn} batches and yields nothing when iterated again "
                    f"(an iterator?), before the {num_steps} steps of the sweep. Pass a DataLoader or a list, "
                    f"or num_steps <= {drawn}."
                )
    slot = work.slots[NAME]
    lrs, losses, smoothed = list(slot["lrs"]), list(slot["losses"]), list(slot["smoothed"])
    suggestions, messages = suggest_lrs(lrs, losses, smoothed, skip_start=skip_start, skip_end=skip_end)
    others = ", ".join(f"{k} {'None' if v is None else f'{v:.3g}'}" for k, v in suggestions.items() if k != suggest)
    reason = slot["reason"] or ""
    return LRRangeResult(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        suggestion=suggestions[suggest],
        suggestion_min_div_10=suggestions["minimum"],
        message=f"{messages[suggest]} (rule {suggest!r}; other rules: {others})",
        stop_reason=reason,
        diverged=not reason.startswith("sweep complete"),
        suggestions=suggestions,
        rule=suggest,
    )
