"""trainkit: pure training steps for PyTorch, and transforms that turn them into the step you need.

    state = tk.TrainState.create(model, tk.optim.adam(1e-3))
    step = tk.compose(tk.mixed_precision(dtype=torch.bfloat16))(train_step)
    state, history = tk.fit(step, state, train_loader, epochs=10, eval_step=eval_step, val_loader=val_loader)

The transforms are imported on first use, so ``import trainkit`` stays cheap and
torch_xla or torch.distributed load only when a step asks for them.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import contract, debug, dist, metrics, optim, rng
from .checkpoint import Checkpointer, CheckpointError, load, load_hparams, load_module, load_params, save
from .contract import EpochData, gauges, is_epoch_step
from .functional import (
    StepContext,
    StepHook,
    current_context,
    donating,
    grad,
    hooked,
    hooks,
    is_donating,
    use_context,
    value_and_grad,
)
from .loggers import CSVLogger, JSONLLogger, TensorBoardLogger, read_scalars
from .predict import predict
from .run import RunPosition, epoch_step, evaluate, fit, should_stop
from .state import TrainState, to_module
from .transforms import applied_transforms, compose

__version__ = "0.1.0"

# name -> module that defines it (imported lazily, on first attribute access)
_LAZY = {
    "mixed_precision": "trainkit.transforms.mixed_precision",
    "early_stop": "trainkit.transforms.early_stop",
    "reduce_on_plateau": "trainkit.transforms.reduce_on_plateau",
    "lr_range_test": "trainkit.transforms.lr_range_test",
    "find_lr": "trainkit.transforms.lr_range_test",
    "LRRangeResult": "trainkit.transforms.lr_range_test",
    "data_parallel": "trainkit.transforms.data_parallel",
    "distributed": "trainkit.transforms.distributed",
    "xla_sharded": "trainkit.transforms.xla_sharded",
    "shard_state": "trainkit.transforms.distributed",
    "gather_state": "trainkit.transforms.distributed",
    "ShardedCheckpointer": "trainkit.sharded_checkpoint",
    "load_sharded": "trainkit.sharded_checkpoint",
    "jit": "trainkit.transforms.jit",
    "testing": "trainkit.testing",
    "bench": "trainkit.bench",
    "data": "trainkit.data",
}


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'trainkit' has no attribute {name!r}")
    module = importlib.import_module(target)
    value = module if target.endswith("." + name) and not hasattr(module, name) else getattr(module, name, module)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "TrainState",
    "optim",
    "contract",
    "debug",
    "predict",
    "dist",
    "metrics",
    "rng",
    "value_and_grad",
    "grad",
    "StepHook",
    "StepContext",
    "hooks",
    "hooked",
    "current_context",
    "use_context",
    "to_module",
    "gauges",
    "RunPosition",
    "donating",
    "is_donating",
    "fit",
    "evaluate",
    "epoch_step",
    "EpochData",
    "is_epoch_step",
    "should_stop",
    "save",
    "load",
    "load_module",
    "load_hparams",
    "load_params",
    "Checkpointer",
    "CheckpointError",
    "TensorBoardLogger",
    "CSVLogger",
    "JSONLLogger",
    "read_scalars",
    "compose",
    "applied_transforms",
    *_LAZY,
]
