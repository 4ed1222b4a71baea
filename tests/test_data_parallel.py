"""data_parallel: replicas on the CPU device (and on CUDA where there is one) equal the step on the whole batch."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trainkit as tk
from trainkit.testing import assert_trees_close, check_step

F64 = dict(rtol=1e-6, atol=1e-6)


def mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3))


def make_state(tx=None, seed: int = 0, dropout: float = 0.0, dtype=torch.float64) -> tk.TrainState:
    return tk.TrainState.create(mlp(seed, dropout), tx or tk.optim.adam(1e-2), dtype=dtype, seed=seed)


def train_step(state: tk.TrainState, batch):
    """The user's step, unchanged under every transform: a nested batch, two metrics."""
    x, y = batch["inputs"][0], batch["target"]

    def loss_fn(p):
        logits, buffers = state.apply(p, x, train=True)
        return F.cross_entropy(logits, y), (logits, buffers)

    (loss, (logits, buffers)), grads = tk.value_and_grad(loss_fn, has_aux=True)(state.params)
    acc = (logits.argmax(-1) == y).to(logits.dtype).mean()
    return state.apply_gradients(grads, buffers=buffers), {"loss": loss, "acc": acc}


def batch_of(n: int, seed: int = 1, dtype=torch.float64) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"inputs": (torch.randn(n, 5, generator=g, dtype=dtype),), "target": torch.randint(0, 3, (n,), generator=g)}


def run(step, state, batches):
    metrics = []
    for b in batches:
        state, m = step(state, b)
        metrics.append(m)
    return state, metrics


# --------------------------------------------------------------------------- equivalence


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 13), min_size=1, max_size=3), replicas=st.integers(2, 4), seed=st.integers(0, 2**16))
@example(sizes=[7, 5], replicas=3, seed=0)  # 7 = 3 + 2 + 2 and 5 = 2 + 2 + 1: uneven shards
@example(sizes=[1, 2], replicas=4, seed=1)  # fewer rows than replicas
def test_equals_the_step_on_the_whole_batch(sizes, replicas, seed):
    state = make_state(tk.optim.adam(1e-2), seed=seed % 7)
    batches = [batch_of(n, seed + i) for i, n in enumerate(sizes)]
    expected, expected_m = run(train_step, state, batches)
    dp = tk.data_parallel(train_step, devices=["cpu"] * replicas)
    got, got_m = run(dp, state, batches)
    assert_trees_close(got.params, expected.params, **F64)
    assert_trees_close(got.opt_state, expected.opt_state, **F64)
    assert got.step == expected.step == len(sizes)
    assert_trees_close(got_m, expected_m, **F64)


def test_int_devices_on_cpu_and_compose_form():
    if torch.cuda.is_available():
        pytest.skip("devices=3 means three GPUs where there are GPUs")
    state, batch = make_state(), batch_of(10)
    a = tk.compose(tk.data_parallel(devices=3))(train_step)
    assert tk.applied_transforms(a) == ("data_parallel",)
    got, _ = a(state, batch)
    expected, _ = train_step(state, batch)
    assert_trees_close(got.params, expected.params, **F64)


def test_passes_check_step_and_is_pure():
    state, batch = make_state(dropout=0.3), batch_of(9)
    new, metrics = check_step(tk.data_parallel(train_step, devices=["cpu"] * 3), state, batch)
    assert new.step == 1 and sorted(metrics) == ["acc", "loss"]


def test_one_replica_is_the_step_bit_for_bit_with_dropout():
    state, batch = make_state(dropout=0.5), batch_of(8)
    got = tk.data_parallel(train_step, devices=["cpu"])(state, batch)
    tk.testing.assert_trees_equal(got, train_step(state, batch))


def test_replicas_run_at_the_same_time():
    # Each replica waits in its loss for all three: run one after the other, they would time out.
    meet = threading.Barrier(3, timeout=20)

    def step(state, batch):
        x, y = batch

        def loss_fn(p):
            meet.wait()
            return F.mse_loss(state.apply(p, x)[0], y)

        loss, g = tk.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(g), {"loss": loss}

    state = tk.TrainState.create(nn.Linear(2, 1), tk.optim.sgd(0.1), dtype=torch.float64)
    batch = (torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64))
    new, _ = tk.data_parallel(step, devices=["cpu"] * 3)(state, batch)
    meet = threading.Barrier(1)
    expected, _ = step(state, batch)
    assert_trees_close(new.params, expected.params, **F64)


def test_fit_with_data_parallel_equals_fit_with_the_step():
    # The runner donates its state: the in-place path, over epochs of shuffled, uneven batches.
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (50,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)

    def step(state, batch):
        return train_step(state, {"inputs": (batch[0],), "target": batch[1]})

    state = make_state(tk.optim.sgd(0.1, momentum=0.9))
    expected, h1 = tk.fit(step, state, loader, epochs=2, progress=False)
    got, h2 = tk.fit(tk.data_parallel(step, devices=["cpu"] * 3), state, loader, epochs=2, progress=False)
    assert_trees_close(got.params, expected.params, **F64)
    for a, b in zip(h1, h2, strict=True):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-9 for k in a)


# --------------------------------------------------------------------------- BatchNorm policy


def test_batchnorm_buffers_are_the_shard_weighted_mean():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    state = tk.TrainState.create(model, tk.optim.sgd(0.1), dtype=torch.float64)
    batch = batch_of(11)
    got, _ = tk.data_parallel(train_step, devices=["cpu"] * 3)(state, batch)
    # What each replica computes on its own shard (sizes 4, 4, 3), then the documented policy.
    shards = [{"inputs": (batch["inputs"][0][a:b],), "target": batch["target"][a:b]} for a, b in ((0, 4), (4, 8), (8, 11))]
    alone = [train_step(state, s)[0].buffers for s in shards]
    for name in ("1.running_mean", "1.running_var"):
        expected = sum(w * b[name] for w, b in zip((4 / 11, 4 / 11, 3 / 11), alone, strict=True))
        assert_trees_close(got.buffers[name], expected, **F64)
    assert got.buffers["1.num_batches_tracked"].item() == 1
    # The running mean is exactly the whole batch's (the weighted mean of shard means is the batch mean).
    full, _ = train_step(state, batch)
    assert_trees_close(got.buffers["1.running_mean"], full.buffers["1.running_mean"], **F64)


# --------------------------------------------------------------------------- composition


def test_composes_with_mixed_precision_and_early_stop():
    mixed_precision = pytest.importorskip("trainkit.transforms.mixed_precision").mixed_precision
    early_stop = pytest.importorskip("trainkit.transforms.early_stop").early_stop
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True)
    val = DataLoader(TensorDataset(x[:20], y[:20]), batch_size=20)

    def step(state, batch):
        return train_step(state, {"inputs": (batch[0],), "target": batch[1]})

    def eval_step(state, batch):
        return {"loss": F.cross_entropy(state.apply(None, batch[0])[0], batch[1])}

    state = make_state(tk.optim.sgd(0.0), dtype=torch.float32)  # lr 0: val_loss never improves
    batch_step = tk.compose(tk.data_parallel(devices=["cpu"] * 2), mixed_precision(dtype=torch.bfloat16))(step)
    epoch = early_stop(tk.epoch_step(batch_step, eval_step), monitor="val_loss", patience=2)
    new, history = tk.fit(epoch, state, train, epochs=10, val_loader=val, progress=False)
    assert len(history) == 3 and tk.should_stop(new)  # the first evaluation, then 2 without improvement
    assert tk.applied_transforms(batch_step) == ("mixed_precision", "data_parallel")
    with pytest.raises(ValueError, match="mixed_precision must stand inside"):
        mixed_precision(tk.data_parallel(step, devices=["cpu"] * 2), dtype=torch.bfloat16)


def test_fp16_loss_scaling_inside_skips_on_every_replica_together():
    mixed_precision = pytest.importorskip("trainkit.transforms.mixed_precision").mixed_precision

    def step(state, batch):
        x, y = batch
        loss, g = tk.value_and_grad(lambda p: F.mse_loss(state.apply(p, x)[0], y))(state.params)
        return state.apply_gradients(g), {"loss": loss}

    state = tk.TrainState.create(nn.Linear(4, 1), tk.optim.sgd(0.1))
    fp16 = tk.compose(tk.data_parallel(devices=["cpu"] * 2), mixed_precision(dtype=torch.float16))(step)
    x = torch.full((6, 4), 0.1)
    x[5] = 1e4  # only the second replica's shard overflows in float16
    new, m = fp16(state, (x, torch.zeros(6, 1)))
    assert new.params["weight"].equal(state.params["weight"]) and m["skipped_steps"].item() == 1


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "devices, error, match",
    [
        (0, ValueError, "at least 1"),
        ("cpu", TypeError, "int count or a list"),
        ([], ValueError, "empty"),
        (["cpu", "tpu"], ValueError, "not a device|'cpu' or 'cuda'"),
        (["cpu", "meta"], ValueError, "xla_sharded"),
        (True, TypeError, "int count or a list"),
    ],
)
def test_bad_devices_fail_at_wrap_time(devices, error, match):
    with pytest.raises(error, match=match):
        tk.data_parallel(devices=devices)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_fails_at_wrap_time():
    with pytest.raises(ValueError, match="CUDA is not available"):
        tk.data_parallel(train_step, devices=["cuda:0", "cuda:1"])


def test_rejects_epoch_steps_and_nesting():
    with pytest.raises(TypeError, match="batch step"):
        tk.data_parallel(tk.epoch_step(train_step), devices=["cpu"] * 2)
    with pytest.raises(ValueError, match="already wrapped by data_parallel"):
        tk.data_parallel(tk.data_parallel(train_step, devices=["cpu"] * 2), devices=["cpu"] * 2)
    with pytest.raises(TypeError, match="step function"):
        tk.data_parallel(3)
    with pytest.raises(ValueError, match="compiled by tk.jit"):
        tk.data_parallel(tk.transforms.mark(lambda s, b: (s, {}), train_step, "jit"), devices=["cpu"] * 2)


def test_state_on_another_device_than_the_primary():
    state = make_state().to("meta")
    with pytest.raises(ValueError, match="primary device is cpu"):
        tk.data_parallel(train_step, devices=["cpu"] * 2)(state, batch_of(4))


def test_batch_tensors_must_agree_on_the_batch_size():
    bad = {"inputs": (torch.randn(6, 5, dtype=torch.float64),), "target": torch.randint(0, 3, (5,))}
    with pytest.raises(ValueError, match=r"share their first dimension.*6 rows.*5"):
        tk.data_parallel(train_step, devices=["cpu"] * 2)(make_state(), bad)


def test_a_step_without_value_and_grad_is_rejected():
    def step(state, batch):
        return state.replace(step=state.step + 1), {"n": torch.tensor(1.0)}

    with pytest.raises(RuntimeError, match="no gradients through trainkit.value_and_grad"):
        tk.data_parallel(step, devices=["cpu"] * 2)(make_state(), batch_of(4))


@pytest.mark.timeout(30)
def test_an_error_in_one_replica_is_raised_not_a_hang():
    def step(state, batch):
        if batch["target"].shape[0] < 3:
            raise ValueError("shard too small for this step")
        return train_step(state, batch)

    with pytest.raises(ValueError, match="shard too small") as info:
        tk.data_parallel(step, devices=["cpu"] * 3)(make_state(), batch_of(7))  # shards 3, 2, 2
    assert "replica 1" in "".join(getattr(info.value, "__notes__", []))


@pytest.mark.timeout(30)
def test_replicas_that_disagree_on_value_and_grad_calls_fail_clearly():
    def step(state, batch):
        for _ in range(batch["target"].shape[0]):  # 3 calls on one shard, 2 on the others
            state, m = train_step(state, batch)
        return state, m

    with pytest.raises(RuntimeError, match="did not compute gradients in step"):
        tk.data_parallel(step, devices=["cpu"] * 2)(make_state(), batch_of(5))


# --------------------------------------------------------------------------- CUDA, where there is one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("devices", [["cuda:0", "cuda:0"], ["cuda:0", "cpu"], "all"])
def test_cuda_replicas_equal_the_whole_batch(devices):
    if devices == "all":  # every GPU; twice over when there is only one
        n = torch.cuda.device_count()
        devices = [f"cuda:{i}" for i in range(n)] * (2 if n == 1 else 1)
    state = make_state().to(devices[0])
    batch = batch_of(11)
    cuda_batch = {"inputs": (batch["inputs"][0].to(devices[0]),), "target": batch["target"].to(devices[0])}
    expected, em = train_step(state, cuda_batch)
    got, gm = tk.data_parallel(train_step, devices=devices)(state, batch)
    assert got.device == torch.device(devices[0])
    assert_trees_close(got.params, expected.params, **F64)
    assert_trees_close(gm, em, **F64)
