"""The stages aliases are chained from: moments, momentum, weight decay, the LR, clipping, the EMA of the weights."""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Mapping, Union

import torch
from torch import Tensor

from ._base import STAGE, Deferred, GradientTransformation, Params, Pending, as_dict, check_number, stage

Schedule = Callable[[int], float]
ScalarOrSchedule = Union[float, Schedule]
Mask = Union[Callable[[str, Tensor], bool], Mapping[str, bool]]


def _zeros(params: Params) -> Params:
    return {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n, p in params.items()}


# --------------------------------------------------------------------------- Adam's moments


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Scale by Adam's bias-corrected moments: ``m_hat / (sqrt(v_hat) + eps)``, as ``torch.optim.Adam`` computes it.

    It keeps its own ``count`` for the bias correction; the LR is a later stage.

    >>> import torch, trainkit.optim as optim
    >>> tx, p = optim.scale_by_adam(), {"w": torch.tensor([1.0])}
    >>> u, s = tx.update({"w": torch.tensor([5.0])}, tx.init(p), p)
    >>> round(u["w"].item(), 6), s["count"]
    (1.0, 1)
    """
    b1 = check_number("scale_by_adam", "b1", b1, low=0.0, high=1.0, high_open=True, example=0.9)
    b2 = check_number("scale_by_adam", "b2", b2, low=0.0, high=1.0, high_open=True, example=0.999)
    eps = check_number("scale_by_adam", "eps", eps, low=0.0, example=1e-8)
    local = threading.local()

    def workspace(like: list[Tensor]) -> list[Tensor]:
        # Memory for the denominator, reused across steps (per thread): it is overwritten every
        # step, so it is no state. Allocating ~params-sized temporaries each step made glibc
        # return them to the OS and page-fault them back in: 0.87x of torch.optim on a
        # 784-512-512-10 MLP with 2 threads.
        ws = getattr(local, "ws", None)
        if ws is None or len(ws) != len(like) or any(
            a.shape != b.shape or a.dtype != b.dtype or a.device != b.device for a, b in zip(ws, like, strict=True)
        ):
            ws = local.ws = [torch.empty_like(t) for t in like]
        return ws

    def init(params: Params) -> dict:
        return {STAGE: "scale_by_adam", "count": 0, "mu": _zeros(params), "nu": _zeros(params)}

    def donated(updates: Any, state: dict, params: Params) -> tuple[Pending, dict]:
        g = list(as_dict(updates, params).values())
        t = state["count"] + 1
        moments = _AdamStep(g, list(state["mu"].values()), list(state["nu"].values()), t, b1, b2, eps, workspace)
        # The moments are written when the Pending is consumed: the next stages and the apply do it.
        return Pending(list(params), [("deferred", 1.0, None, moments, None)]), {**state, "count": t}

    return stage(donated, init)


def _traced_bias_correction(t: Any, b1: float, b2: float, eps: float) -> tuple[Tensor, Tensor]:
    """``eps * c2`` and ``c2 / (1 - b1^t)`` (``c2 = sqrt(1 - b2^t)``) as 0-d tensors, for a traced step (jit).

    Written as Python math on the traced count, they would be inlined by inductor into
    every element loop of the update, and computed again per 16 floats: C++ compiled
    with ``-fmath-errno`` cannot hoist ``pow`` and ``sqrt`` out of a loop. That made a
    jitted step slower than the eager one (3.2 vs 2.7 ms on a 784-512-512-10 MLP with
    Adam, 2 CPU threads; 2.4 ms with this). As one small tensor computed through ``exp``,
    read twice, inductor gives it a buffer of its own (its rule for a reused result
    of a costly op on CPU): each loop then loads two numbers. CPU only: a GPU's
    generated kernels were not measured, so they keep the Python math.
    """
    logs = [math.log(b) if b > 0 else -math.inf for b in (b1, b2)]  # b^t = exp(t log b); b = 0: 0 for t >= 1
    powers = torch.exp(torch.scalar_tensor(t, dtype=torch.float64) * torch.tensor(logs, dtype=torch.float64))
    c2 = torch.sqrt(1 - powers[1])
    both = torch.stack([eps * c2, c2 / (1 - powers[0])])
    return both[0], both[1]


class _AdamStep(Deferred):
    """Adam's update of its moments and its direction, done when consumed (see :class:`Deferred`)."""

    def __init__(
        self, g: list[Tensor], mu: list[Tensor], nu: list[Tensor], t: Any, b1: float, b2: float, eps: float, workspace: Any
    ) -> None:
        self.g, self.mu, self.nu, self.t, self.b1, self.b2, self.eps, self.workspace = g, mu, nu, t, b1, b2, eps, workspace
        self.done = False

    def _consume(self) -> None:
        if self.done:  # the moments would be updated twice
            raise RuntimeError("scale_by_adam: an update was consumed twice; this is a bug in trainkit.optim.")
        self.done = True

    def quotient(self) -> tuple[list[Tensor], list[Tensor], float]:
        self._consume()
        b1, b2, t, g, mu, nu = self.b1, self.b2, self.t, self.g, self.mu, self.nu
        torch._foreach_lerp_(mu, g, 1 - b1)
        torch._foreach_mul_(nu, b2)
        torch._foreach_addcmul_(nu, g, g, 1 - b2)
        # torch's mu / (1 - b1^t) / (sqrt(nu) / c2 + eps) as c2 / (1 - b1^t) * mu / (sqrt(nu) + eps * c2):
        # the same number, one pass over the params' memory fewer (-10% of the update, measured).
        if torch.compiler.is_compiling() and nu and nu[0].device.type == "cpu":
            eps_c2, c = _traced_bias_correction(t, b1, b2, self.eps)
            denom = torch._foreach_sqrt(nu)  # inductor fuses it with its neighbours: no scratch memory needed
            torch._foreach_add_(denom, eps_c2)
            return mu, denom, c
        c2 = math.sqrt(1 - b2**t)
        if torch.compiler.is_compiling():  # on a GPU: not measured (see _traced_bias_correction)
            denom = torch._foreach_sqrt(nu)
        else:
            denom = self.workspace(nu)
            for v, d in zip(nu, denom, strict=True):  # sqrt straight into the scratch memory: no foreach has out=,
                torch.sqrt(v, out=d)  # and copy_ + sqrt_ is a pass more (-7% of the update on a 784-512-512 MLP)
        torch._foreach_add_(denom, self.eps * c2)
        # Valid until this stage runs again: the next stage and the apply read it before then.
        return mu, denom, c2 / (1 - b1**t)

    def fused_(self, calls: list[tuple[list[Tensor], list[int], float]], lr: float) -> bool:
        # torch's fused Adam kernel (fused=True) reads and writes each tensor once: 2.3x faster than
        # the foreach path on a 784-512-512-10 MLP on CPU (526 vs 1230 us). CPU and CUDA only.
        first = self.mu[0] if self.mu else None
        if first is None or first.device.type not in ("cpu", "cuda") or any(t.device != first.device for t in self.mu):
            return False
        self._consume()
        step = torch.tensor(float(self.t), dtype=torch.float32, device=first.device)
        for params, js, weight_decay in calls:
            torch._fused_adamw_(
                params, [self.g[j] for j in js], [self.mu[j] for j in js], [self.nu[j] for j in js], [], [step] * len(js),
                lr=lr, beta1=self.b1, beta2=self.b2, weight_decay=weight_decay, eps=self.eps, amsgrad=False, maximize=False,
            )  # fmt: skip
        return True


# --------------------------------------------------------------------------- momentum


def trace(decay: float, *, nesterov: bool = False, dampening: float = 0.0) -> GradientTransformation:
    """Momentum as ``torch.optim.SGD`` keeps it: ``buf = decay * buf + (1 - dampening) * g`` (``buf = g`` at the first update).

    With ``nesterov=True`` the update is ``g + decay * buf``.

    >>> import torch, trainkit.optim as optim
    >>> tx, p = optim.trace(0.5), {"w": torch.tensor([0.0])}
    >>> s = tx.init(p)
    >>> for g in (2.0, 2.0):
    ...     u, s = tx.update({"w": torch.tensor([g])}, s, p)
    >>> u["w"].item()
    3.0
    """
    who = "trace"
    decay = check_number(who, "decay", decay, low=0.0, high=1.0, example=0.9)
    dampening = check_number(who, "dampening", dampening, low=0.0, high=1.0, example=0.0)
    if not isinstance(nesterov, bool):
        raise ValueError(f"{who}: nesterov must be True or False, got {nesterov!r}. Pass e.g. nesterov=True.")
    if nesterov and (decay <= 0 or dampening != 0):
        raise ValueError(
            f"{who}: nesterov=True needs momentum > 0 and dampening == 0, got {decay} and {dampening}. Pass e.g. decay=0.9."
        )

    def init(params: Params) -> dict:
        return {STAGE: "trace", "count": 0, "momentum": _zeros(params)}

    def donated(updates: Any, state: dict, params: Params) -> tuple[Params, dict]:
        g = list(as_dict(updates, params).values())
        bufs = list(state["momentum"].values())
        if state["count"] == 0:  # torch initialises the buffer with the first gradient
            torch._foreach_copy_(bufs, g)
        else:
            torch._foreach_mul_(bufs, decay)
            torch._foreach_add_(bufs, g, alpha=1 - dampening)
        out = torch._foreach_add(g, bufs, alpha=decay) if nesterov else bufs
        return dict(zip(params, out, strict=True)), {**state, "count": state["count"] + 1}

    return stage(donated, init)


# --------------------------------------------------------------------------- weight decay


def check_mask(who: str, mask: Any) -> None:
    """At construction: a mask is a function ``(name, tensor) -> bool`` or a dict ``{name: bool}``."""
    if not callable(mask) and not isinstance(mask, Mapping):
        raise TypeError(
            f"{who}: mask must be a function (name, tensor) -> bool or a dict {{name: bool}}, got {type(mask).__name__}. "
            "Pass e.g. mask=optim.decay_mask."
        )


def resolve_mask(who: str, mask: Mask, params: Params) -> list[str]:
    """The names ``mask`` selects (a function ``(name, tensor) -> bool`` or a dict ``{name: bool}``)."""
    if callable(mask):
        values = {n: mask(n, p) for n, p in params.items()}
    elif isinstance(mask, Mapping):
        missing = [n for n in params if n not in mask]
        unknown = [n for n in mask if n not in params]
        if missing or unknown:
            raise ValueError(
                f"{who}: the mask must give True/False for every param; missing {missing}, unknown {unknown}. "
                f"The params are {list(params)}."
            )
        values = {n: mask[n] for n in params}
    else:
        raise TypeError(f"{who}: mask must be a function (name, tensor) -> bool or a dict {{name: bool}}, got {type(mask).__name__}.")
    wrong = {n: v for n, v in values.items() if not isinstance(v, bool)}
    if wrong:
        raise ValueError(
            f"{who}: the mask must return True or False for each param, got {wrong}. The params are {list(params)}; "
            "e.g. mask=lambda name, p: p.ndim >= 2."
        )
    return [n for n, v in values.items() if v]


def add_decayed_weights(weight_decay: float = 0.0, mask: Mask | None = None) -> GradientTransformation:
    """Add ``weight_decay * param`` to the updates (of the params ``mask`` selects, if given).

    The weight decay lives in the state (``state["weight_decay"]``), so
    :func:`trainkit.optim.set_weight_decay` changes it lastingly. Before
    :func:`scale_by_learning_rate` this is decoupled decay (AdamW); before the
    moments it is L2 regularisation (``torch.optim.Adam``'s ``weight_decay``).

    >>> import torch, trainkit.optim as optim
    >>> tx, p = optim.add_decayed_weights(0.1), {"w": torch.tensor([2.0])}
    >>> u, _ = tx.update({"w": torch.tensor([1.0])}, tx.init(p), p)
    >>> round(u["w"].item(), 6)
    1.2
    """
    weight_decay = check_number("add_decayed_weights", "weight_decay", weight_decay, low=0.0, example=1e-2)
    if mask is not None:
        check_mask("add_decayed_weights", mask)
    names_cache: dict[tuple[str, ...], list[int] | None] = {}

    def positions(params: Params) -> list[int] | None:
        key = tuple(params)
        if key not in names_cache:
            chosen = set(resolve_mask("add_decayed_weights", mask, params)) if mask is not None else None
            names_cache[key] = None if chosen is None else [i for i, n in enumerate(params) if n in chosen]
        return names_cache[key]

    def init(params: Params) -> dict:
        positions(params)  # a bad mask fails here, at TrainState.create
        return {STAGE: "add_decayed_weights", "weight_decay": weight_decay}

    def donated(updates: Any, state: dict, params: Params) -> tuple[Pending, dict]:
        wd, pending = state["weight_decay"], Pending.of(updates)
        if isinstance(wd, float) and wd == 0.0:
            return pending, state
        idx = positions(params)
        return Pending(pending.names, [*pending.terms, ("self", wd, idx, None, None)], pending.post), state

    return stage(donated, init)


# --------------------------------------------------------------------------- the learning rate


def scale_by_learning_rate(lr: ScalarOrSchedule) -> GradientTransformation:
    """Scale by ``-lr``: the one stage that owns the learning rate and the schedule's count.

    Its state: ``count`` (updates applied), ``lr`` (the LR of the *next* update:
    what ``state.lr`` reads), and the lasting setting: ``base_lr`` for a constant
    LR, ``scale`` (a multiplier of the schedule, 1.0 at first) and ``schedule_lr``
    (the schedule's own value) for a schedule. A lasting change
    (:func:`trainkit.optim.set_lr`, a plateau rule) sets ``base_lr``, or multiplies
    the schedule from then on; :func:`trainkit.optim.override_lr` sets ``lr`` for one update only.

    >>> import torch, trainkit.optim as optim
    >>> tx, p = optim.scale_by_learning_rate(0.1), {"w": torch.tensor([0.0])}
    >>> u, s = tx.update({"w": torch.tensor([2.0])}, tx.init(p), p)
    >>> round(u["w"].item(), 6), s["count"], s["lr"]
    (-0.2, 1, 0.1)
    """
    if callable(lr):
        schedule: Schedule | None = lr
    else:
        schedule = None
        lr = check_number("scale_by_learning_rate", "lr", lr, low=0.0, example=1e-3)

    def init(params: Params) -> dict:
        if schedule is None:
            return {STAGE: "scale_by_learning_rate", "count": 0, "lr": lr, "base_lr": lr}
        first = float(schedule(0))
        return {STAGE: "scale_by_learning_rate", "count": 0, "lr": first, "scale": 1.0, "schedule_lr": first}

    def donated(updates: Any, state: dict, params: Params) -> tuple[Pending, dict]:
        if isinstance(updates, Pending) and not updates.terms:  # MultiSteps only accumulated: nothing moved
            return updates, state
        count = state["count"] + 1
        if schedule is None:
            new = {**state, "count": count, "lr": state["base_lr"]}
        else:
            value = float(schedule(count))
            new = {**state, "count": count, "lr": state["scale"] * value, "schedule_lr": value}
        return Pending.of(updates).scaled(-state["lr"]), new

    return stage(donated, init)


# --------------------------------------------------------------------------- clipping


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale the updates so that their global L2 norm is at most ``max_norm``.

    Numerically as ``torch.nn.utils.clip_grad_norm_`` (coefficient
    ``max_norm / (norm + 1e-6)`` clamped to 1). No host sync.

    >>> import torch, trainkit.optim as optim
    >>> tx, p = optim.clip_by_global_norm(1.0), {"w": torch.zeros(2)}
    >>> u, _ = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(p), p)
    >>> [round(v, 4) for v in u["w"].tolist()]
    [0.6, 0.8]
    """
    max_norm = check_number("clip_by_global_norm", "max_norm", max_norm, low=0.0, low_open=True, example=1.0)

    def init(params: Params) -> dict:
        return {STAGE: "clip_by_global_norm"}

    def donated(updates: Any, state: dict, params: Params) -> tuple[Params, dict]:
        u = as_dict(updates, params)
        if not u:
            return u, state
        g = list(u.values())
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g)))
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return dict(zip(u, torch._foreach_mul(g, coef.to(g[0].dtype)), strict=True)), state

    return stage(donated, init)


def clip(max_delta: float) -> GradientTransformation:
    """Clamp every update to ``[-max_delta, max_delta]``, as ``torch.nn.utils.clip_grad_value_``.

    >>> import torch, trainkit.optim as optim
    >>> tx, p = optim.clip(1.0), {"w": torch.zeros(2)}
    >>> tx.update({"w": torch.tensor([3.0, -0.5])}, tx.init(p), p)[0]["w"].tolist()
    [1.0, -0.5]
    """
    max_delta = check_number("clip", "max_delta", max_delta, low=0.0, low_open=True, example=1.0)

    def init(params: Params) -> dict:
        return {STAGE: "clip"}

    def donated(updates: Any, state: dict, params: Params) -> tuple[Params, dict]:
        u = as_dict(updates, params)
        return {n: g.clamp(-max_delta, max_delta) for n, g in u.items()}, state

    return stage(donated, init)


# --------------------------------------------------------------------------- EMA of the weights


def ema_decay(
    count: int, decay: float, warmup: bool, warmup_gamma: float, warmup_power: float, min_decay: float, update_after_step: int
) -> float:
    """The decay of the ``count``-th update (1-based), as timm's ``ModelEmaV3.get_decay(step=count)``.

    0 (copy the weights) up to ``update_after_step + 1``; then ``decay``, or with
    ``warmup`` ``1 - (1 + k / warmup_gamma) ** -warmup_power`` clamped to ``[min_decay, decay]``.

    >>> [round(ema_decay(c, 0.999, True, 1.0, 2 / 3, 0.0, 0), 4) for c in (1, 2, 10)]
    [0.0, 0.37, 0.7846]
    """
    k = max(0, count - update_after_step - 1)
    if k <= 0:
        return 0.0
    if not warmup:
        return decay
    return max(min(1 - (1 + k / warmup_gamma) ** -warmup_power, decay), min_decay)


def param_ema(
    decay: float = 0.9999,
    *,
    warmup: bool = False,
    warmup_gamma: float = 1.0,
    warmup_power: float = 2 / 3,
    min_decay: float = 0.0,
    update_after_step: int = 0,
) -> GradientTransformation:
    """Keep an exponential moving average of the weights in the state (timm's ``ModelEmaV3``).

    Put it last in a chain (inside :func:`MultiSteps`, if any): after each update,
    ``ema = d * ema + (1 - d) * new_params`` with ``d`` from :func:`ema_decay`
    (the first update copies the weights; ``warmup=True`` ramps ``d`` up as timm).
    The updates pass through unchanged. Evaluate with the EMA weights in one line:
    ``state.replace(params=optim.ema_params(state.opt_state))``.

    >>> import torch, trainkit.optim as optim
    >>> tx = optim.chain(optim.sgd(1.0), optim.param_ema(0.5))
    >>> p = {"w": torch.tensor([0.0])}
    >>> s = optim.init(tx, p)
    >>> for _ in range(3):
    ...     p, s = optim.apply_gradients(tx, {"w": torch.tensor([-1.0])}, s, p, donate=False)
    >>> p["w"].item(), optim.ema_params(s)["w"].item()
    (3.0, 2.25)
    """
    who = "param_ema"
    decay = check_number(who, "decay", decay, low=0.0, high=1.0, example=0.9999)
    min_decay = check_number(who, "min_decay", min_decay, low=0.0, high=decay, example=0.0)
    warmup_gamma = check_number(who, "warmup_gamma", warmup_gamma, low=0.0, low_open=True, example=1.0)
    warmup_power = check_number(who, "warmup_power", warmup_power, low=0.0, low_open=True, example=2 / 3)
    if not isinstance(warmup, bool):
        raise ValueError(f"{who}: warmup must be True or False, got {warmup!r}. Pass e.g. warmup=True.")
    if not isinstance(update_after_step, int) or isinstance(update_after_step, bool) or update_after_step < 0:
        raise ValueError(f"{who}: update_after_step must be an int >= 0, got {update_after_step!r}. Pass e.g. update_after_step=0.")

    def init(params: Params) -> dict:
        return {STAGE: "param_ema", "count": 0, "ema": {n: p.detach().clone() for n, p in params.items()}}

    def donated(updates: Any, state: dict, params: Params) -> tuple[Pending, dict]:
        if isinstance(updates, Pending) and not updates.terms:  # MultiSteps only accumulated: nothing moved
            return updates, state
        count = state["count"] + 1
        d = ema_decay(count, decay, warmup, warmup_gamma, warmup_power, min_decay, update_after_step)
        ema = state["ema"]

        def follow(new_params: Params) -> None:
            torch._foreach_lerp_(list(ema.values()), [new_params[n].detach() for n in ema], 1.0 - d)

        pending = Pending.of(updates)
        return Pending(pending.names, pending.terms, [*pending.post, follow]), {**state, "count": count}

    return stage(donated, init)
