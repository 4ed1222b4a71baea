"""What TrainState, trainkit.jit and users call: init and apply, and the accessors of the state.

TrainState and trainkit.jit reach the optimizer only through ``init``,
``apply_gradients``, ``skip_update``, ``map_lr``, ``get_lr``/``set_lr`` (and the
distributed side through ``is_accumulating``/``map_accumulated``), so the layout of
an optimizer state is this package's business alone. Every accessor finds its
stages by their ``"_stage"`` name, at any depth: inside chains, groups,
MultiSteps, or a wrapper of your own that keeps the inner state in a dict, list or tuple.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Union

import torch
from torch import Tensor

from ._base import (
    STAGE,
    GradientTransformation,
    Params,
    apply_,
    clone_state,
    donated_fn,
    find_stages,
    map_stage_kinds,
    map_stages,
    stage_kinds,
)

_LR = "scale_by_learning_rate"
_MISSING = object()


def init(tx: GradientTransformation, params: Params) -> Any:
    """The initial optimizer state of ``tx`` for ``params`` (a dict keyed by parameter name).

    >>> import torch, trainkit.optim as optim
    >>> optim.count(optim.init(optim.sgd(0.1), {"w": torch.zeros(2)}))
    0
    """
    return tx.init(params)


def apply_gradients(tx: GradientTransformation, grads: Params, opt_state: Any, params: Params, *, donate: bool) -> tuple[Params, Any]:
    """One update: ``(new_params, new_opt_state)``. ``grads`` and ``params`` are dicts with the same keys.

    ``donate=False`` is pure: new tensors, ``params`` and ``opt_state`` untouched.
    ``donate=True`` updates them in place with foreach kernels (Adam: torch's fused
    kernel); the pure path runs the same kernels on copies, so the two agree bit for bit.

    >>> import torch, trainkit.optim as optim
    >>> tx, p = optim.sgd(0.5), {"w": torch.tensor([1.0])}
    >>> new, s = optim.apply_gradients(tx, {"w": torch.tensor([2.0])}, optim.init(tx, p), p, donate=False)
    >>> new["w"].item(), p["w"].item(), optim.count(s)
    (0.0, 1.0, 1)
    """
    grads = {n: grads[n] for n in params}  # the params' order: stages zip dicts by position
    if not donate:
        params = {n: t.detach().clone() for n, t in params.items()}
        opt_state = clone_state(opt_state)
    if torch.is_grad_enabled():
        with torch.no_grad():
            return _apply(tx, grads, opt_state, params)
    return _apply(tx, grads, opt_state, params)


def _apply(tx: GradientTransformation, grads: Params, opt_state: Any, params: Params) -> tuple[Params, Any]:
    out, opt_state = donated_fn(tx)(grads, opt_state, params)
    apply_(out, params)
    return params, opt_state


def apply_updates(params: Params, updates: Params) -> Params:
    """``params + updates`` as new tensors (Optax's ``apply_updates``), for a hand-written loop over ``tx.update``.

    >>> import torch, trainkit.optim as optim
    >>> optim.apply_updates({"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])})["w"].item()
    1.5
    """
    return {n: p + updates[n] for n, p in params.items()}


def skip_update(tx: GradientTransformation, opt_state: Any) -> Any:
    """The optimizer state after an update a transform vetoed (non-finite fp16 gradients).

    Plain optimizers: unchanged (the schedules do not advance). Under
    :func:`MultiSteps` the micro-step still counts, and the accumulation is marked
    poisoned: its update is skipped at the final micro-step, and the next accumulation starts clean.

    >>> import torch, trainkit.optim as optim
    >>> s = optim.init(optim.sgd(0.1), {"w": torch.zeros(1)})
    >>> optim.skip_update(optim.sgd(0.1), s) is s
    True
    """

    def poison(st: dict) -> dict:
        i, k = st["mini_step"], st["every_k"]
        return {**st, "mini_step": 0, "poisoned": False} if i >= k - 1 else {**st, "mini_step": i + 1, "poisoned": True}

    return map_stages(opt_state, "multi_steps", poison, into_matches=False)


# --------------------------------------------------------------------------- the learning rate


def _lr_stages(opt_state: Any, who: str) -> list[dict]:
    found = find_stages(opt_state, _LR)
    if not found:
        raise ValueError(
            f"{who}: this optimizer state has no learning rate: no scale_by_learning_rate stage in it "
            f"(stages found: {stage_kinds(opt_state) or 'none of trainkit.optim'}). Use trainkit.optim.sgd/adam/adamw, "
            "or chain a stage of your own with trainkit.optim.scale_by_learning_rate(lr), which owns the LR."
        )
    return found


def get_lr(opt_state: Any) -> Any:
    """The learning rate of the next update (``state.lr``).

    With several LR stages (param groups: :func:`partition`), the first one's, in
    the order of the groups; :func:`get_lrs` gives them all.

    >>> import torch, trainkit.optim as optim
    >>> optim.get_lr(optim.adam(3e-4).init({"w": torch.zeros(1)}))
    0.0003
    """
    return _lr_stages(opt_state, "get_lr")[0]["lr"]


def get_lrs(opt_state: Any) -> list[Any]:
    """The learning rate of the next update of every LR stage (every param group), in order.

    >>> import torch, trainkit.optim as optim
    >>> optim.get_lrs(optim.sgd(0.1).init({"w": torch.zeros(1)}))
    [0.1]
    """
    return [s["lr"] for s in _lr_stages(opt_state, "get_lrs")]


def _valid_lr(who: str, lr: Any) -> float:
    if isinstance(lr, Tensor) and lr.numel() == 1:
        lr = float(lr)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{who}: lr must be a finite number >= 0, got {lr!r}. Pass e.g. lr=1e-3.")
    return float(lr)


def set_lr(opt_state: Any, lr: Union[float, Callable[[float], float]]) -> Any:
    """A new optimizer state whose LR is ``lr`` from the next update on: a lasting change, checkpointed with the state.

    ``lr`` is a number, or a function of each LR stage's current LR (a plateau rule:
    ``lambda lr: lr * 0.1``). A constant LR stays ``lr``. A schedule is scaled from
    then on, so that it gives ``lr`` now and keeps its shape: ``lr / schedule(count)``
    times the schedule (a later change multiplies again). A schedule at 0 cannot be
    scaled: set the LR after warm-up. :func:`override_lr` changes one update only.

    >>> import torch, trainkit.optim as optim
    >>> tx, p = optim.sgd(0.1), {"w": torch.zeros(1)}
    >>> s = optim.set_lr(optim.init(tx, p), 0.5)
    >>> _, s = optim.apply_gradients(tx, {"w": torch.ones(1)}, s, p, donate=False)
    >>> optim.get_lr(s)
    0.5
    """

    def change(st: dict) -> dict:
        new = _valid_lr("set_lr", lr(st["lr"]) if callable(lr) else lr)
        if "base_lr" in st:
            return {**st, "lr": new, "base_lr": new}
        base = float(st["schedule_lr"])
        if base == 0.0:
            if new == float(st["lr"]):
                return st
            raise ValueError(
                f"set_lr: the schedule is 0 at update {st['count']}, so a lasting change (a multiple of the schedule) "
                f"cannot make it {new}. Set the LR once the schedule is above 0, or use optim.override_lr for one update."
            )
        return {**st, "lr": new, "scale": new / base}

    _lr_stages(opt_state, "set_lr")
    return map_stages(opt_state, _LR, change)


def override_lr(opt_state: Any, lr: float) -> Any:
    """A new optimizer state whose *next update only* uses ``lr``; then the lasting LR (or schedule) takes over.

    The LR range test sets each step's LR this way.

    >>> import torch, trainkit.optim as optim
    >>> tx, p = optim.sgd(0.1), {"w": torch.zeros(1)}
    >>> s = optim.override_lr(optim.init(tx, p), 0.5)
    >>> new, s = optim.apply_gradients(tx, {"w": torch.ones(1)}, s, p, donate=False)
    >>> new["w"].item(), optim.get_lr(s)
    (-0.5, 0.1)
    """
    value = _valid_lr("override_lr", lr)
    _lr_stages(opt_state, "override_lr")
    return map_stages(opt_state, _LR, lambda st: {**st, "lr": value})


_FLOATS = {_LR: ("lr", "base_lr", "scale", "schedule_lr"), "add_decayed_weights": ("weight_decay",)}


def map_lr(opt_state: Any, fn: Callable[[Any], Any]) -> Any:
    """``opt_state`` with every float hyperparameter in it (LRs, their lasting scale, weight decays) replaced by ``fn(value)``.

    The same object when ``fn`` changes nothing. trainkit.jit turns them into 0-d
    tensors with it before tracing (graph inputs: a schedule or a plateau never
    recompiles) and back into floats after.

    >>> import torch, trainkit.optim as optim
    >>> optim.get_lr(optim.map_lr(optim.adam(1e-3).init({"w": torch.zeros(1)}), lambda lr: 2 * lr))
    0.002
    """

    def mapper(keys: tuple[str, ...]) -> Callable[[dict], dict]:
        def change(st: dict) -> dict:
            new = {k: fn(st[k]) for k in keys if k in st}
            return st if all(v is st[k] for k, v in new.items()) else {**st, **new}

        return change

    return map_stage_kinds(opt_state, {kind: mapper(keys) for kind, keys in _FLOATS.items()})


def count(opt_state: Any) -> int:
    """How many updates the optimizer has applied (the LR stage's count; skipped and accumulating steps excluded).

    >>> import torch, trainkit.optim as optim
    >>> optim.count(optim.adam(1e-3).init({"w": torch.zeros(1)}))
    0
    """
    return _lr_stages(opt_state, "count")[0]["count"]


def set_weight_decay(opt_state: Any, weight_decay: float) -> Any:
    """A new optimizer state whose weight decay is ``weight_decay`` from the next update on (every decay stage).

    >>> import torch, trainkit.optim as optim
    >>> s = optim.set_weight_decay(optim.adamw(1e-3).init({"w": torch.zeros(1)}), 0.1)
    >>> optim.find_state(s, "weight_decay")
    0.1
    """
    if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) or not weight_decay >= 0:
        raise ValueError(f"set_weight_decay: weight_decay must be a number >= 0, got {weight_decay!r}. Pass e.g. 1e-2.")
    if not find_stages(opt_state, "add_decayed_weights"):
        raise ValueError(
            f"set_weight_decay: this optimizer state has no add_decayed_weights stage (stages found: {stage_kinds(opt_state)}). "
            "Build it with weight_decay > 0 (adamw, or sgd/adam with weight_decay=...)."
        )
    return map_stages(opt_state, "add_decayed_weights", lambda st: {**st, "weight_decay": float(weight_decay)})


def find_state(opt_state: Any, key: str, default: Any = _MISSING) -> Any:
    """The value of ``key`` in the first stage state that has it (e.g. Adam's ``"mu"``: a dict by param name).

    >>> import torch, trainkit.optim as optim
    >>> s = optim.adam(1e-3).init({"w": torch.zeros(2)})
    >>> sorted(optim.find_state(s, "mu")), optim.find_state(s, "momentum", None)
    (['w'], None)
    """
    stack = [opt_state]
    while stack:
        s = stack.pop(0)
        if isinstance(s, dict):
            if key in s and STAGE in s:
                return s[key]
            stack[:0] = list(s.values())
        elif isinstance(s, (tuple, list)):
            stack[:0] = list(s)
    if default is _MISSING:
        raise KeyError(f"find_state: no stage of this optimizer state keeps {key!r} (stages found: {stage_kinds(opt_state)}).")
    return default


def ema_params(opt_state: Any) -> Params:
    """The EMA of the weights kept by :func:`param_ema`: ``state.replace(params=optim.ema_params(state.opt_state))`` evaluates with it.

    >>> import torch, trainkit.optim as optim
    >>> s = optim.chain(optim.sgd(0.1), optim.param_ema(0.99)).init({"w": torch.ones(1)})
    >>> optim.ema_params(s)["w"].item()
    1.0
    """
    found = find_stages(opt_state, "param_ema")
    if not found:
        raise ValueError(
            f"ema_params: this optimizer state keeps no EMA of the weights (stages found: {stage_kinds(opt_state)}). "
            "Chain optim.param_ema(decay) last: optim.chain(optim.adamw(1e-3), optim.param_ema(0.999))."
        )
    return found[0]["ema"]


# --------------------------------------------------------------------------- accumulation (the distributed side)


def is_accumulating(opt_state: Any) -> bool:
    """Whether the next update is a non-final micro-step of :func:`MultiSteps` (it only accumulates).

    Under ``distributed`` those need no all-reduce of their gradients.

    >>> import torch, trainkit.optim as optim
    >>> p = {"w": torch.zeros(1)}
    >>> optim.is_accumulating(optim.init(optim.MultiSteps(optim.sgd(0.1), 2), p)), optim.is_accumulating(optim.init(optim.sgd(0.1), p))
    (True, False)
    """
    return any(s["mini_step"] < s["every_k"] - 1 for s in find_stages(opt_state, "multi_steps", into_matches=False))


def map_accumulated(opt_state: Any, fn: Callable[[Params], Params]) -> Any:
    """``opt_state`` with each MultiSteps accumulator (a dict by param name) replaced by ``fn(acc)``.

    The accumulator holds the sum of the gradients of the ``mini_step`` micro-steps
    so far (meaningless at ``mini_step == 0``): all-reduce it before the final micro-step.

    >>> import torch, trainkit.optim as optim
    >>> s = optim.init(optim.MultiSteps(optim.sgd(0.1), 2), {"w": torch.zeros(1)})
    >>> optim.find_state(optim.map_accumulated(s, lambda acc: {n: a + 1 for n, a in acc.items()}), "acc")["w"].item()
    1.0
    """
    return map_stages(opt_state, "multi_steps", lambda st: {**st, "acc": fn(st["acc"])}, into_matches=False)
