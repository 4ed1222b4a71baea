"""Schedules: functions ``count -> lr`` of the number of updates applied, each equal to its ``torch.optim.lr_scheduler`` twin.

``count`` counts optimizer updates: for a torch scheduler stepped once per epoch,
give step sizes and milestones in updates (``epochs * steps_per_epoch``).
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Mapping, Sequence

from ._base import check_int, check_number

Schedule = Callable[[int], float]


def constant_schedule(value: float) -> Schedule:
    """``lambda count: value``.

    >>> constant_schedule(0.1)(1000)
    0.1
    """
    value = check_number("constant_schedule", "value", value, low=0.0, example=1e-3)
    return lambda count: value


def linear_schedule(init_value: float, end_value: float, transition_steps: int) -> Schedule:
    """Linear from ``init_value`` to ``end_value`` over ``transition_steps``, then flat.

    >>> s = linear_schedule(0.0, 1.0, 4)
    >>> [s(i) for i in (0, 2, 4, 10)]
    [0.0, 0.5, 1.0, 1.0]
    """
    init_value = check_number("linear_schedule", "init_value", init_value, example=0.0)
    end_value = check_number("linear_schedule", "end_value", end_value, example=1e-3)
    transition_steps = check_int("linear_schedule", "transition_steps", transition_steps, low=1, example=1000)
    return lambda count: init_value + (end_value - init_value) * min(count, transition_steps) / transition_steps


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` over ``decay_steps``.

    >>> s = cosine_decay_schedule(1.0, 10)
    >>> s(0), round(s(5), 6), s(10)
    (1.0, 0.5, 0.0)
    """
    init_value = check_number("cosine_decay_schedule", "init_value", init_value, low=0.0, example=1e-3)
    decay_steps = check_int("cosine_decay_schedule", "decay_steps", decay_steps, low=1, example=1000)
    alpha = check_number("cosine_decay_schedule", "alpha", alpha, low=0.0, example=0.0)

    def schedule(count: int) -> float:
        frac = min(count, decay_steps) / decay_steps
        return init_value * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * frac)) + alpha)

    return schedule


def warmup_cosine_decay_schedule(
    init_value: float, peak_value: float, warmup_steps: int, decay_steps: int, end_value: float = 0.0
) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value``, then cosine decay to ``end_value``.

    ``decay_steps`` counts the whole schedule, warm-up included (as Optax).

    >>> s = warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=6)
    >>> [round(s(i), 3) for i in range(7)]
    [0.0, 0.5, 1.0, 0.854, 0.5, 0.146, 0.0]
    """
    who = "warmup_cosine_decay_schedule"
    for name, v in (("init_value", init_value), ("peak_value", peak_value), ("end_value", end_value)):
        check_number(who, name, v, low=0.0, example=1e-3)
    check_int(who, "warmup_steps", warmup_steps, low=0, example=100)
    check_int(who, "decay_steps", decay_steps, low=1, example=1000)
    if not warmup_steps < decay_steps:
        raise ValueError(
            f"warmup_cosine_decay_schedule: need 0 <= warmup_steps < decay_steps, got {warmup_steps}, {decay_steps}."
        )
    warm = linear_schedule(init_value, peak_value, warmup_steps) if warmup_steps else None
    cos = cosine_decay_schedule(peak_value - end_value, decay_steps - warmup_steps)

    def schedule(count: int) -> float:
        if warm is not None and count < warmup_steps:
            return warm(count)
        return end_value + cos(count - warmup_steps)

    return schedule


def one_cycle_schedule(
    max_lr: float, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4
) -> Schedule:
    """The one-cycle policy, numerically as ``torch.optim.lr_scheduler.OneCycleLR`` (cosine, two phases).

    >>> s = one_cycle_schedule(1.0, 100)
    >>> s(0), s(29), round(s(99), 6)
    (0.04, 1.0, 4e-06)
    """
    max_lr = check_number("one_cycle_schedule", "max_lr", max_lr, low=0.0, example=1e-2)
    total_steps = check_int("one_cycle_schedule", "total_steps", total_steps, low=2, example=1000)
    div_factor = check_number("one_cycle_schedule", "div_factor", div_factor, low=0.0, low_open=True, example=25.0)
    final_div_factor = check_number("one_cycle_schedule", "final_div_factor", final_div_factor, low=0.0, low_open=True, example=1e4)
    check_number("one_cycle_schedule", "pct_start", pct_start, low=0.0, high=1.0, high_open=True, example=0.3)
    initial = max_lr / div_factor
    final = initial / final_div_factor
    up_end = float(pct_start * total_steps) - 1
    down_end = float(total_steps - 1)

    def cos_anneal(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    def schedule(count: int) -> float:
        if count <= up_end:
            return cos_anneal(initial, max_lr, count / up_end if up_end > 0 else 1.0)
        return cos_anneal(max_lr, final, min((count - up_end) / (down_end - up_end), 1.0))

    return schedule


def step_schedule(init_value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``init_value * gamma ** (count // step_size)``: ``torch.optim.lr_scheduler.StepLR``.

    >>> s = step_schedule(1.0, 2, gamma=0.5)
    >>> [s(i) for i in range(5)]
    [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    init_value = check_number("step_schedule", "init_value", init_value, low=0.0, example=0.1)
    step_size = check_int("step_schedule", "step_size", step_size, low=1, example=30)
    gamma = check_number("step_schedule", "gamma", gamma, low=0.0, example=0.1)
    return lambda count: init_value * gamma ** (count // step_size)


def multistep_schedule(init_value: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """``init_value * gamma ** (milestones passed)``: ``torch.optim.lr_scheduler.MultiStepLR``.

    >>> s = multistep_schedule(1.0, [2, 4], gamma=0.5)
    >>> [s(i) for i in range(6)]
    [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    """
    init_value = check_number("multistep_schedule", "init_value", init_value, low=0.0, example=0.1)
    gamma = check_number("multistep_schedule", "gamma", gamma, low=0.0, example=0.1)
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
        raise ValueError(f"multistep_schedule: milestones must be a list of ints, got {milestones!r}. Pass e.g. milestones=[30, 80].")
    ms = sorted(check_int("multistep_schedule", "milestones[i]", m, low=0, example=30) for m in milestones)
    return lambda count: init_value * gamma ** bisect.bisect_right(ms, count)


def exponential_schedule(init_value: float, gamma: float) -> Schedule:
    """``init_value * gamma ** count``: ``torch.optim.lr_scheduler.ExponentialLR``.

    >>> s = exponential_schedule(1.0, 0.5)
    >>> [s(i) for i in range(4)]
    [1.0, 0.5, 0.25, 0.125]
    """
    init_value = check_number("exponential_schedule", "init_value", init_value, low=0.0, example=0.1)
    gamma = check_number("exponential_schedule", "gamma", gamma, low=0.0, example=0.99)
    return lambda count: init_value * gamma**count


def piecewise_constant_schedule(init_value: float, boundaries_and_scales: Mapping[int, float] | None = None) -> Schedule:
    """Optax's: from each boundary on, the LR is multiplied by its scale (cumulatively).

    ``torch.optim.lr_scheduler.ConstantLR(factor, total_iters)`` is
    ``piecewise_constant_schedule(lr * factor, {total_iters: 1 / factor})``, and
    ``MultiStepLR`` one scale per milestone.

    >>> s = piecewise_constant_schedule(1.0, {2: 0.5, 3: 0.1})
    >>> [round(s(i), 6) for i in range(5)]
    [1.0, 1.0, 0.5, 0.05, 0.05]
    """
    init_value = check_number("piecewise_constant_schedule", "init_value", init_value, low=0.0, example=0.1)
    items = dict(boundaries_and_scales or {})
    for b, sc in items.items():
        check_int("piecewise_constant_schedule", "boundary", b, low=0, example=100)
        check_number("piecewise_constant_schedule", "scale", sc, low=0.0, example=0.1)
    bounds = sorted(items)
    values = [init_value]
    for b in bounds:
        values.append(values[-1] * items[b])
    return lambda count: values[bisect.bisect_right(bounds, count)]


def polynomial_schedule(init_value: float, end_value: float, power: float, transition_steps: int) -> Schedule:
    """``(init - end) * (1 - min(count, T) / T) ** power + end``: ``torch.optim.lr_scheduler.PolynomialLR`` when ``end_value=0``.

    >>> s = polynomial_schedule(1.0, 0.0, 2.0, 4)
    >>> [s(i) for i in (0, 2, 4, 9)]
    [1.0, 0.25, 0.0, 0.0]
    """
    init_value = check_number("polynomial_schedule", "init_value", init_value, low=0.0, example=0.1)
    end_value = check_number("polynomial_schedule", "end_value", end_value, low=0.0, example=0.0)
    power = check_number("polynomial_schedule", "power", power, low=0.0, example=1.0)
    steps = check_int("polynomial_schedule", "transition_steps", transition_steps, low=1, example=1000)
    return lambda count: (init_value - end_value) * (1 - min(count, steps) / steps) ** power + end_value
