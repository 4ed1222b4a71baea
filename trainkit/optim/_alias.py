"""The usual optimizers, each a chain of stages, numerically as its ``torch.optim`` twin."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._base import GradientTransformation, check_number
from ._combine import chain
from ._stages import Mask, ScalarOrSchedule, add_decayed_weights, scale_by_adam, scale_by_learning_rate, trace


def _betas(who: str, b1: Any, b2: Any, eps: Any) -> None:
    # Checked here too, so that the error names the alias the user called.
    check_number(who, "b1", b1, low=0.0, high=1.0, high_open=True, example=0.9)
    check_number(who, "b2", b2, low=0.0, high=1.0, high_open=True, example=0.999)
    check_number(who, "eps", eps, low=0.0, example=1e-8)


def _lr(who: str, lr: Any) -> ScalarOrSchedule:
    if callable(lr):
        return lr
    return check_number(who, "lr", lr, low=0.0, example=1e-3)


def decay_mask(name: str, param: Tensor) -> bool:
    """Which params get weight decay, as nanoGPT and timm group them: matrices and kernels (``ndim >= 2``).

    Biases and norm scales (``ndim < 2``) get none:
    ``optim.adamw(1e-3, weight_decay=0.1, mask=optim.decay_mask)``.

    >>> import torch
    >>> decay_mask("fc.weight", torch.zeros(3, 2)), decay_mask("fc.bias", torch.zeros(3)), decay_mask("ln.weight", torch.zeros(3))
    (True, False, False)
    """
    return param.ndim >= 2


def sgd(
    lr: ScalarOrSchedule,
    momentum: float = 0.0,
    *,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """Stochastic gradient descent, numerically as ``torch.optim.SGD``.

    ``chain([add_decayed_weights(weight_decay)], [trace(momentum, ...)], scale_by_learning_rate(lr))``.

    >>> import torch, trainkit.optim as optim
    >>> tx, p = optim.sgd(0.5, momentum=0.9), {"w": torch.tensor([1.0])}
    >>> u, s = tx.update({"w": torch.tensor([2.0])}, tx.init(p), p)
    >>> u["w"].item(), optim.get_lr(s)
    (-1.0, 0.5)
    """
    lr = _lr("sgd", lr)
    momentum = check_number("sgd", "momentum", momentum, low=0.0, high=1.0, example=0.9)
    dampening = check_number("sgd", "dampening", dampening, low=0.0, high=1.0, example=0.0)
    weight_decay = check_number("sgd", "weight_decay", weight_decay, low=0.0, example=1e-4)
    if not isinstance(nesterov, bool):
        raise ValueError(f"sgd: nesterov must be True or False, got {nesterov!r}. Pass e.g. nesterov=True.")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            f"sgd: nesterov=True needs momentum > 0 and dampening == 0, got {momentum} and {dampening}. Pass e.g. momentum=0.9."
        )
    stages = [add_decayed_weights(weight_decay)] if weight_decay else []
    if momentum:
        stages.append(trace(momentum, nesterov=nesterov, dampening=dampening))
    return chain(*stages, scale_by_learning_rate(lr))


def adam(
    lr: ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, weight_decay: float = 0.0
) -> GradientTransformation:
    """Adam, numerically as ``torch.optim.Adam`` (L2 weight decay, added to the gradient).

    ``chain([add_decayed_weights(weight_decay)], scale_by_adam(b1, b2, eps), scale_by_learning_rate(lr))``.

    >>> import torch, trainkit.optim as optim
    >>> tx, p = optim.adam(0.1), {"w": torch.tensor([1.0])}
    >>> u, s = tx.update({"w": torch.tensor([5.0])}, tx.init(p), p)
    >>> round(u["w"].item(), 6), optim.count(s)
    (-0.1, 1)
    """
    lr = _lr("adam", lr)
    _betas("adam", b1, b2, eps)
    weight_decay = check_number("adam", "weight_decay", weight_decay, low=0.0, example=0.0)
    stages = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(*stages, scale_by_adam(b1, b2, eps), scale_by_learning_rate(lr))


def adamw(
    lr: ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: float = 1e-2,
    mask: Mask | None = None,
) -> GradientTransformation:
    """AdamW (decoupled weight decay), numerically as ``torch.optim.AdamW``.

    ``chain(scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))``.
    ``mask`` (``(name, tensor) -> bool`` or ``{name: bool}``) chooses the params that
    decay: ``mask=optim.decay_mask`` is torch's two param groups, no decay on biases and norm weights.

    >>> import torch, trainkit.optim as optim
    >>> tx, p = optim.adamw(0.1, weight_decay=0.5), {"w": torch.tensor([1.0])}
    >>> u, _ = tx.update({"w": torch.tensor([5.0])}, tx.init(p), p)
    >>> round(u["w"].item(), 6)  # -lr - lr * wd * p
    -0.15
    """
    lr = _lr("adamw", lr)
    _betas("adamw", b1, b2, eps)
    weight_decay = check_number("adamw", "weight_decay", weight_decay, low=0.0, example=1e-2)
    return chain(scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr))
