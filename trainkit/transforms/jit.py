"""``jit``: the whole step (forward, backward, optimizer update) compiled as one graph.

The way JAX jits a train step: ``tk.jit(step)`` hands ``step`` to ``torch.compile``
so that the loss, its gradient (``tk.value_and_grad``) and the optimizer update
(``state.apply_gradients``) become one graph with fused kernels and no Python
between them. What trainkit adds on top of ``torch.compile``:

* **No recompiles from the state.** A state's Python numbers change every step
  (``step``, the optimizer's ``count`` and ``lr``, counters in transform slots).
  ``jit`` marks them dynamic before the first trace, so a stream of same-shaped
  batches compiles once.
* **Donation.** Under :func:`trainkit.donating` (``fit`` and ``trainkit.bench``
  donate) the compiled step updates the state's buffers in place. Otherwise it
  runs the same graph on a copy of the state: the step stays pure and passes
  :func:`trainkit.testing.check_step`. ``donate=False`` never updates in place.
* **Determinism.** The RNG (dropout) is seeded outside the graph from
  ``(state.rng, state.step)``, as the eager step seeds it, so a jitted step gives
  the same result twice (graphs that draw no random numbers skip the seeding). The
  masks differ from the eager step's (inductor draws its random numbers its own
  way) unless ``options={"fallback_random": True}``; everything else agrees to
  float rounding.
* **The LR is an input.** The optimizer's LR (a Python float in the state) enters
  the graph as a 0-d tensor, so schedules and ``find_lr`` do not recompile.
* **A recompile guard**, like chex's ``assert_max_traces``: past ``max_recompiles``
  recompiles it warns (or raises, ``on_recompile="raise"``) with dynamo's reason.
* **Errors that say what to fix.** Under ``fullgraph=True`` a graph break raises
  :class:`JitError` naming what broke (``.item()``, a Python ``if`` on a tensor, a
  ``print``) and how to fix it.

Where it stands in a composition: outermost among the batch-level transforms that
compile, ``tk.compose(tk.jit(), tk.mixed_precision(dtype=torch.bfloat16))(step)``, so
the transforms inside are compiled with the step (mixed_precision outside jit works
too: the graph is traced under its autocast). Transforms that read values on the host
stand outside: ``tk.find_lr(tk.jit(step), ...)``, ``tk.early_stop(tk.epoch_step(tk.jit(step),
eval_step), ...)``. float16 loss scaling decides on the host whether to skip a step,
so it needs ``fullgraph=False``. ``data_parallel``, ``distributed`` and
``xla_sharded`` do not compose with jit (their gradient exchange, or XLA's own
compiler, cannot be inside one inductor graph): each order is rejected with a message.

**Several steps per call** (Keras' ``steps_per_execution``; in JAX, a ``lax.scan`` over
stacked batches): ``tk.jit(step, steps_per_call=K)`` compiles K steps, unrolled, into one
graph, called as ``jitted(state, batches)`` with a list of 1..K batches; it returns the state
after them and every metric stacked over the steps, shape ``(len(batches),)``. It equals K
single steps: the state's step, the optimizer's count and the schedule advance per sub-step.
The guards, wrappers and Python of a call are paid once per K steps: on a small model that
per-call cost, not the arithmetic, is most of a compiled step's time. The cases one graph
cannot hold run as single calls of the one-step graph (compiled once, beside the K-step one),
each decided before the call:

* a group shorter than K (the last of an epoch): single calls, so the same short group every
  epoch never compiles a graph of its own;
* a group whose batches differ in shape or dtype (a smaller last batch): single calls,
  whose recompiles the recompile guard reports as it does for a one-step jit;
* a step that draws random numbers (dropout): inductor seeds a graph once per call, so
  in a K-step graph sub-step ``i`` could not draw from ``(state.rng, state.step + i)`` as
  the single step does; such a step always runs as single calls (seeded per step). The
  first group of every K-step jit runs as single calls, which tells which kind the step is
  before the K-step graph is compiled.

Why unrolled, and not ``torch._higher_order_ops.scan``/``while_loop`` (a K-independent
compile): their body is traced functionally, so the ``torch.autograd.grad`` of
:func:`trainkit.value_and_grad`, the in-place donated update and the Python ints of the state
(step, count, a schedule's ``float(schedule(count))``) cannot be in it (measured in
``benchmarks/multistep.py``). The cold compile grows with K: keep K at 4-8.

The dynamo settings jit needs (``trace_autograd_ops``, the dynamic ints) are set only
while dynamo compiles one of its steps, and restored after: other ``torch.compile``
code in the process is not affected.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import types
import warnings
from typing import Any, Callable, Literal

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .. import functional as _functional
from .. import optim as _optim
from ..rng import derive_seed
from ..state import TrainState, traced_module
from ._base import mark, two_forms
from .table import check_order, not_inside_jit

__all__ = ["jit", "JitError", "RecompileWarning", "RecompileError", "JittedStep"]

_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

class JitError(RuntimeError):
    """The step could not be compiled as asked (a graph break under ``fullgraph=True``, ...)."""


class RecompileWarning(UserWarning):
    """A jitted step compiled more often than ``max_recompiles`` allows."""


class RecompileError(RuntimeError):
    """A jitted step compiled more often than ``max_recompiles`` allows (``on_recompile="raise"``)."""


def _traced(step: Callable[..., Any], state: TrainState, batch: Any) -> Any:
    return step(state, batch)


_COUNTER = itertools.count(1)


def _fresh_function(name: str) -> Callable[..., Any]:
    # torch.compile caches graphs (and counts recompiles) per code object. Each jitted
    # step gets a code object of its own, so two jitted steps never share a cache or
    # eat into each other's recompile limit, and logs name the step.
    # (Code objects compare by value: the counter keeps dynamo's per-code records apart.)
    label = "".join(c if c.isalnum() else "_" for c in name) + f"_{next(_COUNTER)}"
    names = {"co_name": f"jit_{label}"}
    if hasattr(_traced.__code__, "co_qualname"):  # Python 3.11+
        names["co_qualname"] = names["co_name"]
    code = _traced.__code__.replace(**names)
    return types.FunctionType(code, _traced.__globals__, code.co_name)


def _int_sources(state: TrainState) -> str:
    # Dynamo names the inputs of _traced L['step'], L['state'], L['batch']; the state's
    # Python ints (not bools) are marked dynamic by name, its tensors keep static shapes.
    leaves, _ = pytree.tree_flatten_with_path(state)
    names = [
        "L['state']" + pytree.keystr(path)
        for path, leaf in leaves
        if isinstance(leaf, int) and not isinstance(leaf, bool)
    ]
    return ",".join(names)


def _lr_tensor(lr: Any) -> Any:
    return torch.tensor(lr, dtype=torch.float64) if type(lr) is float else lr


def _lr_float(lr: Any) -> Any:
    return float(lr) if isinstance(lr, Tensor) else lr


def _lr_floats(opt_state: Any) -> tuple[Any, bool]:
    """``opt_state`` with its LR tensors as floats, and whether one tensor stood in two places."""
    seen: set[int] = set()
    shared = False

    def to_float(v: Any) -> Any:
        nonlocal shared
        if not isinstance(v, Tensor):
            return v
        shared = shared or id(v) in seen
        seen.add(id(v))
        return float(v)

    return _optim.map_lr(opt_state, to_float), shared


def _unshared(opt_state: Any) -> Any:
    """``opt_state`` with a copy of each LR tensor that already stood in an earlier place."""
    seen: set[int] = set()

    def distinct(v: Any) -> Any:
        if not isinstance(v, Tensor):
            return v
        if id(v) in seen:
            return v.clone()
        seen.add(id(v))
        return v

    return _optim.map_lr(opt_state, distinct)


def _check_metrics(out: Any, name: str) -> None:
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
        return  # not a step's output: the runner says what is wrong
    for k, v in out[1].items():
        if not isinstance(v, Tensor):
            raise JitError(
                f"jit: metric {k!r} of step {name!r} is a {type(v).__name__}, not a tensor: the step reads a tensor "
                "on the host (.item(), float(t), .tolist()), a sync that stalls the device every step. Return the "
                f'tensor itself, e.g. {{"{k}": loss}}; the runner reads metrics at log intervals.'
            )


def _explain_break(err: BaseException, name: str) -> str:
    text = str(err).strip()
    veto = ""
    if "skip_update" in text:
        veto = (
            "This break is in a transform's veto of the update: mixed_precision with float16 skips a step whose "
            "gradients are not finite, a decision read on the host (as GradScaler's), which one graph cannot hold. "
            "Use dtype=torch.bfloat16 (no loss scaling, so no veto), or tk.jit(step, fullgraph=False), which "
            "compiles the step in pieces around that check.\n"
        )
    return (
        f"jit: the step {name!r} cannot be compiled as one graph (fullgraph=True). torch.compile "
        f"stopped here:\n\n{text}\n\n{veto}"
        "Usual causes in a step, and their fixes:\n"
        "  * .item(), float(t), int(t), bool(t) or .tolist() of a tensor: keep metrics as tensors "
        "(the runner reads them at log intervals);\n"
        "  * a Python `if`/`while` on a tensor's value: use torch.where, or move the decision out of the step;\n"
        "  * print(), logging, numpy or other non-torch calls on tensors: do them outside the step;\n"
        "  * an optimizer from torch.optim or .backward(): use trainkit.value_and_grad and state.apply_gradients.\n"
        "Or allow graph breaks with tk.jit(step, fullgraph=False) (slower: Python runs between the pieces)."
    )


# Words in the names of the torch functions and methods that draw random numbers (the
# aten ops tagged nondeterministic_seeded, and their Python wrappers such as F.dropout).
_RANDOM_WORDS = (
    "rand", "dropout", "bernoulli", "normal", "uniform", "exponential", "multinomial", "poisson", "rrelu",
    "gamma", "cauchy", "geometric", "seed", "scaled_dot_product", "lstm", "gru", "rnn",
)  # fmt: skip
_TORCH_MODULES = ("torch", "_operator", "operator", "builtins", "math")


def _draws_random(gm: torch.fx.GraphModule) -> bool:
    """Whether a dynamo graph may draw random numbers: True unless every call is a known, non-random one."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            return True
        if node.op not in ("call_function", "call_method"):
            continue
        target = node.target
        if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            ops = [target] if isinstance(target, torch._ops.OpOverload) else [getattr(target, o) for o in target.overloads()]
            if any(torch.Tag.nondeterministic_seeded in op.tags for op in ops):
                return True
            continue
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if any(w in name.lower() for w in _RANDOM_WORDS):
            return True
        module = "" if isinstance(target, str) else (getattr(target, "__module__", None) or "")
        if not isinstance(target, str) and module.split(".")[0] not in _TORCH_MODULES:
            return True  # a custom op or an unknown callable: it may draw
    return False


def _check_outer(hooks: tuple[Any, ...], state: TrainState) -> None:
    # A scale-out transform around jit waits inside its gradient hook for the other
    # replicas: traced into a graph, that would fail, or deadlock on the compile lock.
    for h in hooks:
        if not h.traceable:
            why = not_inside_jit(h.owner) or "its hook waits on other threads or processes."
            raise JitError(f"jit: the step runs under {h.owner}, which cannot be inside one compiled graph: {why}")
    if state.device.type == "xla":
        raise JitError(f"jit: the state is on an XLA device: {not_inside_jit('xla_sharded')}")


class _Backend:
    """The ``torch.compile`` backend of one jitted step: notes whether the graph draws random
    numbers (so calls of a graph that does not skip seeding the RNG), then compiles with
    inductor (its ``mode`` and ``options`` applied as ``torch.compile`` applies them) or
    with the backend asked for."""

    def __init__(self, owner: "JittedStep", backend: Any, mode: str | None, options: dict[str, Any] | None, dynamic: bool | None) -> None:
        self.owner, self.backend = owner, backend
        self.options = dict(options or {})
        self.k_steps = False  # the K-step graph's backend (see for_k_steps)
        self.last_config: dict[str, Any] | None = None
        self.config: dict[str, Any] = {}
        if backend == "inductor":
            # Inductor's generated code asserts each input's size and stride (about 1 us each: a
            # sixth of a small step's time); dynamo's guards check the same before every call.
            self.config["size_asserts"] = False
            if mode not in (None, "default"):
                self.config.update(torch._inductor.list_mode_options(mode, dynamic))
            self.config.update(options or {})
        self.__name__ = f"trainkit_jit_{backend if isinstance(backend, str) else getattr(backend, '__name__', 'backend')}"

    def for_k_steps(self) -> "_Backend":
        """The backend of the K-step graph: the same, with inductor's C++ wrapper on CPU unless ``options`` say.

        A K-step graph launches K times the kernels of one step; its C++ wrapper launches them
        without Python between, and compiles as one file: measured on a 32-64-10 MLP, K=8,
        2 CPU threads, a cold compile of 21.4-21.7 s instead of 30.1-30.2 s, and 91-97 us a
        step instead of 105-110 (a one-step graph gains nothing from it: it stays Python).
        """
        k = copy.copy(self)
        k.config = dict(self.config)
        k.k_steps = True
        return k

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any], **_: Any) -> Callable[..., Any]:
        self.owner._draws_random = self.owner._draws_random or _draws_random(gm)
        if self.backend == "inductor":
            from torch._inductor.compile_fx import compile_fx

            config = self.config
            if self.k_steps and "cpp_wrapper" not in self.options and _all_on_cpu(example_inputs):
                config = {**config, "cpp_wrapper": True}
            self.last_config = config  # what the last graph was compiled with (tests read it)
            return compile_fx(gm, example_inputs, config_patches=config)
        inner = torch._dynamo.lookup_backend(self.backend) if isinstance(self.backend, str) else self.backend
        return inner(gm, example_inputs)


def _all_on_cpu(example_inputs: list[Any]) -> bool:
    devices = {t.device.type for t in example_inputs if isinstance(t, Tensor)}
    return devices == {"cpu"}


class _Call:
    """One call of a jitted step in flight, as the compile callbacks see it."""

    __slots__ = ("jitted", "state", "rng", "config", "compiled")

    def __init__(self, jitted: "JittedStep", state: TrainState) -> None:
        self.jitted, self.state = jitted, state
        self.rng: tuple[Any, ...] | None = None  # saved generator states while seeded
        self.config: list[tuple[Any, str, Any]] | None = None  # saved dynamo config while compiling
        self.compiled = False

    def seed(self) -> None:
        # The step's randomness is a function of (rng, step), as in the eager step;
        # the caller's RNG stream is restored after the call.
        state = self.state
        seed = derive_seed(state.rng, state.step)
        gens = [torch.default_generator]
        for t in state.params.values():
            if t.device.type == "cuda":
                gens.append(torch.cuda.default_generators[t.device.index if t.device.index is not None else torch.cuda.current_device()])
            break
        self.rng = tuple((g, g.get_state()) for g in gens)
        for g in gens:
            g.manual_seed(seed)

    def restore(self) -> None:
        if self.rng is not None:
            for g, saved in self.rng:
                g.set_state(saved)
            self.rng = None


# The calls of jitted steps in progress, innermost last.
_IN_FLIGHT: list[_Call] = []


def _on_compile_start(args: Any) -> None:
    # Dynamo is about to trace a frame. Setting its config here, rather than around every
    # call (about 20 us a call), costs nothing on the calls that hit the cache. Read at
    # trace time: torch.autograd.grad (in value_and_grad) traces into the graph instead
    # of breaking it, and the state's Python ints are dynamic from the first compile.
    if not _IN_FLIGHT:
        return
    call = _IN_FLIGHT[-1]
    if call.config is None:
        cfg, ccfg = torch._dynamo.config, torch.compiler.config
        wanted = [(cfg, "trace_autograd_ops", lambda old: True)]
        wanted.append((ccfg, "dynamic_sources", lambda old: ",".join(s for s in (old, _int_sources(call.state)) if s)))
        call.config = []
        for module, key, value in wanted:
            if hasattr(module, key):  # (an older torch may lack one: then jit says what broke)
                old = getattr(module, key)
                call.config.append((module, key, old))
                setattr(module, key, value(old))
    call.compiled = True
    if call.rng is None:
        call.seed()  # the new graph may draw: seed before it runs (tracing keeps the RNG as it finds it)


def _on_compile_end(args: Any) -> None:
    if _IN_FLIGHT and _IN_FLIGHT[-1].config is not None:
        call = _IN_FLIGHT[-1]
        for module, key, old in call.config:
            setattr(module, key, old)
        call.config = None


# Dynamo must not trace the callbacks themselves: a backward compiled lazily, inside a frame
# that runs under dynamo (a step with graph breaks, fullgraph=False), calls them there, and
# tracing one would start a nested compile that waits on the lock its caller holds (a hang).
_on_compile_start = torch._dynamo.disable(_on_compile_start, reason="trainkit.jit's compile callback")
_on_compile_end = torch._dynamo.disable(_on_compile_end, reason="trainkit.jit's compile callback")


def _install_callbacks() -> None:
    handler = torch._dynamo.callback_handler
    if _on_compile_start not in handler.start_callbacks:
        handler.register_start_callback(_on_compile_start)
        handler.register_end_callback(_on_compile_end)


_install_callbacks()


def _run_steps(step: Callable[..., Any], state: TrainState, batches: Any) -> tuple[TrainState, dict[str, Tensor]]:
    # Traced by dynamo, the loop over the list of batches unrolls: K steps in one graph.
    per_step = []
    for batch in batches:
        state, metrics = step(state, batch)
        per_step.append(metrics)
    return state, {k: torch.stack([m[k] for m in per_step]) for k in per_step[0]}


def _signature(batch: Any) -> Any:
    # What must agree between the batches of one K-step graph: the tensors' shapes and dtypes.
    if type(batch) in (tuple, list) and all(type(t) is Tensor for t in batch):  # the usual (x, y): ~1 us
        return tuple((t.shape, t.dtype) for t in batch)
    leaves, spec = pytree.tree_flatten(batch)
    return spec, tuple((t.shape, t.dtype) if isinstance(t, Tensor) else t for t in leaves)


class _Graph:
    """One compiled function of a jitted step (the one-step graph, or the K-step one) and its recompile count."""

    __slots__ = ("fn", "code", "backend", "compiled", "compiles", "reasons")

    def __init__(self, owner: "JittedStep", name: str, backend: "_Backend") -> None:
        self.fn = _fresh_function(name)
        self.backend = backend
        self.code = self.fn.__code__
        self.compiled = torch.compile(self.fn, fullgraph=owner.fullgraph, backend=backend, dynamic=owner.dynamic)
        self.compiles = 0
        self.reasons = 0  # dynamo's guard failures for this graph already recorded


class JittedStep:
    """A step compiled by :func:`jit`; call it as the step it wraps.

    ``compiles`` counts the graphs compiled so far, ``recompile_reasons`` says why
    each recompile happened (dynamo's guard failures). ``steps_per_call`` is K: with
    K > 1 it is called as ``jitted(state, batches)`` with a list of 1..K batches.
    """

    def __init__(
        self,
        step: Callable[..., Any],
        *,
        mode: str | None,
        fullgraph: bool,
        donate: bool,
        max_recompiles: int | None,
        on_recompile: str,
        backend: Any,
        dynamic: bool | None,
        options: dict[str, Any] | None,
        steps_per_call: int = 1,
    ) -> None:
        self.step = step
        self.donate = donate
        self.fullgraph = fullgraph
        self.dynamic = dynamic
        self.max_recompiles = max_recompiles
        self.on_recompile = on_recompile
        self.steps_per_call = steps_per_call
        self.recompile_reasons: list[str] = []
        self._name = getattr(step, "__name__", type(step).__name__)
        self._draws_random = False
        compiler = _Backend(self, backend, mode, options, dynamic)
        self._single = _Graph(self, self._name, compiler)
        self._multi = _Graph(self, f"{self._name}_x{steps_per_call}", compiler.for_k_steps()) if steps_per_call > 1 else None
        self._multi_step = functools.partial(_run_steps, step)  # one object: dynamo guards on it
        self._lr_cache: tuple[Any, Any] | None = None  # (opt_state handed back, the same with LR tensors)
        # CUDA graphs (reduce-overhead) overwrite their outputs at the next replay: no reuse there
        self._reuse_lr = mode not in ("reduce-overhead", "max-autotune") and not (options or {}).get("triton.cudagraphs")
        self._groups = 0  # K-step calls so far (first group: single calls, to learn whether the step draws)
        # the one-step graph's function, kept under its old names (tests and tools read them)
        self._fn, self._code, self._compiled = self._single.fn, self._single.code, self._single.compiled

    @property
    def compiles(self) -> int:
        """Graphs compiled so far, the one-step and the K-step graph together."""
        return self._single.compiles + (self._multi.compiles if self._multi is not None else 0)

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Any]]:
        if not isinstance(state, TrainState):
            raise TypeError(f"jit: the step's first argument must be a TrainState, got {type(state).__name__}.")
        if self._multi is None:
            return self._run(self._single, self.step, state, batch)
        return self._run_group(state, batch)

    def _run_group(self, state: TrainState, batches: Any) -> tuple[TrainState, dict[str, Any]]:
        k = self.steps_per_call
        if not isinstance(batches, (list, tuple)) or not 1 <= len(batches) <= k:
            got = f"{len(batches)} batches" if isinstance(batches, (list, tuple)) else type(batches).__name__
            raise ValueError(
                f"jit: a step with steps_per_call={k} takes a list of 1 to {k} batches, got {got}. "
                f"Group the batches (fit does), e.g. step(state, [batch_1, ..., batch_{k}]); for one batch, step(state, [batch])."
            )
        self._groups += 1
        if len(batches) == k and self._groups > 1 and not self._draws_random:
            first = _signature(batches[0])
            if all(_signature(b) == first for b in batches[1:]):
                return self._run(self._multi, self._multi_step, state, batches)
        # single calls: a shorter group, batches of differing shapes, a step that draws, or the first group
        per_step = []
        for b in batches:
            state, metrics = self._run(self._single, self.step, state, b)
            per_step.append(metrics)
        return state, {key: torch.stack([torch.as_tensor(m[key]) for m in per_step]) for key in per_step[0]}

    def _run(self, graph: _Graph, fn: Callable[..., Any], state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Any]]:
        ctx = _functional.current_context()
        if ctx.hooks or state.device.type == "xla":
            _check_outer(ctx.hooks, state)
        donated = self.donate and ctx.donate
        if not donated:
            # The same graph as the donated step, run on a copy: the caller's state is untouched.
            state = state.clone()
            ctx = dataclasses.replace(ctx, donate=True)
        traced_module(state.module, True)  # made outside the graph: tracing only looks it up
        # The LR changes every step under a schedule: as a Python float, inductor would bake it
        # into the graph and recompile for each new value (dynamo specialises a float that
        # reaches a foreach kernel); as a 0-d tensor it is an input. Walking the optimizer state
        # both ways costs about as much as the rest of this wrapper, so a donated call whose
        # optimizer state is the one the last call handed back reuses that call's tensors.
        opt_state, cached = state.opt_state, self._lr_cache
        if cached is not None and cached[0] is opt_state:
            state = state.replace(opt_state=cached[1])
        else:
            lr_state = _optim.map_lr(opt_state, _lr_tensor)
            if lr_state is not opt_state:
                state = state.replace(opt_state=lr_state)
        self._lr_cache = None
        call = _Call(self, state)
        if self._draws_random:
            call.seed()
        _IN_FLIGHT.append(call)  # what the compile callbacks read, should dynamo compile
        try:
            # the context the hook points read, while dynamo traces and where it falls back to Python
            with _functional.use_context(ctx):
                out = graph.compiled(fn, state, batch)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:
            raise JitError(_explain_break(e, self._name)) from e
        finally:
            _IN_FLIGHT.pop()
            call.restore()
        if call.compiled:
            _check_metrics(out, self._name)  # the output's structure is fixed per graph
            self._after_compile(graph)
        new_state = out[0] if type(out) is tuple and len(out) == 2 else None
        if isinstance(new_state, TrainState):  # (an update that was vetoed hands back our LR tensors too)
            tensors = new_state.opt_state
            lr_state, shared = _lr_floats(tensors)
            if lr_state is not tensors:
                out = (new_state.replace(opt_state=lr_state), out[1])
                if donated and self._reuse_lr:  # the same values, as tensors: the next donated call's input
                    # One tensor in two places (a constant LR hands back its base_lr as the lr) would
                    # be an aliased input, which dynamo guards on: a recompile. Those get copies.
                    self._lr_cache = (lr_state, _unshared(tensors) if shared else tensors)
        return out

    def _after_compile(self, graph: _Graph) -> None:
        # The recompile guard (chex's assert_max_traces): count graphs, say why a new one was needed.
        count = len(torch._dynamo.eval_frame._debug_get_cache_entry_list(graph.code))
        n, graph.compiles = count - graph.compiles, count
        if n <= 0 or graph.compiles == 1:
            return
        reasons = [str(r) for r in torch._dynamo.utils.guard_failures.get(graph.code, [])]
        new = reasons[graph.reasons :] or ["(dynamo gave no reason)"]
        graph.reasons = len(reasons)
        self.recompile_reasons.extend(new)
        if self.max_recompiles is None or graph.compiles - 1 <= self.max_recompiles:
            return
        which = "" if graph is self._single or self._multi is None else f" (its {self.steps_per_call}-step graph)"
        msg = (
            f"jit: step {self._name!r}{which} compiled {graph.compiles} times, more than 1 + max_recompiles="
            f"{self.max_recompiles}. Each compile costs seconds; the last was caused by:\n  "
            + "\n  ".join(new[-3:])
            + "\nUsual causes: batches of changing shape (drop the last partial batch: DataLoader(drop_last=True), "
            "or jit(step, dynamic=True)); a Python number passed in the batch; a new transform slot. "
            "Raise max_recompiles if this is expected."
        )
        if self.on_recompile == "raise":
            raise RecompileError(msg)
        warnings.warn(msg, RecompileWarning, stacklevel=4)

    def __repr__(self) -> str:
        k = f", steps_per_call={self.steps_per_call}" if self.steps_per_call > 1 else ""
        return f"jit({self._name}{k}, compiles={self.compiles})"


def jit(
    step: Callable[..., Any] | None = None,
    *,
    mode: Literal[None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = None,
    fullgraph: bool = True,
    donate: bool = True,
    max_recompiles: int | None = 4,
    on_recompile: Literal["warn", "raise"] = "warn",
    backend: Any = "inductor",
    dynamic: bool | None = None,
    options: dict[str, Any] | None = None,
    steps_per_call: int = 1,
) -> Any:
    """Compile ``step`` whole (forward, backward, optimizer update) with ``torch.compile``.

    Args:
      step: a batch step ``(state, batch) -> (state, metrics)`` written with
        :func:`trainkit.value_and_grad` and :meth:`TrainState.apply_gradients`.
        Leave it out to get a transform for :func:`trainkit.compose`.
      mode: ``torch.compile``'s mode; ``"reduce-overhead"`` uses CUDA graphs on a GPU.
      fullgraph: one graph or an error (:class:`JitError`, saying what broke and how
        to fix it). ``False`` lets ``torch.compile`` split the step at graph breaks.
      donate: under :func:`trainkit.donating` (as ``fit`` runs steps), update the
        state's tensors in place. ``False``: never in place; the step always copies.
      max_recompiles: how many recompiles (compiles after the first) to allow before
        warning or raising; ``None`` for no limit.
      on_recompile: ``"warn"`` (:class:`RecompileWarning`) or ``"raise"`` (:class:`RecompileError`).
      backend: ``torch.compile``'s backend; ``"aot_eager"`` or ``"eager"`` compile in
        a blink and help to find a graph break or to test without inductor.
      dynamic: ``torch.compile``'s ``dynamic`` (``None``: static shapes, dynamic after a
        shape changes). The state's Python numbers are dynamic whatever this says.
      options: inductor options, as ``torch.compile``'s. ``{"fallback_random": True}``
        draws random numbers (dropout) as the eager step does, so the jitted step
        equals the eager one with dropout too (the default is inductor's faster RNG).
        jit sets ``size_asserts=False`` (dynamo's guards already check every input's
        sizes and strides); ``{"size_asserts": True}`` puts inductor's checks back.
      steps_per_call: K, the steps one call runs (Keras' ``steps_per_execution``, a JAX
        ``lax.scan`` over batches). With K > 1 the jitted step is called as
        ``jitted(state, batches)`` with a list of 1..K batches and returns the state after
        them and each metric stacked over the steps, shape ``(len(batches),)``; it equals
        ``len(batches)`` single steps (step count, schedules). ``fit`` groups the batches by
        it. A shorter group, a group of batches of differing shapes and a step that draws
        random numbers run as single calls of the one-step graph (see the module's notes).

    Returns:
      a :class:`JittedStep` (the compiled step, with ``compiles`` and
      ``recompile_reasons``), or a transform when ``step`` is left out.

    Raises:
      TypeError / ValueError at wrap time for a bad argument or an epoch-level step;
      :class:`JitError` at the first call for a graph break under ``fullgraph=True``.

    >>> import torch, trainkit as tk
    >>> from trainkit.demo import CNN, train_step
    >>> state = tk.TrainState.create(CNN(width=4, dropout=0.0), tk.optim.adam(1e-3))
    >>> fast = tk.jit(train_step, backend="aot_eager")  # inductor, the default, compiles in seconds
    >>> batch = (torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    >>> s1, m1 = fast(state, batch)
    >>> s2, m2 = train_step(state, batch)
    >>> tk.testing.assert_trees_close(s1.params, s2.params, rtol=1e-5, atol=1e-6)
    >>> s1.step, fast.compiles, tk.applied_transforms(fast)
    (1, 1, ('jit',))

    Four steps per call, over a list of batches:

    >>> four = tk.jit(train_step, backend="aot_eager", steps_per_call=4)
    >>> s4, m4 = four(state, [batch] * 4)
    >>> s4.step, m4["loss"].shape
    (4, torch.Size([4]))
    """
    if mode not in _MODES:
        raise ValueError(f"jit: mode must be one of {list(_MODES)}, got {mode!r}.")
    for name, v in (("fullgraph", fullgraph), ("donate", donate)):
        if not isinstance(v, bool):
            raise TypeError(f"jit: {name} must be True or False, got {v!r}.")
    if max_recompiles is not None and (not isinstance(max_recompiles, int) or isinstance(max_recompiles, bool) or max_recompiles < 0):
        raise ValueError(f"jit: max_recompiles must be an int >= 0 or None, got {max_recompiles!r}.")
    if not isinstance(steps_per_call, int) or isinstance(steps_per_call, bool) or steps_per_call < 1:
        raise ValueError(f"jit: steps_per_call must be an int >= 1 (the steps one call runs), got {steps_per_call!r}.")
    if on_recompile not in ("warn", "raise"):
        raise ValueError(f'jit: on_recompile must be "warn" or "raise", got {on_recompile!r}.')
    if not (isinstance(backend, str) or callable(backend)):
        raise TypeError(f"jit: backend must be a torch.compile backend name or callable, got {type(backend).__name__}.")
    if (mode not in (None, "default") or options) and backend != "inductor":
        raise ValueError(f"jit: mode and options are inductor's; they need backend='inductor', got {backend!r}.")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"jit: options must be a dict of inductor options, got {type(options).__name__}.")
    if options:
        known = torch._inductor.config.get_config_copy()
        unknown = sorted(k for k in options if k.replace("-", "_") not in known)
        if unknown:
            raise ValueError(f"jit: unknown inductor option(s) {unknown}; see torch._inductor.config (e.g. 'fallback_random').")

    def make(step: Callable[..., Any]) -> JittedStep:
        check_order("jit", step)
        jitted = JittedStep(
            step,
            mode=mode,
            fullgraph=fullgraph,
            donate=donate,
            max_recompiles=max_recompiles,
            on_recompile=on_recompile,
            backend=backend,
            dynamic=dynamic,
            options=options,
            steps_per_call=steps_per_call,
        )
        return mark(jitted, step, "jit")

    return two_forms(step, "jit", make)
