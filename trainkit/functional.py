"""The hook points: ``value_and_grad``, ``apply_gradients`` and the step context the transforms set.

A step written with :func:`value_and_grad` and :meth:`TrainState.apply_gradients`
works under every trainkit transform, because those two functions are where the
transforms reach into the step:

* a transform that must see the loss before backward (fp16 loss scaling) or the
  gradients after it (unscaling, all-reduce) installs a :class:`StepHook` with
  :func:`hooks`; ``value_and_grad`` calls it;
* a hook may veto an update (:meth:`StepHook.skip_update`: a skipped fp16 step), or
  say that this call's update is thrown away (:meth:`StepHook.applies_update`: a
  data_parallel replica other than the primary); ``apply_gradients`` asks both;
* :func:`donating` says the caller gives the state away, so ``apply_gradients``
  may update it in place.

**Scope.** Hooks see only the gradient of the loss with respect to the state's own
params: ``hooks(..., params=state.params)`` names them, and ``value_and_grad`` runs
the hooks only when it differentiates with respect to a dict with exactly those
names, in that order (``tk.value_and_grad(loss_fn)(state.params)``). Any other
differentiation in a step (an input-gradient metric, a penalty on the inputs) is
plain math: no transform sees it.

This is JAX's named-axis idea: a transform sets a context that these primitives
read, and the step itself stays a plain function. The context is one immutable
:class:`StepContext`; :func:`current_context` reads it and :func:`use_context`
re-enters it (``tk.jit`` does, so the primitives read it while torch.compile traces).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "StepHook",
    "StepContext",
    "hooks",
    "donating",
    "is_donating",
    "current_context",
    "use_context",
    "hooked",
    "value_and_grad",
    "grad",
]

Params = dict[str, Tensor]


class StepHook:
    """Base class of the hooks a transform installs with :func:`hooks` (for transform authors).

    Every method has a do-nothing default, so a hook overrides only what it needs.
    Hooks nest: the innermost ``hooks(...)`` block is closest to the step, and sees
    the loss first and the gradients last (as function composition would).

    Class attributes: ``owner`` names the transform (for error messages) and
    ``traceable`` says whether a step under this hook can be compiled by ``tk.jit``
    (``False`` for hooks that wait on other threads or processes).
    """

    owner: str = "a StepHook"
    traceable: bool = True

    def loss(self, loss: Tensor, params: Sequence[Tensor]) -> Tensor:
        """Called with the scalar loss before backward; returns the loss to differentiate."""
        return loss

    def grads(self, grads: list[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
        """Called with the gradients after backward; returns the gradients to use."""
        return grads

    def skip_update(self, grads: Mapping[str, Tensor]) -> bool:
        """``True`` vetoes this update (e.g. non-finite fp16 gradients): params stay, schedules hold."""
        return False

    def applies_update(self) -> bool:
        """``False`` when this call's update is thrown away (a data_parallel replica other than the
        primary): ``apply_gradients`` then does no optimizer work at all."""
        return True


@dataclass(frozen=True)
class StepContext:
    """What the hook points read: the hooks (outermost first), whether the state is donated,
    and ``scope``, the names of the params whose gradient the hooks see (``None``: no scope)."""

    hooks: tuple[StepHook, ...] = ()
    donate: bool = False
    scope: tuple[str, ...] | None = None


_EMPTY = StepContext()
_CTX: contextvars.ContextVar[StepContext] = contextvars.ContextVar("trainkit_ctx", default=_EMPTY)


# torch.compile cannot trace a ContextVar. While tk.jit traces a step, the context
# lives on this plain stack instead: use_context pushes it, and hooks()/donating()
# inside the traced step push and pop here.
_TRACED: list[StepContext] = []


def current_context() -> StepContext:
    """The step context in force here (hooks, donation, scope).

    >>> import trainkit as tk
    >>> tk.current_context().hooks, tk.current_context().donate
    ((), False)
    """
    if torch.compiler.is_compiling():
        return _TRACED[-1] if _TRACED else _EMPTY
    return _CTX.get()


@contextlib.contextmanager
def use_context(ctx: StepContext) -> Iterator[None]:
    """Run the block under ``ctx``, also what ``torch.compile`` traces in it (for transform authors).

    ``tk.jit`` calls its compiled step inside ``use_context(current_context())``:
    the hook points then read the caller's context while dynamo traces.

    >>> import trainkit as tk
    >>> with tk.use_context(tk.StepContext(donate=True)):
    ...     tk.is_donating()
    True
    """
    if not isinstance(ctx, StepContext):
        raise TypeError(f"use_context: expected a StepContext, got {type(ctx).__name__}. Read one with tk.current_context().")
    if torch.compiler.is_compiling():
        _TRACED.append(ctx)
        try:
            yield
        finally:
            _TRACED.pop()
        return
    token = _CTX.set(ctx)
    _TRACED.append(ctx)
    try:
        yield
    finally:
        _TRACED.pop()
        _CTX.reset(token)


@contextlib.contextmanager
def _entered(new: StepContext) -> Iterator[None]:
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
def hooks(*new: StepHook, params: Mapping[str, Tensor]) -> Iterator[None]:
    """Install step hooks for the block, scoped to the gradient with respect to ``params`` (for transform authors).

    ``params`` is the params dict of the state the transform hands to its step
    (``state.params``): ``value_and_grad`` runs the hooks only when it differentiates
    with respect to a dict with the same names, so other gradients in the step stay plain.

    >>> import trainkit as tk, torch
    >>> class Double(tk.StepHook):
    ...     def grads(self, grads, params):
    ...         return [2 * g for g in grads]
    >>> params = {"w": torch.ones(2)}
    >>> with tk.hooks(Double(), params=params):
    ...     g = tk.grad(lambda p: (p["w"] ** 2).sum())(params)
    ...     x = tk.grad(lambda i: (i["x"] ** 2).sum())({"x": torch.ones(2)})  # not the params: not hooked
    >>> g["w"].tolist(), x["x"].tolist()
    ([4.0, 4.0], [2.0, 2.0])
    """
    for h in new:
        if not isinstance(h, StepHook):
            raise TypeError(f"hooks: expected StepHook instances, got {type(h).__name__}. Subclass tk.StepHook.")
    if not isinstance(params, Mapping):
        raise TypeError(
            f"hooks: params must be the params dict whose gradient the hooks see, got {type(params).__name__}. "
            "Pass params=state.params."
        )
    ctx = current_context()
    with _entered(StepContext(hooks=ctx.hooks + tuple(new), donate=ctx.donate, scope=tuple(params))):
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
    ctx = current_context()
    with _entered(StepContext(hooks=ctx.hooks, donate=bool(donate), scope=ctx.scope)):
        yield


def is_donating() -> bool:
    """Whether the current step may update its input state in place (see :func:`donating`)."""
    return current_context().donate


def hooked(params: Mapping[str, Tensor]) -> tuple[StepHook, ...]:
    """The hooks that apply to a gradient with respect to ``params``: all of them when ``params``
    has the scope's names in order, none otherwise.

    >>> import trainkit as tk, torch
    >>> p = {"w": torch.ones(1)}
    >>> with tk.hooks(tk.StepHook(), params=p):
    ...     len(tk.hooked(p)), len(tk.hooked({"x": torch.ones(1)}))
    (1, 0)
    """
    ctx = current_context()
    if not ctx.hooks or ctx.scope is None or len(ctx.scope) != len(params) or tuple(params) != ctx.scope:
        return ()
    return ctx.hooks


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
    installed by transforms (loss scaling, gradient reduction) run here when
    ``params`` is the state's params (see :func:`hooks`); any other gradient is plain.
    The caller's tensors are never changed and no ``.grad`` attribute is written.

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
            params = dict(zip(names, leaves, strict=True))
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
            active = hooked(params)
            differentiated = loss
            for h in reversed(active):  # innermost transform sees the loss first
                differentiated = h.loss(differentiated, leaves)
            if not differentiated.requires_grad:
                raise ValueError(
                    "value_and_grad: the loss does not depend on the params "
                    "(it has no grad_fn). Compute it from the params passed to the function, "
                    "e.g. state.apply(params, x), not from state.params captured outside."
                )
            grads = list(torch.autograd.grad(differentiated, leaves, allow_unused=True))
        for i, (g, p) in enumerate(zip(grads, leaves, strict=True)):
            if g is None:
                grads[i] = torch.zeros_like(p)
        for h in active:
            grads = h.grads(grads, leaves)
        result = (loss.detach(), aux) if has_aux else loss.detach()
        return result, dict(zip(names, grads, strict=True))

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
