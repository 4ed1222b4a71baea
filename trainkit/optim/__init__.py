"""Functional optimizers and schedules, the Optax way.

An optimizer is a :class:`GradientTransformation`: ``init(params) -> opt_state`` and
a pure ``update(grads, opt_state, params) -> (updates, opt_state)`` (new tensors;
its arguments untouched). ``params``, ``grads`` and ``updates`` are dicts keyed by
parameter name; the new params are ``p + u``. ``opt_state`` holds only tensors,
numbers, strings and plain containers, so it checkpoints with ``weights_only=True``.

The aliases are chains of small stages: ``adamw(lr)`` is
``chain(scale_by_adam(), add_decayed_weights(wd), scale_by_learning_rate(lr))``.
One stage, :func:`scale_by_learning_rate`, owns the LR and the schedule's count.
Param groups are :func:`masked` and :func:`partition` (their functions see names
and tensors); :func:`MultiSteps` accumulates gradients; :func:`param_ema` keeps an
EMA of the weights.

**The LR lives in the state** (Optax's ``inject_hyperparams``), as does the weight
decay. ``state.lr`` (:func:`get_lr`) is always the LR of the next update.
:func:`set_lr` is a lasting change, checkpointed and resumed with the state: a
constant LR becomes the new value; **a schedule is multiplied** from then on by
``new / schedule(count)``, so it keeps its shape (a plateau rule's x0.1 on a cosine
schedule gives a cosine ten times lower). :func:`override_lr` sets one update's LR
only (the LR range test does that).

**Speed**: :func:`apply_gradients` with ``donate=True`` (what the runner does) runs
each stage's in-place variant on torch's foreach kernels and fuses the last
``p += u`` into them (``addcdiv_``); a chain of ``scale_by_adam``, weight decay and
the LR (``adam``, ``adamw``, masked decay included) becomes one call of torch's fused
Adam kernel (``fused=True``'s: each tensor read and written once). ``donate=False``
runs the same kernels on copies, so the two agree bit for bit; ``tx.update`` (and
jit) compute the same update with foreach kernels, equal to rounding.

>>> import torch, trainkit.optim as optim
>>> tx = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1))
>>> params = {"w": torch.tensor([1.0, 2.0])}
>>> s = tx.init(params)
>>> updates, s2 = tx.update({"w": torch.tensor([3.0, 4.0])}, s, params)
>>> [round(u, 3) for u in updates["w"].tolist()], optim.get_lr(s2), optim.count(s), optim.count(s2)
([-0.06, -0.08], 0.1, 0, 1)
"""

from ._alias import adam, adamw, decay_mask, sgd
from ._api import (
    apply_gradients,
    apply_updates,
    count,
    ema_params,
    find_state,
    get_lr,
    get_lrs,
    init,
    is_accumulating,
    map_accumulated,
    map_lr,
    override_lr,
    set_lr,
    set_weight_decay,
    skip_update,
)
from ._base import GradientTransformation, clone_state
from ._combine import MultiSteps, chain, masked, partition
from ._schedules import (
    Schedule,
    constant_schedule,
    cosine_decay_schedule,
    exponential_schedule,
    linear_schedule,
    multistep_schedule,
    one_cycle_schedule,
    piecewise_constant_schedule,
    polynomial_schedule,
    step_schedule,
    warmup_cosine_decay_schedule,
)
from ._stages import add_decayed_weights, clip, clip_by_global_norm, ema_decay, param_ema, scale_by_adam, scale_by_learning_rate, trace

multi_steps = MultiSteps
multi_transform = partition  # Optax's older name

__all__ = [
    "GradientTransformation",
    "Schedule",
    # aliases
    "sgd",
    "adam",
    "adamw",
    "decay_mask",
    # stages
    "scale_by_adam",
    "trace",
    "add_decayed_weights",
    "scale_by_learning_rate",
    "clip_by_global_norm",
    "clip",
    "param_ema",
    "ema_decay",
    # composition
    "chain",
    "masked",
    "partition",
    "multi_transform",
    "MultiSteps",
    "multi_steps",
    # schedules
    "constant_schedule",
    "linear_schedule",
    "cosine_decay_schedule",
    "warmup_cosine_decay_schedule",
    "one_cycle_schedule",
    "step_schedule",
    "multistep_schedule",
    "exponential_schedule",
    "piecewise_constant_schedule",
    "polynomial_schedule",
    # the state
    "init",
    "apply_gradients",
    "apply_updates",
    "skip_update",
    "map_lr",
    "get_lr",
    "get_lrs",
    "set_lr",
    "override_lr",
    "count",
    "set_weight_decay",
    "find_state",
    "ema_params",
    "is_accumulating",
    "map_accumulated",
    "clone_state",
]
