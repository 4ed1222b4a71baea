"""``xla_sharded``: the step on XLA devices (TPUs, or CPU devices for tests) with torch_xla SPMD.

One program over a device mesh (GSPMD, as ``jax.jit`` with shardings): the batch
is sharded on the mesh's data axis, the parameters are replicated (data
parallelism) or sharded on that axis too (``params="fsdp"``, ZeRO-3 style: each
device keeps a slice of every large parameter and of its optimizer state, and the
compiler gathers them where they are used). The step is traced lazily as it runs
and executed as ONE compiled graph per call (``torch_xla.sync()``); the metrics stay
on the device, so the runner's reads at ``log_every`` are the only host syncs.

Requirements: ``pip install 'trainkit[xla]'`` (torch 2.9.0 with torch_xla 2.9.0, in
their own environment: torch_xla only works beside the torch it was built for), and
``PJRT_DEVICE`` set (``TPU``, or ``CPU`` with ``CPU_NUM_DEVICES=4`` for 4 CPU devices).
Wrapping a step turns SPMD on for the whole process (``torch_xla.runtime.use_spmd()``),
before any XLA tensor is made.

What it does with the state: a state that is not on the XLA device yet (e.g. made
on the CPU) is moved there on the first call; the state returned lives on the XLA
device. Dropout draws from the XLA generator, seeded from ``(state.rng, state.step)``
each call, so a step is deterministic. An ``eval_step`` passed to :func:`trainkit.fit`
is not wrapped: move its batch to ``state.device`` there (``x.to(state.device)``).

Autograd inside the step runs on the calling thread (``torch.autograd.set_multithreading_enabled(False)``
for the call), so a process that ran a CPU backward first (a reference loop, another test) still
trains: torch's autograd engine sizes its per-device queues at the first backward of the process,
and an XLA backward on its device threads would then fail with ``INTERNAL ASSERT FAILED ...
device_ready_queues_`` (pytorch/xla#4174). An XLA backward of your own outside the step fails
the same way in such a process: run it under ``torch.autograd.set_multithreading_enabled(False)`` too.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ..contract import check_step_output
from ..rng import derive_seed
from ..state import TrainState
from ._base import mark, two_forms
from .table import check_order

__all__ = ["xla_sharded"]

_MODES = ("replicated", "fsdp")
_INSTALL = (
    "xla_sharded needs torch_xla, which is not installed here. Install it in its own environment: "
    "pip install 'trainkit[xla]' (torch==2.9.0 with torch_xla==2.9.0; torch_xla fails to import beside "
    "any other torch), and set PJRT_DEVICE=TPU (or PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 to test on the CPU)."
)


def _import_xla() -> Any:
    try:
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    return torch_xla, xm, xs, xr


def _spec(shape: torch.Size, mesh: Any, axis: str, sharded: bool) -> tuple[Any, ...]:
    """The partition spec of a tensor: replicated, or its first dimension the data axis divides."""
    dims: list[Any] = [None] * len(shape)
    if sharded:
        n = mesh.mesh_shape[mesh.axis_names.index(axis)]
        for i, size in enumerate(shape):
            if size >= n and size % n == 0:
                dims[i] = axis
                break
    return tuple(dims)


def xla_sharded(
    step: Callable[..., Any] | None = None,
    *,
    mesh: Any = None,
    data_axis: str = "data",
    params: str = "replicated",
) -> Any:
    """Run ``step`` as one SPMD program over a mesh of XLA devices: the batch sharded, params replicated or FSDP.

    Args:
      step: a batch step ``(state, batch) -> (state, metrics)`` (unchanged: it runs on
        lazy XLA tensors). Omit it to get a transform for :func:`trainkit.compose`.
      mesh: a ``torch_xla.distributed.spmd.Mesh``; ``None`` takes the global mesh if one
        is set (``xs.set_global_mesh``), else all devices on one axis named ``data_axis``.
      data_axis: the mesh axis the batch's first dimension is sharded over.
      params: ``"replicated"`` (every device holds all params: data parallelism) or
        ``"fsdp"`` (each param, and the optimizer state shaped like it, sharded on its
        first dimension divisible by the data axis size; smaller ones replicated).

    Returns:
      The wrapped step. Each call moves the batch to the XLA device (tensors already
      there and sharded, e.g. from ``MpDeviceLoader(..., input_sharding=...)``, are left
      as they are), marks its shardings, runs the step, and executes the traced graph
      once with ``torch_xla.sync()``. The params equal plain PyTorch's on the whole batch
      (up to float rounding); the metrics are device tensors.

    Raises:
      ImportError naming ``pip install 'trainkit[xla]'`` when torch_xla is missing;
      ValueError/TypeError for bad arguments, a mesh without ``data_axis``, an epoch
      step, or another parallel transform inside.

    >>> import trainkit as tk
    >>> tk.xla_sharded(params="zero3")
    Traceback (most recent call last):
    ...
    ValueError: xla_sharded: params must be 'replicated' or 'fsdp', got 'zero3'.

    With torch_xla installed (``PJRT_DEVICE=CPU CPU_NUM_DEVICES=4`` gives 4 devices):

    >>> step = tk.xla_sharded(train_step, params="fsdp")  # doctest: +SKIP
    >>> state, history = tk.fit(step, state, loader, epochs=3)  # doctest: +SKIP
    """
    if params not in _MODES:
        raise ValueError(f"xla_sharded: params must be 'replicated' or 'fsdp', got {params!r}.")
    if not isinstance(data_axis, str) or not data_axis:
        raise TypeError(f"xla_sharded: data_axis must be the name of a mesh axis (a str), got {data_axis!r}.")
    torch_xla, xm, xs, xr = _import_xla()
    if mesh is not None and not isinstance(mesh, xs.Mesh):
        raise TypeError(f"xla_sharded: mesh must be a torch_xla.distributed.spmd.Mesh, got {type(mesh).__name__}.")
    if mesh is not None and data_axis not in (mesh.axis_names or ()):
        raise ValueError(
            f"xla_sharded: the mesh has axes {mesh.axis_names}, not data_axis={data_axis!r}. "
            f"Name the axis to shard the batch over, e.g. xla_sharded(step, mesh=mesh, data_axis={(mesh.axis_names or ('data',))[0]!r})."
        )

    def make(inner: Callable[..., Any]) -> Callable[..., Any]:
        check_order("xla_sharded", inner)
        if not xr.is_spmd():
            xr.use_spmd()  # process-wide, and before any XLA tensor exists
        the_mesh = mesh
        if the_mesh is None:
            the_mesh = xs.get_global_mesh()
            if the_mesh is None or data_axis not in (the_mesh.axis_names or ()):
                import numpy as np

                n = xr.global_runtime_device_count()
                the_mesh = xs.Mesh(np.arange(n), (n,), (data_axis,))
        device = torch_xla.device()
        fsdp = params == "fsdp"
        param_shapes: set[tuple[int, ...]] = set()

        def annotate(t: Tensor, spec: tuple[Any, ...]) -> None:
            if t.dim() and torch_xla._XLAC._get_xla_sharding_spec(t) == "":
                xs.mark_sharding(t, the_mesh, spec)

        def to_device(tensors: list[Tensor], specs: list[tuple[Any, ...]]) -> list[Tensor]:
            if len(the_mesh.mesh_shape) == 1:
                # Straight to their shards (what MpDeviceLoader does), not replicated first and resharded.
                shardings = [xs.ShardingSpec(the_mesh, spec).xla_spec(t) for t, spec in zip(tensors, specs, strict=True)]
                cpu = [t.detach().contiguous() for t in tensors]
                return torch_xla._XLAC._xla_tensors_from_aten(cpu, [str(device)] * len(tensors), shardings)
            # torch_xla 2.9 cannot slice a partially replicated sharding on the host: move, then mark.
            out = [t.detach().to(device) for t in tensors]
            for t, spec in zip(out, specs, strict=True):
                annotate(t, spec)
            return out

        def spec_of(t: Tensor) -> tuple[Any, ...]:
            return _spec(t.shape, the_mesh, data_axis, fsdp and tuple(t.shape) in param_shapes)

        def place_state(state: TrainState) -> TrainState:
            param_shapes.update(tuple(p.shape) for p in state.params.values())
            leaves, spec = pytree.tree_flatten((state.params, state.buffers, state.opt_state, state.slots))
            cpu = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.device.type != "xla"]
            if cpu:
                moved = to_device([leaves[i] for i in cpu], [spec_of(leaves[i]) for i in cpu])
                for i, t in zip(cpu, moved, strict=True):
                    leaves[i] = t.requires_grad_(leaves[i].requires_grad)
                params, buffers, opt_state, slots = pytree.tree_unflatten(leaves, spec)
                state = state.replace(params=params, buffers=buffers, opt_state=opt_state, slots=slots)
            pin(state)
            return state

        def pin(state: TrainState) -> None:
            # Every tensor of the state gets an explicit sharding (replicated ones too), so the
            # compiled graph does not depend on what the previous execution left unsaid.
            for t in pytree.tree_leaves((state.params, state.buffers, state.opt_state)):
                if isinstance(t, Tensor):
                    annotate(t, spec_of(t))

        def place_batch(batch: Any) -> Any:
            leaves, spec = pytree.tree_flatten(batch)
            cpu = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.device.type != "xla"]
            if cpu:
                specs = [(data_axis,) + (None,) * (leaves[i].dim() - 1) if leaves[i].dim() else () for i in cpu]
                for i, t in zip(cpu, to_device([leaves[i] for i in cpu], specs), strict=True):
                    leaves[i] = t
            for t in leaves:
                if isinstance(t, Tensor) and t.dim():
                    annotate(t, (data_axis,) + (None,) * (t.dim() - 1))
            return pytree.tree_unflatten(leaves, spec)

        def xla_sharded_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Any]]:
            if not isinstance(state, TrainState):
                raise TypeError(f"xla_sharded: state must be a TrainState, got {type(state).__name__}.")
            state = place_state(state)
            batch = place_batch(batch)
            xm.set_rng_state(derive_seed(state.rng, state.step) % (1 << 63), device=str(device))
            # The backward runs on this thread, not on autograd's per-device worker: the engine sizes its
            # device queues once, at the process's first backward, when torch_xla still reports 0 devices
            # (its runtime starts later; under SPMD torch_xla.device() does not start it either), so after
            # any CPU backward an XLA one on a worker fails with "INTERNAL ASSERT FAILED ...
            # device_ready_queues_" (pytorch/xla#4174). On this thread it only traces: measured as fast.
            with torch.autograd.set_multithreading_enabled(False):
                new_state, metrics = check_step_output(inner(state, batch), "xla_sharded: step")
            pin(new_state)  # the outputs keep the inputs' shardings, so the next call reuses this graph
            torch_xla.sync()  # the whole step, traced above, runs here as one graph
            return new_state, metrics

        return mark(xla_sharded_step, inner, "xla_sharded")

    return two_forms(step, "xla_sharded", make)
