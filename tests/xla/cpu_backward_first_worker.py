"""Run in a process of its own by test_cpu_backward_first.py: a CPU backward pass first, then xla_sharded steps.

Torch's autograd engine sizes its per-device queues once, at the first backward of the process, and
torch_xla reports 0 devices until its runtime starts; this process is in that state from its first line
on. Prints one JSON line for the test to read; any failure exits non-zero with its traceback.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("CPU_NUM_DEVICES", "4")

import torch  # noqa: E402
import torch_xla  # noqa: E402
from test_xla_sharded import batches, cpu, mlp, plain_pytorch, train_step  # noqa: E402  (this folder is sys.path[0])

import trainkit as tk  # noqa: E402


def bare_xla_backward_fails() -> bool:
    """Whether a plain XLA backward outside the step (on autograd's device threads) hits the engine's assert."""
    w = torch.ones(2, device=torch_xla.device(), requires_grad=True)
    try:
        (w * 2).sum().backward()
    except RuntimeError as e:
        return "device_ready_queues_" in str(e)
    return False


def main() -> None:
    data = batches(3)
    runtime_before = torch_xla._XLAC._xla_runtime_is_initialized()
    expected = plain_pytorch(data)  # the first backward of this process: plain torch, on the CPU
    step = tk.xla_sharded(train_step, params="fsdp")
    state = tk.TrainState.create(mlp(), tk.optim.adam(1e-2))
    for b in data:
        state, metrics = step(state, b)
    tk.testing.assert_trees_close(cpu(state.params), expected, rtol=1e-5, atol=1e-5)
    print(json.dumps({"runtime_before": runtime_before, "step": int(state.step),
                      "loss": float(metrics["loss"].cpu()), "bare_fails": bare_xla_backward_fails()}))


if __name__ == "__main__":
    main()
