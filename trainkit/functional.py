"""The hook points: ``value_and_grad`` and the step context the transforms set.

A step written with :func:`value_and_grad` and :meth:`TrainState.apply_gradients`
works under every trainkit transform, because those two functions are where the
transforms reach into the step:

* a transform that must see the loss before backward (fp16 loss scaling) or the
  gradients after it (unscaling, all-reduce) pushes a :class:`StepHook` with
  :func:`hooks`; ``value_and_grad`` calls it;
* a transform that may veto an optimizer update (a skipped fp16 step) answers
  ``StepHook.allow_update``; ``apply_gradients`` asks it;
* :func:`donating` says the caller gives the state away, so ``apply_gradients``
  may update it in place.

This is JAX's named-axis idea: a transform sets a context that these primitives
read, and the step itself stays a plain function.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["StepHook", "hooks", "donating", "is_donating", "value_and_grad", "grad"]

Params = dict[str, Tensor]


class StepHook:
    """Base class of the hooks a transform installs with :func:`hooks`.

    Every method has a do-nothing default, so a hook overrides only what it needs.
    Hooks nest: the innermost ``hooks(...)`` block is closest to the step, and sees
    the loss first and the gradients last (as function composition would).
    """

    def loss(self, loss: Tensor, params: Sequence[Tensor]) -> Tensor:
        """Called with the scalar loss before backward; returns the loss to differentiate."""
        return loss

    def grads(self, grads: list[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
        """Called with the gradients after backward; returns the gradients to use."""
        return grads

    def allow_update(self, grads: list[Tensor]) -> bool:
        """Asked by ``apply_gradients`` before updating; ``False`` skips the update."""
        return True


@dataclass(frozen=True)
class _Context:
    hooks: tuple[StepHook, ...] = ()
    donate: bool = False


_CTX: contextvars.ContextVar[_Context] = contextvars.ContextVar("trainkit_ctx", default=_Context())


# torch.compile cannot trace a ContextVar. While trainkit.jit traces a step, the
# context lives on this plain stack instead: jit pushes the caller's context, and
# hooks()/donating() inside the traced step push and pop here.
_TRACED: list[_Context] = []


def _context() -> _Context:
    if torch.compiler.is_compiling():
        return _TRACED[-1] if _TRACED else _Context()
    return _CTX.get()


@contextlib.contextmanager
def _entered(new: _Context) -> Iterator[None]:
    if torch.compiler.is_compiling():
        _TRACED.append(new)
        try:
            yield
        finally:
            _TRACED.pop()
        return
    token = _CTX.set(new)
    try:
        yield
    finally:
        _CTX.reset(token)


@contextlib.contextmanager
def hooks(*new: StepHook) -> Iterator[None]:
    """Install step hooks for the duration of the block (for transform authors).

    >>> import trainkit as tk, torch
    >>> class Double(tk.StepHook):
    ...     def grads(self, grads, params):
    ...         return [2 * g for g in grads]
    >>> with tk.hooks(Double()):
    ...     loss, g = tk.value_and_grad(lambda p: (p["w"] ** 2).sum())({"w": torch.ones(2)})
    >>> g["w"].tolist()
    [4.0, 4.0]
    """
    for h in new:
        if not isinstance(h, StepHook):
            raise TypeError(f"hooks: expected StepHook instances, got {type(h).__name__}")
    ctx = _context()
    with _entered(_Context(hooks=ctx.hooks + tuple(new), donate=ctx.donate)):
        yield


@contextlib.contextmanager
def donating(donate: bool = True) -> Iterator[None]:
    """Within the block, steps may update the state they are given in place.

    The caller promises not to use the state it passed in again (JAX's
    ``donate_argnums``). :func:`trainkit.fit` donates its own copy of the state;
    outside this block every step is pure.

    >>> import trainkit as tk
    >>> tk.is_donating()
    False
    >>> with tk.donating():
    ...     tk.is_donating()
    True
    """
    ctx = _context()
    with _entered(_Context(hooks=ctx.hooks, donate=bool(donate))):
        yield


def is_donating() -> bool:
    """Whether the current step may update its input state in place (see :func:`donating`)."""
    return _context().donate


def _check_loss(loss: Any) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(
            "value_and_grad: the loss function must return a scalar Tensor "
            f"(or (loss, aux) with has_aux=True), got {type(loss).__name__}. "
            "Return e.g. F.cross_entropy(logits, y)."
        )
    if loss.numel() != 1:
        raise ValueError(
            f"value_and_grad: the loss must be a scalar, got shape {tuple(loss.shape)}. "
            "Reduce it first, e.g. loss.mean() or F.cross_entropy(..., reduction='mean')."
        )
    if not loss.is_floating_point():
        raise TypeError(f"value_and_grad: the loss must be a floating-point scalar, got {loss.dtype}.")
    return loss.reshape(())


def value_and_grad(
    fn: Callable[..., Any], has_aux: bool = False
) -> Callable[..., tuple[Any, Params]]:
    """Return a function computing ``fn(params, *args)`` and its gradient w.r.t. ``params``.

    ``params`` is a dict of tensors (``state.params``). ``fn`` returns a scalar loss,
    or ``(loss, aux)`` when ``has_aux=True``. The result is ``(loss, grads)`` or
    ``((loss, aux), grads)``, with ``grads`` a dict shaped like ``params``. Hooks
    installed by transforms (loss scaling, gradient reduction) run here. The
    caller's tensors are never changed and no ``.grad`` attribute is written.

    >>> import torch, trainkit as tk
    >>> loss, g = tk.value_and_grad(lambda p, x: (p["w"] * x).sum())({"w": torch.ones(3)}, torch.arange(3.0))
    >>> loss.item(), g["w"].tolist()
    (3.0, [0.0, 1.0, 2.0])
    """

    def wrapped(params: Params, *args: Any, **kwargs: Any) -> tuple[Any, Params]:
        if not isinstance(params, dict):
            raise TypeError(
                "value_and_grad: the first argument must be the params dict "
                f"(e.g. state.params), got {type(params).__name__}."
            )
        names = list(params)
        leaves = list(params.values())
        # Leaves that already require grad are used as they are (the fast path: the
        # state's params are leaves, so no copy and no re-binding of the module).
        if not all(t.requires_grad and t.is_leaf for t in leaves):
            leaves = [t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) for t in leaves]
            params = dict(zip(names, leaves))
        with torch.enable_grad():
            out = fn(params, *args, **kwargs)
            if has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(
                        "value_and_grad(has_aux=True): the function must return (loss, aux), "
                        f"got {type(out).__name__}."
                    )
                loss, aux = out
            else:
                loss, aux = out, None
            loss = _check_loss(loss)
            ctx = _context()
            differentiated = loss
            for h in reversed(ctx.hooks):  # innermost transform sees the loss first
                differentiated = h.loss(differentiated, leaves)
            if not differentiated.requires_grad:
                raise ValueError(
                    "value_and_grad: the loss does not depend on the params "
                    "(it has no grad_fn). Compute it from the params passed to the function, "
                    "e.g. state.apply(params, x), not from state.params captured outside."
                )
            grads = list(torch.autograd.grad(differentiated, leaves, allow_unused=True))
        for i, (g, p) in enumerate(zip(grads, leaves)):
            if g is None:
                grads[i] = torch.zeros_like(p)
        for h in ctx.hooks:
            grads = h.grads(grads, leaves)
        result = (loss.detach(), aux) if has_aux else loss.detach()
        return result, dict(zip(names, grads))

    wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapped


def grad(fn: Callable[..., Any], has_aux: bool = False) -> Callable[..., Any]:
    """Like :func:`value_and_grad` but return only the gradients (and aux).

    >>> import torch, trainkit as tk
    >>> tk.grad(lambda p: (p["w"] ** 2).sum())({"w": torch.tensor([1.0, 2.0])})["w"].tolist()
    [2.0, 4.0]
    """
    vg = value_and_grad(fn, has_aux=has_aux)

    def wrapped(params: Params, *args: Any, **kwargs: Any) -> Any:
        value, g = vg(params, *args, **kwargs)
        return (g, value[1]) if has_aux else g

    return wrapped
