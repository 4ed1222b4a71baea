"""``TrainState``: everything a training step reads and writes, as one immutable pytree."""

from __future__ import annotations

import copy
import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from . import optim as _optim
from .functional import current_context, hooked
from .rng import derive_seed, seeded

__all__ = ["TrainState", "to_module", "traced_module"]


class _Binder:
    """Points the parameters and buffers of one thread's copy of the skeleton at given tensors.

    Each thread (data_parallel runs its replicas in threads) binds its own copy, so the
    skeleton itself stays tensor-less. Re-binding only when the tensors change keeps the
    donated path (same tensors every step) as cheap as calling the module directly.
    """

    def __init__(self, skeleton: nn.Module) -> None:
        self.module = module = _meta_copy(skeleton)
        # (module, attribute, unique name) for every occurrence: tied weights appear twice here
        self.slots_p = _slots(module, module.named_parameters(remove_duplicate=False), module.named_parameters())
        self.slots_b = _slots(module, module.named_buffers(remove_duplicate=False), module.named_buffers())
        self.bound: tuple = ()
        self.training: bool | None = None

    def bind(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], train: bool) -> nn.Module:
        key = (*(params[n] for _, _, n in self.slots_p), *(buffers[n] for _, _, n in self.slots_b))
        if len(key) != len(self.bound) or any(x is not y for x, y in zip(key, self.bound, strict=True)):
            for (mod, attr, n) in self.slots_p:
                mod._parameters[attr] = params[n]
            for (mod, attr, n) in self.slots_b:
                mod._buffers[attr] = buffers[n]
            self.bound = key
        if self.training is not train:
            self.module.train(train)
            self.training = train
        return self.module


def _slots(module: nn.Module, every: Any, unique: Any) -> list[tuple[nn.Module, str, str]]:
    canonical = {id(t): n for n, t in unique}
    return [(*_split(module, n), canonical[id(t)]) for n, t in every]


def _split(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, attr = name.split(".")
    mod = module
    for p in path:
        mod = getattr(mod, p)
    return mod, attr


@dataclass(frozen=True, eq=False)
class TrainState:
    """The state of a training run: an immutable pytree.

    Fields (children of the pytree): ``step`` (steps taken, a Python int),
    ``params`` and ``buffers`` (dicts of tensors, named as in the module),
    ``opt_state`` (the optimizer's state), ``rng`` (an int seed: the randomness of
    step ``k`` is a function of ``(rng, k)`` only) and ``slots`` (one entry per
    transform that keeps state, e.g. ``slots["mixed_precision"]``).

    Static (not children): ``module`` (a tensor-less skeleton of the module given to
    :meth:`create`, used as a function) and ``tx`` (the optimizer). Change a state
    with :meth:`replace`.

    >>> import torch, trainkit as tk
    >>> state = tk.TrainState.create(torch.nn.Linear(2, 1), tk.optim.sgd(0.1))
    >>> sorted(state.params), state.step, state.lr
    (['bias', 'weight'], 0, 0.1)
    >>> state.replace(step=5).step, state.step
    (5, 0)
    """

    step: int
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    opt_state: Any
    rng: int
    slots: dict[str, Any] = field(default_factory=dict)
    module: nn.Module = field(default=None, repr=False)  # type: ignore[assignment]
    tx: _optim.GradientTransformation = field(default=None, repr=False)  # type: ignore[assignment]

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        module: nn.Module,
        tx: _optim.GradientTransformation,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "TrainState":
        """Make the initial state of ``module`` trained by ``tx``.

        The params and buffers are copies, and ``state.module`` is a tensor-less
        skeleton of ``module`` (its parameters on the meta device), made once here: the
        architecture as a function, as Flax keeps ``apply_fn``. Nothing is ever written
        on the ``module`` you pass, and changing it later (hooks, submodules) does not
        change the state: create a new state for a new architecture. Get a module
        with the trained weights back with :func:`trainkit.to_module`.

        >>> import torch, trainkit as tk
        >>> s = tk.TrainState.create(torch.nn.Linear(3, 2), tk.optim.adam(1e-3), dtype=torch.float64)
        >>> s.params["weight"].dtype, s.lr, s.step
        (torch.float64, 0.001, 0)
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"TrainState.create: module must be an nn.Module, got {type(module).__name__}.")
        if not isinstance(tx, _optim.GradientTransformation):
            raise TypeError(
                f"TrainState.create: tx must be a trainkit.optim.GradientTransformation, got {type(tx).__name__}. "
                "Use e.g. trainkit.optim.adam(1e-3); torch.optim optimizers are stateful objects and do not fit."
            )
        if not isinstance(seed, int):
            raise TypeError(f"TrainState.create: seed must be an int, got {type(seed).__name__}.")

        def copy(t: Tensor, is_param: bool) -> Tensor:
            t = t.detach()
            if device is not None:
                t = t.to(device)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            t = t.clone()
            return t.requires_grad_(is_param and t.is_floating_point())

        params = {n: copy(p, True) for n, p in module.named_parameters()}
        buffers = {n: copy(b, False) for n, b in module.named_buffers()}
        opt_state = _optim.init(tx, params)
        skeleton = _meta_copy(module)  # the module as a function: no tensors, nothing of the user's
        return cls(step=0, params=params, buffers=buffers, opt_state=opt_state, rng=seed, slots={}, module=skeleton, tx=tx)

    def replace(self, **changes: Any) -> "TrainState":
        """A new state with the given fields replaced (the fields are those of the dataclass)."""
        unknown = set(changes) - _FIELDS
        if unknown:
            raise TypeError(f"TrainState.replace: unknown field(s) {sorted(unknown)}; fields are {sorted(_FIELDS)}.")
        new = object.__new__(TrainState)
        d = dict(self.__dict__)
        d.update(changes)
        new.__dict__.update(d)
        return new

    # ------------------------------------------------------------------ the model as a function
    def apply(
        self,
        params: Mapping[str, Tensor] | None,
        *args: Any,
        train: bool = False,
        buffers: Mapping[str, Tensor] | None = None,
        **kwargs: Any,
    ) -> tuple[Any, dict[str, Tensor]]:
        """Call the module with ``params`` (``None``: ``self.params``); return ``(output, new_buffers)``.

        ``train=True`` puts the module in training mode: dropout draws from the
        state's RNG (a function of ``rng`` and ``step``, so a step is deterministic)
        and BatchNorm's running statistics are updated into ``new_buffers``, which
        the step passes on with ``state.apply_gradients(grads, buffers=new_buffers)``.
        The state's own buffers are never changed unless the caller donates the state.

        >>> import torch, trainkit as tk
        >>> s = tk.TrainState.create(torch.nn.BatchNorm1d(2), tk.optim.sgd(0.1))
        >>> out, new_buffers = s.apply(None, torch.randn(8, 2), train=True)
        >>> bool((new_buffers["running_mean"] != s.buffers["running_mean"]).any())
        True
        """
        params = self.params if params is None else params
        buffers = self.buffers if buffers is None else buffers
        if train and buffers and not current_context().donate:
            buffers = {k: v.clone() for k, v in buffers.items()}
        if torch.compiler.is_compiling():
            # Under torch.compile the module is called through functional_call, which
            # dynamo understands, on a tensor-less copy in the mode asked for (see
            # traced_module); the RNG is seeded outside the graph by trainkit.jit.
            module = traced_module(self.module, bool(train))
            out = torch.func.functional_call(module, {**params, **buffers}, args, kwargs, tie_weights=False)
            return out, dict(buffers)
        module = _binder(self.module).bind(params, buffers, train)
        if not train:
            return module(*args, **kwargs), dict(buffers)
        with seeded(self.params, derive_seed(self.rng, self.step)):
            out = module(*args, **kwargs)
        return out, dict(buffers)

    # ------------------------------------------------------------------ the update
    def apply_gradients(self, grads: Mapping[str, Tensor], *, buffers: Mapping[str, Tensor] | None = None, **changes: Any) -> "TrainState":
        """Return the state after one optimizer update with ``grads``; ``step`` advances by one.

        Pure unless the caller donates the state (:func:`trainkit.donating`), in
        which case params and optimizer state are updated in place with the same
        kernels. A transform's hook may veto the update (a skipped fp16 step): then
        params, optimizer state (and so the LR schedule) stay as they were.
        ``buffers`` (from :meth:`apply`) and any other field in ``changes`` replace
        those of the state.

        >>> import torch, trainkit as tk
        >>> s = tk.TrainState.create(torch.nn.Linear(1, 1, bias=False), tk.optim.sgd(0.5))
        >>> w = s.params["weight"].item()
        >>> s2 = s.apply_gradients({"weight": torch.ones(1, 1)})
        >>> round(s2.params["weight"].item() - w, 6), s2.step, s.params["weight"].item() == w
        (-0.5, 1, True)
        """
        names = self.params.keys()
        if not isinstance(grads, Mapping) or grads.keys() != names:
            _raise_grads_mismatch(self.params, grads)
        for n, pi in self.params.items():
            gi = grads[n]
            if not isinstance(gi, Tensor) or gi.shape != pi.shape:
                _raise_grads_mismatch(self.params, grads)
        donate = current_context().donate
        active = hooked(self.params)  # the transforms' hooks, when these are the scoped params
        new = {"step": self.step + 1, **changes}
        if buffers is not None:
            new["buffers"] = dict(buffers)
        if not all(h.applies_update() for h in active):
            return self.replace(**new)  # thrown away (a data_parallel replica other than the primary): no work
        if any(h.skip_update(grads) for h in active):  # vetoed (non-finite fp16 gradients): params and schedule hold
            return self.replace(**{**new, "opt_state": _optim.skip_update(self.tx, self.opt_state)})
        with torch.no_grad():
            params, opt_state = _optim.apply_gradients(self.tx, grads, self.opt_state, self.params, donate=donate)
        if not donate:
            for t in params.values():
                t.requires_grad_(t.is_floating_point())
        return self.replace(**{**new, "params": params, "opt_state": opt_state})

    # ------------------------------------------------------------------ conveniences
    @property
    def lr(self) -> float:
        """The learning rate of the next update (see :func:`trainkit.optim.get_lr`)."""
        return _optim.get_lr(self.opt_state)

    def with_lr(self, lr: float) -> "TrainState":
        """A state whose LR is ``lr`` from the next update on, lastingly (checkpointed).

        A schedule is scaled so that it gives ``lr`` now and keeps its shape (see
        :func:`trainkit.optim.set_lr`). For one update only:
        ``state.replace(opt_state=tk.optim.override_lr(state.opt_state, lr))``.

        >>> import torch, trainkit as tk
        >>> s = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.adam(1e-3)).with_lr(0.5)
        >>> s.lr, s.apply_gradients({"weight": torch.ones(1, 1), "bias": torch.ones(1)}).lr
        (0.5, 0.5)
        """
        return self.replace(opt_state=_optim.set_lr(self.opt_state, lr))

    def with_ema_params(self) -> "TrainState":
        """This state with the EMA of its weights (kept by ``optim.param_ema``) as its params: for evaluation.

        >>> import torch, trainkit as tk
        >>> tx = tk.optim.chain(tk.optim.sgd(0.1), tk.optim.param_ema(0.9))
        >>> s = tk.TrainState.create(torch.nn.Linear(1, 1), tx)
        >>> s2 = s.apply_gradients({"weight": torch.ones(1, 1), "bias": torch.ones(1)})
        >>> torch.equal(s2.with_ema_params().params["weight"], tk.optim.ema_params(s2.opt_state)["weight"])
        True
        """
        ema = _optim.ema_params(self.opt_state)
        return self.replace(params={n: t.detach().clone().requires_grad_(self.params[n].requires_grad) for n, t in ema.items()})

    @property
    def device(self) -> torch.device:
        """The device of the first parameter (CPU for a model without parameters)."""
        for t in self.params.values():
            return t.device
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> "TrainState":
        """A copy of the state on ``device`` (params, buffers, optimizer state, slots), new tensors even on the same device."""
        return _map_tensors(self, lambda t: t.to(device, copy=True))

    def clone(self) -> "TrainState":
        """A copy with new tensors: donating the copy leaves ``self`` intact.

        >>> import torch, trainkit as tk
        >>> s = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1))
        >>> s.clone().params["weight"] is s.params["weight"]
        False
        """
        return _map_tensors(self, lambda t: t.clone())

    def __repr__(self) -> str:
        n = sum(t.numel() for t in self.params.values())
        return (
            f"TrainState(step={self.step}, params={len(self.params)} tensors/{n:,} values, "
            f"buffers={len(self.buffers)}, lr={_lr_or_none(self.opt_state)}, slots={sorted(self.slots)})"
        )


_FIELDS = {f.name for f in dataclasses.fields(TrainState)}
_CHILDREN = ("step", "params", "buffers", "opt_state", "rng", "slots")


def _lr_or_none(opt_state: Any) -> float | None:
    try:
        return _optim.get_lr(opt_state)
    except ValueError:
        return None


def _flatten(s: TrainState) -> tuple[list[Any], Any]:
    return [getattr(s, k) for k in _CHILDREN], (s.module, s.tx)


def _unflatten(children: Any, context: Any) -> TrainState:
    module, tx = context
    return TrainState(*children, module=module, tx=tx)


pytree.register_pytree_node(
    TrainState,
    _flatten,
    _unflatten,
    serialized_type_name="trainkit.TrainState",
    flatten_with_keys_fn=lambda s: ([(pytree.GetAttrKey(k), getattr(s, k)) for k in _CHILDREN], (s.module, s.tx)),
)


def _map_tensors(state: TrainState, fn: Any) -> TrainState:
    def f(t: Any) -> Any:
        if isinstance(t, Tensor):
            out = fn(t.detach())
            return out.requires_grad_(t.requires_grad)
        return t

    return pytree.tree_map(f, state)


# What the skeleton carries for its calls, in its own __dict__ (never on the user's module):
# one binder per thread (a threading.local, freed with the skeleton) and, for tk.jit, the
# two mode copies that compiled steps call. The skeleton is held only by the states, so
# all of it (and the tensors a binder last bound) goes when the last state does.
_BINDERS_ATTR = "_trainkit_binders"
_TRACED_ATTR = "_trainkit_traced"


def _binder(skeleton: nn.Module) -> _Binder:
    local = skeleton.__dict__.get(_BINDERS_ATTR)
    if local is None:
        local = threading.local()
        object.__setattr__(skeleton, _BINDERS_ATTR, local)
    binder = getattr(local, "binder", None)
    if binder is None:
        binder = local.binder = _Binder(skeleton)
    return binder


def traced_module(skeleton: nn.Module, train: bool) -> nn.Module:
    """The copy of the state's skeleton that a compiled step calls, in one mode (for ``tk.jit``).

    Its tensors are on the meta device (functional_call swaps in the state's), and each
    copy stays in one mode, ``(eval_copy, train_copy)[train]``, so a mode switch never
    recompiles. Kept in the skeleton's ``__dict__`` (dynamo guards on that, not on a side
    table), so it is no submodule and adds nothing to ``named_parameters()``.
    """
    copies = skeleton.__dict__.get(_TRACED_ATTR)
    if copies is None:
        copies = tuple(_meta_copy(skeleton).train(mode) for mode in (False, True))
        object.__setattr__(skeleton, _TRACED_ATTR, copies)
    return copies[train]


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are on the meta device (no memory),
    without what trainkit keeps in a skeleton's ``__dict__``."""
    memo: dict[int, Any] = {}
    for t in (*module.parameters(), *module.buffers()):
        # torch.empty, not empty_like: empty_like of a meta tensor runs torch._refs, whose first call
        # imports sympy (seconds); the skeleton needs shapes and dtypes only
        meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    for attr in (_BINDERS_ATTR, _TRACED_ATTR):
        if attr in module.__dict__:
            memo[id(module.__dict__[attr])] = None
    return copy.deepcopy(module, memo)


def to_module(state: TrainState) -> nn.Module:
    """A new ``nn.Module`` holding the state's params and buffers (copies), for inference or export.

    The module is built from the state's skeleton (the architecture given to
    :meth:`TrainState.create`), on the state's device, in eval mode; tied weights stay tied.

    >>> import torch, trainkit as tk
    >>> model = torch.nn.Linear(2, 1)
    >>> state = tk.TrainState.create(model, tk.optim.sgd(0.1))
    >>> state = state.apply_gradients({"weight": torch.ones(1, 2), "bias": torch.ones(1)})
    >>> trained = tk.to_module(state)
    >>> torch.equal(trained.weight, state.params["weight"]), torch.equal(model.weight, trained.weight)
    (True, False)
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"to_module: expected a TrainState, got {type(state).__name__}.")
    module = _meta_copy(state.module)
    made: dict[str, Tensor] = {}
    for slots, tensors, is_param in (
        (_slots(module, module.named_parameters(remove_duplicate=False), module.named_parameters()), state.params, True),
        (_slots(module, module.named_buffers(remove_duplicate=False), module.named_buffers()), state.buffers, False),
    ):
        for mod, attr, name in slots:
            t = made.get(name)
            if t is None:
                src = tensors[name].detach().clone()
                t = made[name] = nn.Parameter(src, src.is_floating_point()) if is_param else src
            (mod._parameters if is_param else mod._buffers)[attr] = t
    return module.eval()


def _raise_grads_mismatch(params: Mapping[str, Tensor], grads: Any) -> None:
    if not isinstance(grads, Mapping):
        raise TypeError(
            f"apply_gradients: grads must be a dict like state.params, got {type(grads).__name__}. "
            "Use the grads returned by trainkit.value_and_grad(loss_fn)(state.params)."
        )
    missing = sorted(set(params) - set(grads))
    extra = sorted(set(grads) - set(params))
    wrong = [
        f"{n}: grad {tuple(getattr(grads[n], 'shape', ()))} vs param {tuple(params[n].shape)}"
        for n in params
        if n in grads and (not isinstance(grads[n], Tensor) or grads[n].shape != params[n].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if extra:
        parts.append(f"unexpected {extra}")
    if wrong:
        parts.append("wrong shapes " + "; ".join(wrong))
    raise ValueError(
        "apply_gradients: the gradient tree does not match the params: "
        + ", ".join(parts)
        + ". Differentiate with respect to the whole state.params dict."
    )
