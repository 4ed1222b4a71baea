"""``TrainState``: everything a training step reads and writes, as one immutable pytree."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from . import optim as _optim
from .functional import _context

__all__ = ["TrainState"]


def _derive_seed(seed: int, step: int) -> int:
    # A counter-based seed, as JAX's fold_in: a function of (seed, step) only, so
    # the dropout masks of step k do not depend on how we got to step k.
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class _Binder:
    """Points the parameters and buffers of a private copy of a module at given tensors.

    The copy (tensors on the meta device until bound) is what eager steps call, so the
    user's module is never rebound. Re-binding only when the tensors change keeps the
    donated path (same tensors every step) as cheap as calling the module directly.
    """

    def __init__(self, user_module: nn.Module) -> None:
        self.module = module = _meta_copy(user_module)
        self.slots_p = [_split(module, n) for n, _ in module.named_parameters(remove_duplicate=False)]
        self.slots_b = [_split(module, n) for n, _ in module.named_buffers(remove_duplicate=False)]
        self.names_p = [n for n, _ in module.named_parameters(remove_duplicate=False)]
        self.names_b = [n for n, _ in module.named_buffers(remove_duplicate=False)]
        self.bound: tuple = ()
        self.training: bool | None = None

    def bind(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], train: bool) -> nn.Module:
        p = [params[n] for n in self.names_p]
        b = [buffers[n] for n in self.names_b]
        key = (*p, *b)
        if len(key) != len(self.bound) or any(x is not y for x, y in zip(key, self.bound)):
            for (mod, attr), t in zip(self.slots_p, p):
                mod._parameters[attr] = t
            for (mod, attr), t in zip(self.slots_b, b):
                mod._buffers[attr] = t
            self.bound = key
        if self.training is not train:
            self.module.train(train)
            self.training = train
        return self.module


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

    Static (not children): ``module`` (used as a function only: its own tensors are
    never read) and ``tx`` (the optimizer). Change a state with :meth:`replace`.

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

        The params and buffers are copies, and steps call a private copy of the
        module: training never changes or rebinds the tensors of the ``module`` you
        pass, which is from then on used as a function. (``tk.jit`` caches a
        tensor-less copy in its ``__dict__``: dynamo can guard on that, not on a side table.)

        >>> import torch, trainkit as tk
        >>> s = tk.TrainState.create(torch.nn.Linear(3, 2), tk.optim.adam(1e-3), dtype=torch.float64)
        >>> s.params["weight"].dtype, s.opt_state["count"]
        (torch.float64, 0)
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
        return cls(step=0, params=params, buffers=buffers, opt_state=opt_state, rng=seed, slots={}, module=module, tx=tx)

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
        if train and buffers and not _context().donate:
            buffers = {k: v.clone() for k, v in buffers.items()}
        if torch.compiler.is_compiling():
            # Under torch.compile the module is called through functional_call, which
            # dynamo understands, on a tensor-less copy in the mode asked for (see
            # _traced_module); the RNG is seeded outside the graph by trainkit.jit.
            module = _traced_module(self.module, bool(train))
            out = torch.func.functional_call(module, {**params, **buffers}, args, kwargs, tie_weights=False)
            return out, dict(buffers)
        module = _binder(self.module).bind(params, buffers, train)
        if not train:
            return module(*args, **kwargs), dict(buffers)
        with _seeded(self.params, _derive_seed(self.rng, self.step)):
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
        ctx = _context()
        new = {"step": self.step + 1, **changes}
        if buffers is not None:
            new["buffers"] = dict(buffers)
        if all(h.allow_update([grads[n] for n in names]) for h in ctx.hooks):
            with torch.no_grad():
                params, opt_state = _optim.apply_gradients(self.tx, grads, self.opt_state, self.params, donate=ctx.donate)
            if not ctx.donate:
                for t in params.values():
                    t.requires_grad_(t.is_floating_point())
            new["params"] = params
            new["opt_state"] = opt_state
        else:
            new["opt_state"] = _optim.skip_update(self.tx, self.opt_state)
        return self.replace(**new)

    # ------------------------------------------------------------------ conveniences
    @property
    def lr(self) -> float:
        """The learning rate of the next update (see :func:`trainkit.optim.get_lr`)."""
        return _optim.get_lr(self.opt_state)

    def with_lr(self, lr: float) -> "TrainState":
        """A state whose next update uses ``lr``; a schedule takes over again after it.

        >>> import torch, trainkit as tk
        >>> tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.adam(1e-3)).with_lr(0.5).lr
        0.5
        """
        return self.replace(opt_state=_optim.set_lr(self.opt_state, lr))

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


_BINDERS: "weakref.WeakKeyDictionary[nn.Module, _Binder]" = weakref.WeakKeyDictionary()


def _binder(module: nn.Module) -> _Binder:
    binder = _BINDERS.get(module)
    if binder is None:
        binder = _BINDERS[module] = _Binder(module)
    return binder


def _traced_module(module: nn.Module, train: bool) -> nn.Module:
    """The copy of ``module`` that a compiled step calls (trainkit.jit makes it before tracing).

    Its tensors are on the meta device (functional_call swaps in the state's), so a
    graph never depends on what an eager call bound to ``module``, and each copy stays
    in one mode: ``(eval_copy, train_copy)[train]``. Kept in ``module.__dict__``, so it
    is no submodule and adds nothing to ``named_parameters()``.
    """
    copies = module.__dict__.get("_trainkit_traced")
    if copies is None:
        copies = tuple(_meta_copy(module).train(mode) for mode in (False, True))
        object.__setattr__(module, "_trainkit_traced", copies)
    return copies[train]


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are on the meta device (no memory)."""
    memo: dict[int, Any] = {}
    for t in (*module.parameters(), *module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


class _seeded:
    """Seed the default generator(s) of the params' device for one call, then restore them."""

    __slots__ = ("seed", "cuda", "saved", "saved_cuda")

    def __init__(self, params: Mapping[str, Tensor], seed: int) -> None:
        self.seed = seed
        dev = next(iter(params.values())).device if params else torch.device("cpu")
        self.cuda = dev if dev.type == "cuda" else None

    def __enter__(self) -> None:
        # The generators are process-wide: data_parallel's replica threads take turns here.
        _SEED_LOCK.acquire()
        try:
            self.saved = torch.default_generator.get_state()
            torch.default_generator.manual_seed(self.seed)
            if self.cuda is not None:
                gen = torch.cuda.default_generators[self.cuda.index or torch.cuda.current_device()]
                self.saved_cuda = (gen, gen.get_state())
                gen.manual_seed(self.seed)
        except BaseException:
            _SEED_LOCK.release()
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            torch.default_generator.set_state(self.saved)
            if self.cuda is not None:
                gen, saved = self.saved_cuda
                gen.set_state(saved)
        finally:
            _SEED_LOCK.release()


_SEED_LOCK = threading.RLock()


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
