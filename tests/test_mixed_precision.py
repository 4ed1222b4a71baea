"""mixed_precision: float32 is the bare step bit for bit; bf16 trains the demo; fp16 loss scaling is GradScaler's."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import trainkit as tk
from trainkit.demo import CNN, eval_step, train_step
from trainkit.transforms._base import mark
from trainkit.transforms.mixed_precision import _update


def mse_step(state, batch):
    x, y = batch

    def loss_fn(p):
        out, buffers = state.apply(p, x, train=True)
        return F.mse_loss(out, y), buffers

    (loss, buffers), grads = tk.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads, buffers=buffers), {"loss": loss}


def mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1)
    )


def digits_batches(n=3, bs=32):
    x, y = tk.data.digits().train
    return [(x[i * bs : (i + 1) * bs], y[i * bs : (i + 1) * bs]) for i in range(n)]


# --------------------------------------------------------------------------- float32: the bare step


def test_float32_is_the_bare_step_bit_for_bit():
    state = tk.TrainState.create(CNN(), tk.optim.adamw(tk.optim.linear_schedule(1e-3, 0.0, 10)))
    off = tk.mixed_precision(train_step, dtype=torch.float32)
    composed = tk.compose(tk.mixed_precision(dtype=torch.float32))(train_step)
    a = b = c = state
    for batch in digits_batches():
        a, ma = train_step(a, batch)
        b, mb = off(b, batch)
        c, mc = composed(c, batch)
        tk.testing.assert_trees_equal(mb, ma)
        tk.testing.assert_trees_equal(mc, ma)
    tk.testing.assert_trees_equal(b, a)
    tk.testing.assert_trees_equal(c, a)
    assert "mixed_precision" not in b.slots
    assert tk.applied_transforms(off) == ("mixed_precision",)


# --------------------------------------------------------------------------- bf16 on the demo


@pytest.mark.slow
def test_bf16_trains_the_demo_within_one_point_of_float32(tmp_path):
    from trainkit.demo import main

    fp32 = main(["--logdir", str(tmp_path), "--no-progress"])
    bf16 = main(["--logdir", str(tmp_path), "--no-progress", "--precision", "bf16"])
    print(f"demo test accuracy: float32 {fp32['test_acc']:.4f}, bf16 {bf16['test_acc']:.4f}")
    assert abs(bf16["test_acc"] - fp32["test_acc"]) <= 0.01
    assert bf16["test_acc"] >= 0.95
    assert all(p.dtype == torch.float32 for p in bf16["state"].params.values())  # params stay float32


def test_bf16_step_runs_under_autocast_and_keeps_float32_params():
    seen = []

    def probe(state, batch):
        x, y = batch
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return train_step(state, batch)

    state = tk.TrainState.create(CNN(), tk.optim.adam(1e-3))
    new, metrics = tk.mixed_precision(probe, dtype=torch.bfloat16)(state, digits_batches(1)[0])
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in new.params.values())
    assert set(metrics) == {"loss", "acc"} and "mixed_precision" not in new.slots  # nothing to report without scaling


# --------------------------------------------------------------------------- fp16: the skipped step


@pytest.mark.parametrize("donate", [False, True])
def test_fp16_overflow_skips_the_step_halves_the_scale_counts_it_and_holds_the_schedule(donate):
    torch.manual_seed(0)
    schedule = tk.optim.linear_schedule(0.1, 0.0, 100)
    state = tk.TrainState.create(torch.nn.Linear(4, 1), tk.optim.adam(schedule))
    step = tk.mixed_precision(mse_step, dtype=torch.float16)
    good = (torch.full((8, 4), 0.1), torch.zeros(8, 1))
    huge = (torch.full((8, 4), 1e4), torch.zeros(8, 1))  # d(loss * 2**16)/d(output) overflows float16

    with tk.donating(donate):
        state, m1 = step(state.clone(), good)
        assert m1["skipped_steps"].item() == 0 and m1["loss_scale"].item() == 2.0**16
        before = copy.deepcopy((state.params, state.opt_state))
        versions = [p._version for p in state.params.values()]
        state, m2 = step(state, huge)
    params, opt_state = before
    tk.testing.assert_trees_equal(state.params, params)  # params unchanged
    tk.testing.assert_trees_equal(state.opt_state, opt_state)  # moments, count and LR unchanged
    assert [p._version for p in state.params.values()] == versions  # not even written in place
    assert tk.optim.count(state.opt_state) == 1 and state.lr == schedule(1)  # the schedule held
    assert state.step == 2  # the step counter advances, as with GradScaler
    assert m2["loss_scale"].item() == 2.0**16  # the scale this step used...
    assert state.slots["mixed_precision"] == {"scale": 2.0**15, "growth_tracker": 0, "skipped_steps": 1}  # ...halved after
    assert m2["skipped_steps"].item() == 1

    state, m3 = step(state, good)  # the next good step updates, and the schedule moves on from where it was
    assert m3["skipped_steps"].item() == 1 and m3["loss_scale"].item() == 2.0**15
    assert tk.optim.count(state.opt_state) == 2 and state.lr == schedule(2)
    assert not torch.equal(state.params["weight"], params["weight"])


def test_fp16_matches_a_hand_written_autocast_and_grad_scaler_loop():
    """The CPU version of the GPU check: same losses, same scales, same skips, same params."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    gen = torch.Generator().manual_seed(1)
    batches = []
    for i in range(12):
        x = torch.randn(16, 6, generator=gen) * (3e3 if i in (4, 5, 9) else 1.0)  # three overflowing batches
        batches.append((x, torch.randn(16, 1, generator=gen)))

    ref = copy.deepcopy(module)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    ref_losses, ref_scales = [], []
    for x, y in batches:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.mse_loss(ref(x), y)
        ref_scales.append(scaler.get_scale())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        ref_losses.append(loss.item())

    state = tk.TrainState.create(module, tk.optim.sgd(0.05))
    step = tk.mixed_precision(mse_step, dtype=torch.float16, init_scale=2.0**10, growth_interval=3)
    losses, scales = [], []
    with tk.donating():
        state = state.clone()
        for batch in batches:
            state, m = step(state, batch)
            losses.append(m["loss"].item())
            scales.append(m["loss_scale"].item())
    assert scales == ref_scales
    assert scales != [2.0**10] * len(batches)  # it did back off and grow
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-6, atol=0)
    assert state.slots["mixed_precision"]["scale"] == scaler.get_scale()
    after = ref_scales[1:] + [scaler.get_scale()]
    assert state.slots["mixed_precision"]["skipped_steps"] == sum(b < a for a, b in zip(ref_scales, after, strict=True))
    for (name, p), q in zip(state.params.items(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=name)


@settings(max_examples=60, deadline=None)
@given(
    found=st.lists(st.booleans(), min_size=1, max_size=40),
    init_exp=st.sampled_from([0, 10, 16, 126, 127]),
    growth=st.sampled_from([2.0, 1.5, 3.0]),
    backoff=st.sampled_from([0.5, 0.25]),
    interval=st.integers(1, 4),
)
def test_scale_policy_is_grad_scalers_update_kernel(found, init_exp, growth, backoff, interval):
    scale_t, tracker_t = torch.full((), 2.0**init_exp), torch.zeros((), dtype=torch.int32)
    cfg = {"dynamic": True, "growth_factor": growth, "backoff_factor": backoff, "growth_interval": interval}
    slot = {"scale": 2.0**init_exp, "growth_tracker": 0, "skipped_steps": 0}
    for f in found:
        torch._amp_update_scale_(scale_t, tracker_t, torch.tensor(float(f)), growth, backoff, interval)
        slot = _update(slot, f, cfg)
        assert slot["scale"] == scale_t.item() and slot["growth_tracker"] == tracker_t.item()
    assert slot["skipped_steps"] == sum(found)


def test_fp16_static_scale_and_no_scale_still_skip_non_finite_steps():
    huge = (torch.full((8, 4), 1e4), torch.zeros(8, 1))
    state = tk.TrainState.create(torch.nn.Linear(4, 1), tk.optim.sgd(0.1))
    for loss_scale, expected in ((1024.0, 1024.0), (None, 1.0)):
        step = tk.mixed_precision(mse_step, dtype=torch.float16, loss_scale=loss_scale)
        new, m = step(state, (torch.full((8, 4), 0.01), torch.zeros(8, 1)))
        assert m["loss_scale"].item() == expected and m["skipped_steps"].item() == 0
        skipped, m = step(new, (huge[0] * 100, huge[1]))  # even unscaled, these fp16 activations overflow
        assert m["skipped_steps"].item() == 1
        assert skipped.slots["mixed_precision"]["scale"] == expected  # a fixed scale does not move
        tk.testing.assert_trees_equal(skipped.params, new.params)


def test_fp16_loss_scale_slot_survives_checkpoint_and_resume(tmp_path):
    state = tk.TrainState.create(torch.nn.Linear(4, 1), tk.optim.sgd(0.1))
    step = tk.mixed_precision(mse_step, dtype=torch.float16, growth_interval=2)
    for batch in [(torch.full((8, 4), 0.1), torch.zeros(8, 1))] * 3 + [(torch.full((8, 4), 1e4), torch.zeros(8, 1))]:
        state, _ = step(state, batch)
    assert state.slots["mixed_precision"] == {"scale": 2.0**16, "growth_tracker": 0, "skipped_steps": 1}
    loaded = tk.load(tk.save(state, tmp_path / "ck.pt"), like=tk.TrainState.create(torch.nn.Linear(4, 1), tk.optim.sgd(0.1)))
    assert loaded.slots == state.slots
    batch = (torch.full((8, 4), 0.1), torch.zeros(8, 1))
    tk.testing.assert_trees_equal(step(loaded, batch), step(state, batch))


# --------------------------------------------------------------------------- purity and composition


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_passes_check_step(dtype):
    torch.manual_seed(0)
    state = tk.TrainState.create(mlp(), tk.optim.adam(1e-3))
    batch = (torch.randn(8, 4) * 0.1, torch.randn(8, 1) * 0.1)
    new, metrics = tk.testing.check_step(tk.mixed_precision(mse_step, dtype=dtype), state, batch)
    assert new.step == 1
    if dtype == torch.float16:
        assert {"loss_scale", "skipped_steps"} <= set(metrics)


def test_composes_with_the_other_one_device_transforms():
    state = tk.TrainState.create(mlp(), tk.optim.adam(1e-3))
    batch = (torch.randn(8, 4) * 0.1, torch.randn(8, 1) * 0.1)
    inner = tk.compose(tk.lr_range_test(num_steps=5), tk.mixed_precision(dtype=torch.float16))(mse_step)
    outer = tk.compose(tk.mixed_precision(dtype=torch.float16), tk.lr_range_test(num_steps=5))(mse_step)
    for step in (inner, outer):
        new, m = step(state, batch)
        assert {"loss", "lr", "loss_scale", "skipped_steps"} <= set(m)
        assert set(new.slots) == {"mixed_precision", "lr_range_test"}
    epoch = tk.early_stop(tk.epoch_step(tk.mixed_precision(mse_step, dtype=torch.bfloat16)), monitor="train_loss")
    new, m = epoch(state, tk.EpochData(train=[batch, batch]))
    assert new.step == 2 and new.slots["early_stop"]["evaluations"] == 1


# --------------------------------------------------------------------------- errors at wrap time


def test_rejects_what_cannot_work_with_clear_errors():
    with pytest.raises(ValueError, match="loss scaling is for float16 only"):
        tk.mixed_precision(train_step, dtype=torch.bfloat16, loss_scale="dynamic")
    with pytest.raises(ValueError, match="growth_interval=10 is meaningless with dtype=torch.float32"):
        tk.mixed_precision(dtype=torch.float32, growth_interval=10)
    with pytest.raises(ValueError, match="dtype must be torch.bfloat16, torch.float16 or torch.float32"):
        tk.mixed_precision(train_step, dtype=torch.float64)
    with pytest.raises(ValueError, match="growth_factor must be a finite number > 1"):
        tk.mixed_precision(train_step, dtype=torch.float16, growth_factor=0.5)
    with pytest.raises(ValueError, match="set the dynamic loss-scaling policy"):
        tk.mixed_precision(train_step, dtype=torch.float16, loss_scale=128.0, growth_interval=5)
    with pytest.raises(ValueError, match='loss_scale must be "dynamic"'):
        tk.mixed_precision(train_step, dtype=torch.float16, loss_scale=-1.0)
    with pytest.raises(TypeError, match="got an epoch step"):
        tk.mixed_precision(tk.epoch_step(train_step, eval_step), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="already wrapped by mixed_precision"):
        tk.compose(tk.mixed_precision(), tk.mixed_precision())(train_step)
    replicated = mark(lambda s, b: train_step(s, b), train_step, "data_parallel")
    with pytest.raises(ValueError, match=r"must stand inside it.*tk.compose\(tk.data_parallel\(...\), tk.mixed_precision"):
        tk.mixed_precision(replicated, dtype=torch.float16)
    with pytest.raises(TypeError, match="first argument must be a step function"):
        tk.mixed_precision(torch.float16)
