"""lr_range_test / find_lr: divergence near 2/L on a known quadratic, the caller's state untouched, the plot, the demo."""

import math

import pytest
import torch
import torch.nn.functional as F

import trainkit as tk
from trainkit.transforms.lr_range_test import RULES, centered_median, suggest_lr, suggest_lrs, suggest_valley, sweep_lr


def mse_step(state, batch):
    x, y = batch

    def loss_fn(p):
        out, buffers = state.apply(p, x, train=True)
        return F.mse_loss(out, y), buffers

    (loss, buffers), grads = tk.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads, buffers=buffers), {"loss": loss}


def replay(losses):
    """A step that reports losses[i] on its i-th call (and the LR it was given)."""

    def step(state, batch):
        return state.replace(step=state.step + 1), {"loss": torch.tensor(losses[state.step]), "seen_lr": torch.tensor(state.lr)}

    return step


def linear_regression(seed=0, n=1024, d=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.tensor([3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3, 0.2])
    y = x @ torch.randn(d, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    # The loss mean((x w - y)^2) has Hessian 2 x^T x / n; gradient descent diverges for lr > 2 / L.
    L = torch.linalg.eigvalsh(2 * x.double().T @ x.double() / n).max().item()
    return x, y, L


# --------------------------------------------------------------------------- the sweep on a known quadratic


def test_divergence_point_is_within_a_factor_2_of_2_over_L_and_the_suggestion_below_it():
    x, y, L = linear_regression()
    state = tk.TrainState.create(torch.nn.Linear(8, 1, bias=False), tk.optim.sgd(0.1))

    def full_batch_gd(lr, steps=200):
        s = state.with_lr(lr)
        for _ in range(steps):
            s, m = mse_step(s.with_lr(lr), (x, y))
        return m["loss"].item()

    # The premise: plain gradient descent converges just below 2/L and blows up just above it.
    assert full_batch_gd(0.9 * 2 / L) < 0.1
    assert not full_batch_gd(1.1 * 2 / L) < 1e3

    # Plain SGD on mini-batches of 128, a fine sweep (300 steps over 4 decades, 3% apart): the smoothed
    # loss lags the raw one by about 1 / (1 - 0.98) = 50 steps, so a coarse sweep detects divergence late.
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, len(x), 128)]
    result = tk.find_lr(mse_step, state, batches, min_lr=1e-3, max_lr=10.0, num_steps=300)
    ratio = result.diverged_lr / (2 / L)
    print(
        f"2/L = {2 / L:.4g}; divergence detected at {result.diverged_lr:.4g} ({ratio:.2f} x 2/L); "
        f"suggestion {result.suggestion:.3g} ({result.rule}), min/10 {result.suggestion_min_div_10:.3g}, "
        f"steepest {result.suggestions['steepest']:.3g}; {result.stop_reason}"
    )
    assert result.diverged and result.stop_reason.startswith("diverged at lr=")
    assert 0.5 <= ratio <= 2.0
    assert result.rule == "valley" and 2 / L / 100 <= result.suggestion <= 2 / L
    assert result.suggestion_min_div_10 < 2 / L and result.suggestions["steepest"] < 2 / L
    assert result.suggestion > 1e-3 and len(result.lrs) < 300  # a point of the sweep, which stopped early

    # With the default sweep (100 steps from 1e-7 to 10, 20% apart) the suggestion is below 2/L as well;
    # divergence is detected later there (3-9 x 2/L on these problems), as the lag above predicts.
    coarse = tk.find_lr(mse_step, state, batches)
    print(f"default sweep: suggestion {coarse.suggestion:.3g} ({coarse.suggestion * L / 2:.2f} x 2/L), {coarse.stop_reason}")
    assert coarse.diverged and 2 / L / 100 <= coarse.suggestion <= 2 / L < coarse.diverged_lr


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_the_valley_lies_below_the_stable_limit_with_a_margin_on_other_draws_of_the_regression(seed):
    # Measured (seeds 0-5, both sweeps): valley 0.13-0.44 x 2/L; steepest 0.0125-1.12 x 2/L (above the limit once).
    x, y, L = linear_regression(seed)
    state = tk.TrainState.create(torch.nn.Linear(8, 1, bias=False), tk.optim.sgd(0.1))
    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, len(x), 128)]
    for kwargs in ({}, {"min_lr": 1e-3, "max_lr": 10.0, "num_steps": 300}):
        result = tk.find_lr(mse_step, state, batches, **kwargs)
        assert 2 / L / 20 <= result.suggestion <= 2 / L / 1.5, (kwargs, result.suggestion * L / 2, result.message)


# --------------------------------------------------------------------------- the caller's state


def test_the_callers_state_is_bit_identical_after_the_test():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1)
    )
    x, y, _ = linear_regression()
    state = tk.TrainState.create(model, tk.optim.adamw(tk.optim.cosine_decay_schedule(1e-3, 100)))
    state, _ = mse_step(state, (x[:64], y[:64]))  # some optimizer state to protect
    state = state.replace(slots={"other": {"n": torch.ones(2)}})
    before = tk.testing.snapshot(state)  # (path, copy of the value, tensor version counter) of every leaf
    expected = mse_step(state, (x[:64], y[:64]))
    rng = torch.get_rng_state()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)
    result = tk.find_lr(mse_step, state, loader, num_steps=40)
    assert len(result.lrs) > 16  # it ran (16 batches per pass: the loader was cycled)
    tk.testing.assert_trees_equal(tk.testing.snapshot(state), before)
    assert state.step == 1 and set(state.slots) == {"other"} and state.lr == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 100)))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG too: a later fit is unaffected
    tk.testing.assert_trees_equal(mse_step(state, (x[:64], y[:64])), expected)  # it trains as if nothing had happened


# --------------------------------------------------------------------------- the recorded curve


@pytest.mark.parametrize("mode", ["exp", "linear"])
def test_sweep_includes_both_ends_and_records_the_lr_each_step_used(mode):
    n = 7
    step = tk.lr_range_test(replay([1.0] * n), min_lr=1e-3, max_lr=1.0, num_steps=n, mode=mode)
    state = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.adam(0.123))
    seen = []
    for _ in range(n):
        state, m = step(state, None)
        seen.append(m["seen_lr"].item())
        assert m["lr"].item() == pytest.approx(seen[-1], rel=1e-6)
    slot = state.slots["lr_range_test"]
    expected = [1e-3 * 1000 ** (i / (n - 1)) if mode == "exp" else 1e-3 + (1 - 1e-3) * i / (n - 1) for i in range(n)]
    assert slot["lrs"] == pytest.approx(expected, rel=1e-12)
    assert slot["lrs"][0] == 1e-3 and slot["lrs"][-1] == 1.0
    assert seen == pytest.approx(slot["lrs"], rel=1e-6)  # the LR recorded is the LR the step used
    assert slot["stop"] and slot["reason"].startswith("sweep complete") and tk.should_stop(state)
    # Bias-corrected EMA: a constant loss is its own smoothed curve from the first step on.
    assert slot["smoothed"] == pytest.approx([1.0] * n, rel=1e-12)


def test_smoothing_is_the_bias_corrected_ema():
    losses = [4.0, 2.0, 3.0, 1.0, 0.5]
    step = tk.lr_range_test(replay(losses), num_steps=5, smoothing=0.9)
    state = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1))
    for _ in losses:
        state, _ = step(state, None)
    avg, expected = 0.0, []
    for i, v in enumerate(losses):
        avg = 0.9 * avg + 0.1 * v
        expected.append(avg / (1 - 0.9 ** (i + 1)))
    assert state.slots["lr_range_test"]["smoothed"] == pytest.approx(expected, rel=1e-12)


def test_stops_when_the_smoothed_loss_exceeds_4x_its_best_or_is_not_finite():
    losses = [1.0] * 20 + [10.0] * 10 + [1e6] * 5
    result = tk.find_lr(replay(losses), tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1)), [None], num_steps=35)
    i = len(result.lrs) - 1
    assert (
        result.diverged
        and result.smoothed[i] > 4 * min(result.smoothed[:i])
        and not result.smoothed[i - 1] > 4 * min(result.smoothed[: i - 1])
    )
    assert i == 27  # the eighth 10.0 lifts the smoothed loss from 3.82 to 4.11, past 4 x its best (1.0)
    nan = tk.find_lr(
        replay([1.0] * 12 + [float("nan")] + [1.0] * 10),
        tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1)),
        [None],
        num_steps=23,
    )
    assert len(nan.lrs) == 13 and nan.stop_reason.startswith("the loss is nan") and nan.diverged
    off = tk.find_lr(
        replay(losses), tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1)), [None], num_steps=35, diverge_threshold=None
    )
    assert len(off.lrs) == 35 and not off.diverged


def test_suggestion_is_steepest_descent_against_log_lr():
    lrs = [10 ** (-4 + i / 10) for i in range(41)]
    curve = [1 / (1 + (lr / 1e-2) ** 2) for lr in lrs]  # steepest at lr = 1e-2 against log(lr), at 5.8e-3 against lr
    steepest, min10, message = suggest_lr(lrs, curve)
    assert steepest == lrs[20] and "steepest descent" in message
    # Non-finite points are left out; the ends are skipped (10 at the start: an early spike does not count).
    spiky = [5.0] + [1.0] * 9 + curve[10:] + [float("inf")]
    assert suggest_lr(lrs + [1.0], spiky)[0] == lrs[20]
    assert suggest_lr(lrs, curve, skip_start=0)[0] == lrs[20]


# --------------------------------------------------------------------------- the valley rule


def noisy_sweep(seed, sigma=0.3, n=100):
    """A default sweep's LRs and mini-batch-like losses: a plateau at 1, a descent half done at 1e-2, divergence past ~0.3.

    The clean curve (0.2 + 0.8 / (1 + (lr / 1e-2)^2) + (lr / 0.3)^3) makes its descent between 1e-3 and 1e-1 and
    is lowest near 0.07; the noise is multiplicative, 30% (log-normal), the size of mini-batch noise.
    """
    g = torch.Generator().manual_seed(seed)
    lrs = [sweep_lr(i, 1e-7, 10.0, n, "exp") for i in range(n)]
    noise = torch.randn(n, generator=g, dtype=torch.float64).tolist()
    return lrs, [(0.2 + 0.8 / (1 + (lr / 1e-2) ** 2) + (lr / 0.3) ** 3) * math.exp(sigma * e) for lr, e in zip(lrs, noise, strict=True)]


def test_valley_picks_inside_the_descent_under_noise_where_steepest_picks_the_noisy_plateau():
    state = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1))
    valleys, fooled = [], 0
    for seed in range(10):
        lrs, losses = noisy_sweep(seed)
        result = tk.find_lr(replay(losses), state, [None])  # the default sweep (1e-7 to 10, 100 steps) records these
        assert result.lrs == pytest.approx(lrs[: len(result.lrs)], rel=1e-12) and result.diverged
        valleys.append(result.suggestion)
        assert result.rule == "valley" and result.suggestion == result.suggestions["valley"]
        assert 3e-3 <= result.suggestion <= 1e-1, (seed, result.message)  # inside the descent, below the lowest point
        fooled += result.suggestions["steepest"] < 1e-4  # a plateau point: the EMA's early noise is its steepest slope
    print(f"valley: {[f'{v:.3g}' for v in valleys]}; steepest on the plateau in {fooled} of 10 sweeps")
    assert fooled >= 6
    # Without noise both rules find the descent; steepest late (the EMA's lag: 3.1e-2 for a true 1e-2), the
    # valley's half-way landmark where it is (8.5e-3, the last point above half-way before 1e-2).
    _, clean = noisy_sweep(0, sigma=0.0)
    result = tk.find_lr(replay(clean), state, [None])
    assert 2e-2 <= result.suggestions["steepest"] <= 5e-2 and 1e-2 <= result.suggestion <= 5e-2
    assert "half-way point of the descent of the loss (running median, 1 to 0.2409) at lr=0.0085 " in result.message


def test_valley_ignores_spikes_and_its_message_names_its_landmarks():
    lrs, losses = noisy_sweep(3)
    lr, message = suggest_valley(lrs[:88], losses[:88])
    spiky = list(losses[:88])
    for i in (15, 40, 60, 70):  # single bad batches, 20x the loss, on the plateau and in the descent
        spiky[i] *= 20
    assert suggest_valley(lrs[:88], spiky)[0] == lr
    assert message.startswith(f"valley: lr={lr:.3g}, midway in log-LR between the half-way point") and "lowest point at lr=" in message
    # The median curve has no lag: the lowest point of the clean curve is found where it is (the EMA puts it later).
    _, clean = noisy_sweep(0, sigma=0.0)
    curve = centered_median(clean[:88], 4)
    assert abs(math.log10(lrs[curve.index(min(curve[10:87]))] / 0.07)) < 0.25
    assert suggest_valley(lrs[:20], [1.0] * 20) == (None, suggest_valley(lrs[:20], [1.0] * 20)[1])
    assert "no valley: the loss does not descend" in suggest_valley(lrs[:20], [1.0] * 20)[1]
    assert suggest_valley(lrs[:12], losses[:12])[0] is None  # too few points after skipping


def test_the_rule_is_an_option_and_the_result_keeps_every_rules_suggestion():
    lrs, losses = noisy_sweep(1)
    state = tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1))
    default = tk.find_lr(replay(losses), state, [None])
    assert set(default.suggestions) == set(RULES) == {"valley", "steepest", "minimum"}
    expected, _ = suggest_lrs(default.lrs, default.losses, default.smoothed)
    assert default.suggestions == expected and default.suggestion_min_div_10 == expected["minimum"]
    assert "(rule 'valley'; other rules: steepest" in default.message and f"{default.suggestion:.3g}" in repr(default)
    for rule in RULES:
        result = tk.find_lr(replay(losses), state, [None], suggest=rule)
        assert result.rule == rule and result.suggestion == default.suggestions[rule] and result.suggestions == default.suggestions
        assert result.message.startswith(f"{rule}: lr=") and f"(rule {rule!r}" in result.message
    steepest, min10, _ = suggest_lr(default.lrs, default.smoothed)  # the steepest rule is unchanged
    assert (steepest, min10) == (default.suggestions["steepest"], default.suggestions["minimum"])
    legend = [t.get_text() for t in default.plot().get_legend().get_texts()]
    assert f"suggestion (valley) {default.suggestion:.3g}" in legend
    with pytest.raises(ValueError, match=r"find_lr: suggest must be one of 'valley', 'steepest', 'minimum', got 'steep'"):
        tk.find_lr(replay(losses), state, [None], suggest="steep")


def test_no_suggestion_with_too_few_points_and_a_message_saying_why():
    result = tk.find_lr(replay([1.0] * 12), tk.TrainState.create(torch.nn.Linear(1, 1), tk.optim.sgd(0.1)), [None], num_steps=12)
    assert result.suggestion is None and result.suggestion_min_div_10 is None and set(result.suggestions.values()) == {None}
    assert "no suggestion: 12 points recorded, 1 finite ones left after skipping 10 at the start and 1 at the end" in result.message
    assert "Raise num_steps" in result.message
    assert "suggestion=None" in repr(result)
    result.plot()  # still draws the curve


def test_plot_writes_a_png_with_the_suggestion_marked(tmp_path):
    x, y, L = linear_regression()
    state = tk.TrainState.create(torch.nn.Linear(8, 1, bias=False), tk.optim.sgd(0.1))
    result = tk.find_lr(
        mse_step, state, [(x[i : i + 128], y[i : i + 128]) for i in range(0, 1024, 128)], min_lr=1e-5, max_lr=10.0, num_steps=80
    )
    path = tmp_path / "lr_find.png"
    ax = result.plot(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert ax.get_xscale() == "log" and any(f"{result.suggestion:.3g}" in t.get_text() for t in ax.get_legend().get_texts())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, mine = plt.subplots()
    assert result.plot(ax=mine) is mine and len(mine.lines) >= 3  # loss, smoothed, suggestion
    plt.close(fig)


# --------------------------------------------------------------------------- as a transform


def test_passes_check_step_and_fit_stops_when_the_sweep_ends():
    x, y, _ = linear_regression()
    state = tk.TrainState.create(torch.nn.Linear(8, 1), tk.optim.sgd(0.1, momentum=0.9))
    new, metrics = tk.testing.check_step(tk.lr_range_test(mse_step, num_steps=10), state, (x[:32], y[:32]))
    assert new.slots["lr_range_test"]["lrs"] == [1e-7] and "lr" in metrics
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 1024, 64)]
    final, history = tk.fit(tk.lr_range_test(mse_step, min_lr=1e-3, max_lr=1e-1, num_steps=7), state, batches, epochs=5, progress=False)
    assert final.step == 7 and len(history) == 1 and len(final.slots["lr_range_test"]["lrs"]) == 7


def test_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="min_lr must be a finite number > 0"):
        tk.lr_range_test(mse_step, min_lr=0.0)
    with pytest.raises(ValueError, match=r"max_lr must be a finite number > min_lr \(0.1\)"):
        tk.lr_range_test(min_lr=0.1, max_lr=0.01)
    with pytest.raises(ValueError, match='mode must be "exp"'):
        tk.lr_range_test(mode="cosine")
    with pytest.raises(ValueError, match="num_steps must be an int >= 2"):
        tk.lr_range_test(num_steps=1)
    with pytest.raises(TypeError, match="got an epoch step"):
        tk.lr_range_test(tk.epoch_step(mse_step))
    with pytest.raises(ValueError, match="already wrapped by lr_range_test"):
        tk.compose(tk.lr_range_test(), tk.lr_range_test())(mse_step)
    state = tk.TrainState.create(torch.nn.Linear(8, 1), tk.optim.sgd(0.1))
    with pytest.raises(KeyError, match=r"loss_key='loss' is not among the metrics the step returned: \['mse'\]"):
        tk.lr_range_test(lambda s, b: (s, {"mse": torch.tensor(1.0)}))(state, None)
    clip_only = tk.TrainState.create(torch.nn.Linear(8, 1), tk.optim.clip_by_global_norm(1.0))
    with pytest.raises(ValueError, match="needs an optimizer with a learning rate"):
        tk.find_lr(mse_step, clip_only, [linear_regression()[:2]])
    with pytest.raises(ValueError, match="the loader yielded no batches"):
        tk.find_lr(mse_step, state, [])
    x, y, _ = linear_regression()
    with pytest.raises(ValueError, match=r"ran out after 3 batches .* or num_steps <= 3"):
        tk.find_lr(mse_step, state, iter([(x[:8], y[:8])] * 3), num_steps=10)
    assert len(tk.find_lr(mse_step, state, iter([(x[:8], y[:8])] * 3), num_steps=3).lrs) == 3
    assert sweep_lr(99, 1e-3, 1.0, 5, "exp") == 1.0  # past the end: stays at max_lr


# --------------------------------------------------------------------------- the demo


@pytest.mark.slow
def test_demo_trains_at_the_suggested_lr_and_reaches_its_accuracy_target(tmp_path):
    from trainkit.demo import main

    out = main(["--logdir", str(tmp_path), "--no-progress", "--find-lr"])
    print(f"demo --find-lr: lr {out['lr']:.3g}, test accuracy {out['test_acc']:.4f}")
    assert out["lr"] != 3e-3  # it took the suggestion, not the default
    assert out["test_acc"] >= 0.95
    assert (tmp_path / "demo" / "version_0" / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


def test_find_lr_works_through_groups_schedules_and_a_wrapper_of_ones_own():
    x, y, _ = linear_regression()
    data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]

    def own_wrapper(inner):  # a user's own stage around a trainkit optimizer, state nested in a dict
        def update(u, s, p):
            u, s2 = inner.update(u, s["inner"], p)
            return u, {"inner": s2}

        return tk.optim.GradientTransformation(lambda p: {"inner": inner.init(p)}, update)

    groups = tk.optim.partition({"w": tk.optim.sgd(0.1), "b": tk.optim.adam(1e-3)}, lambda n, p: "w" if p.ndim > 1 else "b")
    for tx in (own_wrapper(tk.optim.sgd(0.1)), groups, tk.optim.sgd(tk.optim.linear_schedule(0.0, 0.1, 10))):
        state = tk.TrainState.create(torch.nn.Linear(8, 1), tx)
        seen = []

        def step(s, batch, seen=seen):
            seen.append(tk.optim.get_lrs(s.opt_state))
            return mse_step(s, batch)

        result = tk.find_lr(step, state, data, min_lr=1e-4, max_lr=1e-1, num_steps=5)
        assert len(result.lrs) == 5 and result.lrs[0] == pytest.approx(1e-4) and result.lrs[-1] == pytest.approx(1e-1)
        assert [lrs[0] for lrs in seen] == pytest.approx(result.lrs)  # each step ran at the sweep's LR (every group)
        assert all(len(set(lrs)) == 1 for lrs in seen)
        assert state.lr == tk.TrainState.create(torch.nn.Linear(8, 1), tx).lr  # the caller's lasting LR is untouched
