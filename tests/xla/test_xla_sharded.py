"""xla_sharded on 4 real XLA CPU devices (PJRT_DEVICE=CPU CPU_NUM_DEVICES=4), SPMD, against plain PyTorch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.debug.metrics as met
import torch_xla.distributed.spmd as xs
import torch_xla.runtime as xr
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trainkit as tk

pytestmark = pytest.mark.xla
N_STEPS = 5


def mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def train_step(state, batch):
    x, y = batch

    def loss_fn(p):
        logits, buffers = state.apply(p, x, train=True)
        return F.cross_entropy(logits, y), (logits, buffers)

    (loss, (logits, buffers)), grads = tk.value_and_grad(loss_fn, has_aux=True)(state.params)
    acc = (logits.argmax(-1) == y).float().mean()
    return state.apply_gradients(grads, buffers=buffers), {"loss": loss, "acc": acc}


def eval_step(state, batch):
    x, y = (t.to(state.device) for t in batch)
    return {"loss": F.cross_entropy(state.apply(None, x)[0], y)}


def batches(n: int = N_STEPS, size: int = 16) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 8, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(n)]


def plain_pytorch(data: list, lr: float = 1e-2) -> dict[str, torch.Tensor]:
    """The hand-written loop: nn.Module, torch.optim.Adam, on the CPU."""
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


def cpu(tree):
    return {k: v.detach().cpu() for k, v in tree.items()}


@pytest.mark.parametrize("params", ["replicated", "fsdp"])
def test_params_equal_plain_pytorch_after_n_steps_on_4_devices(params):
    assert xr.global_runtime_device_count() == 4
    step = tk.xla_sharded(train_step, params=params)
    state = tk.TrainState.create(mlp(), tk.optim.adam(1e-2))  # on the CPU: the transform moves it
    data = batches()
    for b in data:
        state, metrics = step(state, b)
    assert state.device.type == "xla" and state.step == N_STEPS
    tk.testing.assert_trees_close(cpu(state.params), plain_pytorch(data), rtol=1e-5, atol=1e-5)
    specs = {k: torch_xla._XLAC._get_xla_sharding_spec(v) for k, v in state.params.items()}
    if params == "fsdp":  # every param here has a dimension that 4 divides: all sharded, and still after N updates
        assert all("devices=[4" in s for s in specs.values()), specs
        mu = tk.optim.find_state(state.opt_state, "mu")  # Adam's first moments, by param name: sharded as the params
        assert mu.keys() == state.params.keys()
        assert all("devices=[4" in torch_xla._XLAC._get_xla_sharding_spec(m) for m in mu.values())
    else:
        assert not any("devices=[4" in s for s in specs.values()), specs


def test_batch_is_sharded_on_the_data_axis_of_a_2x2_mesh():
    mesh = xs.Mesh(np.arange(4), (2, 2), ("data", "model"))
    seen = {}

    def spy(state, batch):
        seen["spec"] = torch_xla._XLAC._get_xla_sharding_spec(batch[0])
        return train_step(state, batch)

    state = tk.TrainState.create(mlp(), tk.optim.adam(1e-2))
    data = batches(2)
    for b in data:
        state, _ = tk.xla_sharded(spy, mesh=mesh, data_axis="data")(state, b)
    assert "devices=[2,1,2]" in seen["spec"], seen  # rows split over 'data', replicated over 'model'
    tk.testing.assert_trees_close(cpu(state.params), plain_pytorch(data), rtol=1e-5, atol=1e-5)


def test_one_graph_per_call_no_recompiles_no_host_reads():
    step = tk.xla_sharded(train_step, params="fsdp")
    state = tk.TrainState.create(mlp(), tk.optim.adam(1e-2))
    data = batches(8)
    with tk.donating():
        for b in data[:3]:  # warm-up: the first calls compile
            state, m = step(state, b)
        xm.wait_device_ops()  # executions are asynchronous: count them once they ran
        before = {k: met.counter_value(k) or 0 for k in ("ExecuteReplicated", "UncachedCompile")}
        transfers = (met.metric_data("TransferFromDeviceTime") or (0,))[0]
        for b in data[3:]:
            state, m = step(state, b)
        xm.wait_device_ops()
        after = {k: met.counter_value(k) or 0 for k in ("ExecuteReplicated", "UncachedCompile")}
        assert after["ExecuteReplicated"] - before["ExecuteReplicated"] == 5  # one graph per call
        # Changing LR, step count, batches: no recompiles. (The backward runs on the caller's thread: on
        # autograd's XLA worker thread it could still hold a gradient when sync ran, a second graph in 3 of 6 runs.)
        assert after["UncachedCompile"] - before["UncachedCompile"] == 0
        assert (met.metric_data("TransferFromDeviceTime") or (0,))[0] == transfers  # metrics stay on the device
    assert m["loss"].device.type == "xla" and torch.isfinite(m["loss"].cpu())


def test_passes_check_step_with_dropout():
    state = tk.TrainState.create(mlp(dropout=0.3), tk.optim.sgd(0.1))
    state = tk.xla_sharded(lambda s, b: (s, {}))(state, batches(1)[0])[0]  # onto the device first
    new, metrics = tk.testing.check_step(tk.xla_sharded(train_step), state, batches(1)[0])
    assert new.step == 1 and new.device.type == "xla"


def test_fit_runs_an_xla_sharded_step_end_to_end():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(96, 8, generator=g), torch.randint(0, 4, (96,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)
    state = tk.TrainState.create(mlp(), tk.optim.adam(1e-2))
    got, history = tk.fit(tk.xla_sharded(train_step, params="fsdp"), state, train, epochs=3, eval_step=eval_step,
                          val_loader=val, log_every=4, progress=False)
    expected, expected_history = tk.fit(train_step, state, train, epochs=3, eval_step=eval_step, val_loader=val, progress=False)
    assert got.device.type == "xla" and got.step == 18 and state.device.type == "cpu"
    tk.testing.assert_trees_close(cpu(got.params), cpu(expected.params), rtol=1e-5, atol=1e-5)
    for a, b in zip(history, expected_history, strict=True):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a), (a, b)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_composes_with_early_stop():
    early_stop = pytest.importorskip("trainkit.transforms.early_stop").early_stop
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x, y), batch_size=16)
    state = tk.TrainState.create(mlp(), tk.optim.sgd(0.0))  # lr 0: val_loss never improves
    epoch = early_stop(tk.epoch_step(tk.xla_sharded(train_step), eval_step), monitor="val_loss", patience=2)
    new, history = tk.fit(epoch, state, train, epochs=10, val_loader=val, progress=False)
    assert len(history) == 3 and tk.should_stop(new)


def test_composes_with_mixed_precision_bf16():
    mixed_precision = pytest.importorskip("trainkit.transforms.mixed_precision").mixed_precision
    step = tk.compose(tk.xla_sharded(), mixed_precision(dtype=torch.bfloat16))(train_step)
    state = tk.TrainState.create(mlp(), tk.optim.adam(1e-2))
    data = batches(3)
    for b in data:
        state, m = step(state, b)
    assert state.params["0.weight"].dtype == torch.float32
    # bf16 matmuls: close to the float32 run, not equal
    tk.testing.assert_trees_close(cpu(state.params), plain_pytorch(data), rtol=0.05, atol=0.05)


def test_bad_arguments():
    with pytest.raises(ValueError, match="not data_axis='batch'"):
        tk.xla_sharded(mesh=xs.Mesh(np.arange(4), (4,), ("data",)), data_axis="batch")
    with pytest.raises(TypeError, match="Mesh"):
        tk.xla_sharded(mesh="data")
    with pytest.raises(TypeError, match="batch step"):
        tk.xla_sharded(tk.epoch_step(train_step))
    with pytest.raises(ValueError, match="already wrapped by xla_sharded"):
        tk.xla_sharded(tk.xla_sharded(train_step))
    with pytest.raises(ValueError, match="compiled by tk.jit"):
        tk.xla_sharded(tk.transforms.mark(lambda s, b: (s, {}), train_step, "jit"))
    assert copy.copy(tk.applied_transforms(tk.xla_sharded(train_step))) == ("xla_sharded",)
