"""Functional optimizers and schedules, after Optax.

An optimizer is a :class:`GradientTransformation`, a pair of pure-looking functions:

* ``init(params) -> opt_state``
* ``update(grads, opt_state, params) -> (updates, opt_state)``

``params``, ``grads`` and ``updates`` are lists of tensors in the order of
``state.params``; the new params are ``p + u``. ``opt_state`` holds only tensors,
numbers and plain containers, so it checkpoints with ``weights_only=True``.

Speed: ``update`` updates the tensors of ``opt_state`` **in place** with torch's
foreach kernels and returns new containers around them. :meth:`TrainState.apply_gradients`
clones the state first unless the caller donates it, so the pure and the donated
paths run the very same kernels and agree bit for bit.

The learning rate lives in the optimizer state (``opt_state["lr"]`` of the stage
that has one): it is the LR the *next* update will use. A schedule writes
``schedule(count)`` there after each update; :func:`set_lr` overrides it (the LR
range test does this), and :func:`get_lr` reads it.

>>> import torch, trainkit.optim as optim
>>> tx = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1))
>>> params = [torch.tensor([1.0, 2.0])]
>>> s = tx.init(params)
>>> updates, s = tx.update([torch.tensor([3.0, 4.0])], s, params)
>>> [round(u, 3) for u in updates[0].tolist()], optim.get_lr(s)
([-0.06, -0.08], 0.1)
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, NamedTuple, Union

import torch
from torch import Tensor

__all__ = [
    "GradientTransformation",
    "apply_updates",
    "Schedule",
    "sgd",
    "adam",
    "adamw",
    "chain",
    "clip_by_global_norm",
    "constant_schedule",
    "linear_schedule",
    "cosine_decay_schedule",
    "warmup_cosine_decay_schedule",
    "one_cycle_schedule",
    "get_lr",
    "set_lr",
    "clone_state",
    "init",
    "apply_gradients",
    "skip_update",
    "map_lr",
]

Schedule = Callable[[int], float]
ScalarOrSchedule = Union[float, Schedule]


class GradientTransformation(NamedTuple):
    """An ``(init, update)`` pair, and optionally a fused ``apply``; see the module docstring.

    ``apply(grads, opt_state, params) -> opt_state`` writes the new params into
    ``params`` in place (e.g. Adam's ``addcdiv_``, as ``torch.optim`` does), saving the
    passes over memory that materialising ``updates`` costs. When it is ``None``,
    :func:`apply_updates` adds the updates instead.
    """

    init: Callable[[list[Tensor]], Any]
    update: Callable[[list[Tensor], Any, list[Tensor]], tuple[list[Tensor], Any]]
    apply: Callable[[list[Tensor], Any, list[Tensor]], Any] | None = None


def apply_updates(tx: GradientTransformation, grads: list[Tensor], opt_state: Any, params: list[Tensor]) -> Any:
    """Update ``params`` in place with ``tx`` and return the new optimizer state.

    The optimizer state's tensors are updated in place too: clone first to keep the
    old ones (:meth:`TrainState.apply_gradients` does unless the state is donated).

    >>> import torch, trainkit.optim as optim
    >>> p = [torch.tensor([1.0])]
    >>> tx = optim.sgd(0.5)
    >>> s = optim.apply_updates(tx, [torch.tensor([2.0])], tx.init(p), p)
    >>> p[0].item(), s["count"]
    (0.0, 1)
    """
    # Under trainkit.jit the LR is a 0-d tensor (a graph input, so a new LR needs no
    # recompile), which ``update`` takes and the fused ``apply`` (Python-scalar
    # arguments) does not; inductor fuses the update into one pass anyway.
    if tx.apply is not None and not torch.compiler.is_compiling():
        return tx.apply(grads, opt_state, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    torch._foreach_add_(params, updates)
    return opt_state


def _check_hparam(name: str, value: float, low: float, high: float = math.inf, *, closed_high: bool = False) -> None:
    ok = low <= value < high or (closed_high and value == high)
    if not isinstance(value, (int, float)) or not ok:
        hi = f"{high}]" if closed_high else f"{high})"
        raise ValueError(f"{name} must be a number in [{low}, {hi}, got {value!r}.")


def _lr_fns(lr: ScalarOrSchedule, who: str) -> Schedule:
    if callable(lr):
        return lr
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0:
        raise ValueError(f"{who}: lr must be a non-negative float or a schedule (step -> lr), got {lr!r}.")
    value = float(lr)
    return lambda count: value


def _advance(state: dict, schedule: Schedule) -> dict:
    count = state["count"] + 1
    return {**state, "count": count, "lr": float(schedule(count))}


# --------------------------------------------------------------------------- optimizers


def sgd(
    lr: ScalarOrSchedule,
    momentum: float = 0.0,
    *,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """Stochastic gradient descent, numerically as ``torch.optim.SGD``.

    >>> import torch, trainkit.optim as optim
    >>> tx = optim.sgd(0.5, momentum=0.9)
    >>> p = [torch.tensor([1.0])]
    >>> u, s = tx.update([torch.tensor([2.0])], tx.init(p), p)
    >>> u[0].item()
    -1.0
    """
    schedule = _lr_fns(lr, "sgd")
    _check_hparam("sgd: momentum", momentum, 0.0)
    _check_hparam("sgd: weight_decay", weight_decay, 0.0)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("sgd: nesterov=True needs momentum > 0 and dampening == 0.")

    def init(params: list[Tensor]) -> dict:
        state: dict[str, Any] = {"count": 0, "lr": float(schedule(0))}
        if momentum:
            state["momentum"] = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        return state

    def direction(grads: list[Tensor], state: dict, params: list[Tensor]) -> list[Tensor]:
        d = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else grads
        if momentum:
            bufs = state["momentum"]
            if state["count"] == 0:  # torch initialises the buffer with the first gradient
                torch._foreach_copy_(bufs, d)
            else:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, d, alpha=1 - dampening)
            d = torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
        return d

    def update(grads: list[Tensor], state: dict, params: list[Tensor]) -> tuple[list[Tensor], dict]:
        return torch._foreach_mul(direction(grads, state, params), -state["lr"]), _advance(state, schedule)

    def apply(grads: list[Tensor], state: dict, params: list[Tensor]) -> dict:
        torch._foreach_add_(params, direction(grads, state, params), alpha=-state["lr"])
        return _advance(state, schedule)

    return GradientTransformation(init, update, apply)


def _adam(lr: ScalarOrSchedule, b1: float, b2: float, eps: float, weight_decay: float, decoupled: bool, who: str):
    schedule = _lr_fns(lr, who)
    _check_hparam(f"{who}: b1", b1, 0.0, 1.0)
    _check_hparam(f"{who}: b2", b2, 0.0, 1.0)
    _check_hparam(f"{who}: eps", eps, 0.0)
    _check_hparam(f"{who}: weight_decay", weight_decay, 0.0)

    def init(params: list[Tensor]) -> dict:
        return {
            "count": 0,
            "lr": float(schedule(0)),
            "mu": [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params],
            "nu": [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params],
        }

    local = threading.local()

    def _workspace(like: list[Tensor]) -> list[Tensor]:
        # Memory for the denominator, reused across steps (per thread): it is overwritten
        # every step, so it is no state. Allocating ~params-sized temporaries each step made
        # glibc return them to the OS and page-fault them back in: 0.87x of torch.optim on a
        # 784-512-512-10 MLP with 2 threads.
        if torch.compiler.is_compiling():
            return [torch.empty_like(t) for t in like]
        ws = getattr(local, "ws", None)
        if ws is None or len(ws) != len(like) or any(
            a.shape != b.shape or a.dtype != b.dtype or a.device != b.device for a, b in zip(ws, like)
        ):
            ws = local.ws = [torch.empty_like(t) for t in like]
        return ws

    def moments(grads: list[Tensor], state: dict, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor], float]:
        # Updates the moments in place; returns (mu, denom, step_size) as torch.optim.Adam computes them.
        lr, t = state["lr"], state["count"] + 1
        mu, nu = state["mu"], state["nu"]
        if weight_decay and not decoupled:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_lerp_(mu, grads, 1 - b1)
        torch._foreach_mul_(nu, b2)
        torch._foreach_addcmul_(nu, grads, grads, 1 - b2)
        denom = _workspace(nu)
        torch._foreach_copy_(denom, nu)
        torch._foreach_sqrt_(denom)
        torch._foreach_div_(denom, math.sqrt(1 - b2**t))
        torch._foreach_add_(denom, eps)
        return mu, denom, lr / (1 - b1**t)

    def update(grads: list[Tensor], state: dict, params: list[Tensor]) -> tuple[list[Tensor], dict]:
        mu, denom, step_size = moments(grads, state, params)
        updates = torch._foreach_div(mu, denom)
        torch._foreach_mul_(updates, -step_size)
        if weight_decay and decoupled:
            decay = -state["lr"] * weight_decay
            if isinstance(decay, Tensor):  # the LR is a tensor under trainkit.jit: no alpha=
                torch._foreach_add_(updates, torch._foreach_mul(params, decay))
            else:
                torch._foreach_add_(updates, params, alpha=decay)
        return updates, _advance(state, schedule)

    def apply(grads: list[Tensor], state: dict, params: list[Tensor]) -> dict:
        mu, denom, step_size = moments(grads, state, params)
        if weight_decay and decoupled:
            torch._foreach_mul_(params, 1 - state["lr"] * weight_decay)
        torch._foreach_addcdiv_(params, mu, denom, value=-step_size)
        return _advance(state, schedule)

    return GradientTransformation(init, update, apply)


def adam(
    lr: ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, weight_decay: float = 0.0
) -> GradientTransformation:
    """Adam, numerically as ``torch.optim.Adam`` (L2 weight decay added to the gradient).

    >>> import torch, trainkit.optim as optim
    >>> tx = optim.adam(0.1)
    >>> p = [torch.tensor([1.0])]
    >>> u, s = tx.update([torch.tensor([5.0])], tx.init(p), p)
    >>> round(u[0].item(), 6), s["count"]
    (-0.1, 1)
    """
    return _adam(lr, b1, b2, eps, weight_decay, decoupled=False, who="adam")


def adamw(
    lr: ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, weight_decay: float = 1e-2
) -> GradientTransformation:
    """AdamW (decoupled weight decay), numerically as ``torch.optim.AdamW``.

    >>> import torch, trainkit.optim as optim
    >>> tx = optim.adamw(0.1, weight_decay=0.5)
    >>> p = [torch.tensor([1.0])]
    >>> u, _ = tx.update([torch.tensor([5.0])], tx.init(p), p)
    >>> round(u[0].item(), 6)  # -lr - lr * wd * p
    -0.15
    """
    return _adam(lr, b1, b2, eps, weight_decay, decoupled=True, who="adamw")


# --------------------------------------------------------------------------- composition


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale the gradients so that their global L2 norm is at most ``max_norm``.

    Numerically as ``torch.nn.utils.clip_grad_norm_`` (coefficient
    ``max_norm / (norm + 1e-6)`` clamped to 1). No host sync.

    >>> import torch, trainkit.optim as optim
    >>> tx = optim.clip_by_global_norm(1.0)
    >>> u, _ = tx.update([torch.tensor([3.0, 4.0])], tx.init([]), [])
    >>> [round(v, 4) for v in u[0].tolist()]
    [0.6, 0.8]
    """
    _check_hparam("clip_by_global_norm: max_norm", max_norm, 0.0)
    if max_norm <= 0:
        raise ValueError(f"clip_by_global_norm: max_norm must be > 0, got {max_norm!r}.")

    def init(params: list[Tensor]) -> dict:
        return {}

    def update(grads: list[Tensor], state: dict, params: list[Tensor]) -> tuple[list[Tensor], dict]:
        if not grads:
            return grads, state
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return torch._foreach_mul(grads, coef.to(grads[0].dtype)), state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transformations in sequence, each to the updates of the previous one.

    >>> import torch, trainkit.optim as optim
    >>> tx = optim.chain(optim.clip_by_global_norm(0.5), optim.sgd(1.0))
    >>> u, _ = tx.update([torch.tensor([3.0, 4.0])], tx.init([torch.zeros(2)]), [torch.zeros(2)])
    >>> [round(v, 4) for v in u[0].tolist()]
    [-0.3, -0.4]
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(
                f"chain: argument {i} is {type(t).__name__}, expected a GradientTransformation "
                "such as trainkit.optim.adam(1e-3)."
            )

    def init(params: list[Tensor]) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(grads: list[Tensor], state: tuple, params: list[Tensor]) -> tuple[list[Tensor], tuple]:
        new_states = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, params)
            new_states.append(s)
        return grads, tuple(new_states)

    def apply(grads: list[Tensor], state: tuple, params: list[Tensor]) -> tuple:
        new_states = []
        for t, s in zip(transforms[:-1], state[:-1]):
            grads, s = t.update(grads, s, params)
            new_states.append(s)
        new_states.append(apply_updates(transforms[-1], grads, state[-1], params))
        return tuple(new_states)

    return GradientTransformation(init, update, apply if transforms else None)


# --------------------------------------------------------------------------- the LR in the state


def _lr_paths(opt_state: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(opt_state, dict) and "lr" in opt_state and "count" in opt_state:
        return [path]
    if isinstance(opt_state, (tuple, list)):
        return [p for i, s in enumerate(opt_state) for p in _lr_paths(s, path + (i,))]
    return []


def get_lr(opt_state: Any) -> float:
    """The learning rate the next update will use (the first stage that has one).

    >>> import trainkit.optim as optim
    >>> optim.get_lr(optim.adam(3e-4).init([]))
    0.0003
    """
    paths = _lr_paths(opt_state)
    if not paths:
        raise ValueError("get_lr: this optimizer state has no learning rate (no sgd/adam/adamw stage).")
    s = opt_state
    for i in paths[0]:
        s = s[i]
    return s["lr"]


def set_lr(opt_state: Any, lr: float) -> Any:
    """Return a new optimizer state whose next update uses ``lr`` (every stage that has an LR).

    A schedule takes over again after that update.

    >>> import trainkit.optim as optim
    >>> optim.get_lr(optim.set_lr(optim.sgd(0.1).init([]), 0.5))
    0.5
    """
    if not _lr_paths(opt_state):
        raise ValueError("set_lr: this optimizer state has no learning rate (no sgd/adam/adamw stage).")

    def rec(s: Any) -> Any:
        if isinstance(s, dict) and "lr" in s and "count" in s:
            return {**s, "lr": float(lr)}
        if isinstance(s, tuple):
            return tuple(rec(x) for x in s)
        if isinstance(s, list):
            return [rec(x) for x in s]
        return s

    return rec(opt_state)


def clone_state(opt_state: Any) -> Any:
    """A deep copy of an optimizer state: new tensors, same values."""
    if isinstance(opt_state, Tensor):
        return opt_state.clone()
    if isinstance(opt_state, dict):
        return {k: clone_state(v) for k, v in opt_state.items()}
    if isinstance(opt_state, (list, tuple)):
        return type(opt_state)(clone_state(v) for v in opt_state)
    return opt_state


# --------------------------------------------------------------------------- what TrainState and jit call
# TrainState and trainkit.jit reach the optimizer only through these four functions,
# so the layout of an optimizer state is this module's business alone.


def init(tx: GradientTransformation, params: dict[str, Tensor]) -> Any:
    """The initial optimizer state of ``tx`` for ``params`` (a dict keyed by parameter name).

    >>> import torch, trainkit.optim as optim
    >>> optim.init(optim.sgd(0.1), {"w": torch.zeros(2)})["count"]
    0
    """
    return tx.init(list(params.values()))


def apply_gradients(
    tx: GradientTransformation, grads: dict[str, Tensor], opt_state: Any, params: dict[str, Tensor], *, donate: bool
) -> tuple[dict[str, Tensor], Any]:
    """One update: ``(new_params, new_opt_state)``. ``grads`` and ``params`` are dicts with the same keys.

    ``donate=False`` is pure: new tensors, ``params`` and ``opt_state`` untouched.
    ``donate=True`` updates them in place with the same kernels, so the two agree bit for bit.

    >>> import torch, trainkit.optim as optim
    >>> tx, p = optim.sgd(0.5), {"w": torch.tensor([1.0])}
    >>> new, s = optim.apply_gradients(tx, {"w": torch.tensor([2.0])}, optim.init(tx, p), p, donate=False)
    >>> new["w"].item(), p["w"].item(), s["count"]
    (0.0, 1.0, 1)
    """
    names = list(params)
    g = [grads[n] for n in names]
    if donate:
        p = list(params.values())
        return params, apply_updates(tx, g, opt_state, p)
    fresh = [t.detach().clone() for t in params.values()]
    opt_state = apply_updates(tx, g, clone_state(opt_state), fresh)
    return dict(zip(names, fresh)), opt_state


def skip_update(tx: GradientTransformation, opt_state: Any) -> Any:
    """The optimizer state after an update that a transform vetoed (non-finite fp16 gradients).

    The params do not change and schedules do not advance.

    >>> import trainkit.optim as optim
    >>> s = optim.sgd(0.1).init([])
    >>> optim.skip_update(optim.sgd(0.1), s) == s
    True
    """
    return opt_state


def map_lr(opt_state: Any, fn: Callable[[Any], Any]) -> Any:
    """``opt_state`` with every learning rate ``lr`` in it replaced by ``fn(lr)``; unchanged (the same object) if none.

    trainkit.jit turns the LR into a 0-d tensor with it (a graph input, so a schedule never recompiles).

    >>> import trainkit.optim as optim
    >>> optim.get_lr(optim.map_lr(optim.adam(1e-3).init([]), lambda lr: 2 * lr))
    0.002
    """
    if isinstance(opt_state, dict):
        if "lr" in opt_state and "count" in opt_state:
            new = fn(opt_state["lr"])
            return opt_state if new is opt_state["lr"] else {**opt_state, "lr": new}
        return opt_state
    if isinstance(opt_state, (tuple, list)):
        new = [map_lr(s, fn) for s in opt_state]
        return type(opt_state)(new) if any(a is not b for a, b in zip(new, opt_state)) else opt_state
    return opt_state


# --------------------------------------------------------------------------- schedules


def constant_schedule(value: float) -> Schedule:
    """``lambda count: value``.

    >>> constant_schedule(0.1)(1000)
    0.1
    """
    return lambda count: value


def linear_schedule(init_value: float, end_value: float, transition_steps: int) -> Schedule:
    """Linear from ``init_value`` to ``end_value`` over ``transition_steps``, then flat.

    >>> s = linear_schedule(0.0, 1.0, 4)
    >>> [s(i) for i in (0, 2, 4, 10)]
    [0.0, 0.5, 1.0, 1.0]
    """
    if transition_steps <= 0:
        raise ValueError(f"linear_schedule: transition_steps must be > 0, got {transition_steps}.")
    return lambda count: init_value + (end_value - init_value) * min(count, transition_steps) / transition_steps


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` over ``decay_steps``.

    >>> s = cosine_decay_schedule(1.0, 10)
    >>> s(0), round(s(5), 6), s(10)
    (1.0, 0.5, 0.0)
    """
    if decay_steps <= 0:
        raise ValueError(f"cosine_decay_schedule: decay_steps must be > 0, got {decay_steps}.")

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
    if not 0 <= warmup_steps < decay_steps:
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
    if total_steps <= 1:
        raise ValueError(f"one_cycle_schedule: total_steps must be > 1, got {total_steps}.")
    _check_hparam("one_cycle_schedule: pct_start", pct_start, 0.0, 1.0)
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
