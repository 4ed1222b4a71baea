"""trainkit.bench: timing steps, donation, interleaving, tables and charts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import trainkit as tk
from trainkit.bench import Comparison, StepTiming, compare, time_step
from trainkit.testing import snapshot


def make_state() -> tk.TrainState:
    torch.manual_seed(0)
    return tk.TrainState.create(torch.nn.Linear(4, 3), tk.optim.adam(1e-2))


BATCH = (torch.randn(8, 4), torch.randint(0, 3, (8,)))


def train_step(state, batch):
    x, y = batch
    loss, grads = tk.value_and_grad(lambda p: F.cross_entropy(state.apply(p, x)[0], y))(state.params)
    return state.apply_gradients(grads), {"loss": loss}


def recording(step, log, name):
    """``step``, noting each call (name, donating?, state.step) in ``log``."""

    def wrapped(state, batch):
        log.append((name, tk.is_donating(), state.step))
        return step(state, batch)

    wrapped.__name__ = name
    return wrapped


def sleeping(seconds, first_call_seconds=None):
    calls = []

    def step(state, batch):
        time.sleep(first_call_seconds if first_call_seconds is not None and not calls else seconds)
        calls.append(1)
        return state.replace(step=state.step + 1), {}

    return step


def test_time_step_runs_warmup_then_iters_on_a_donated_copy():
    state = make_state()
    before = snapshot(state)
    log = []
    t = time_step(recording(train_step, log, "train"), state, BATCH, warmup=3, iters=7)
    assert isinstance(t, StepTiming) and t.name == "train" and t.device == "cpu"
    assert len(t.times) == 7 and all(x > 0 for x in t.times)
    assert [s for _, _, s in log] == list(range(10))  # each call gets the state the previous one returned
    assert all(donating for _, donating, _ in log)  # as fit runs steps: in place...
    tk.testing._assert_unchanged(before, state, "time_step")  # ...on a copy: the caller's state is untouched
    assert t.min <= t.q1 <= t.median <= t.q3 <= t.max
    assert t.steps_per_s == pytest.approx(1 / t.median)


def test_time_step_without_donation_times_the_pure_step():
    log = []
    time_step(recording(train_step, log, "train"), make_state(), BATCH, warmup=1, iters=2, donate=False)
    assert [d for _, d, _ in log] == [False] * 3


def test_time_step_measures_wall_time_and_skips_the_compile_in_warmup():
    # the first call stands for a compile (0.3 s): warm-up, not timed
    t = time_step(sleeping(0.002, first_call_seconds=0.3), make_state(), None, warmup=1, iters=10)
    assert 0.0019 < t.median < 0.02
    assert t.max < 0.3


def test_compare_interleaves_the_contenders_in_rounds():
    log = []
    steps = {"a": recording(train_step, log, "a"), "b": recording(train_step, log, "b")}
    result = compare(steps, make_state(), BATCH, warmup=1, iters=6, rounds=3, verbose=False)
    assert [n for n, _, _ in log] == ["a", "b"] + ["a", "a", "b", "b"] * 3
    assert [s for n, _, s in log if n == "b"] == list(range(7))  # each contender has its own chain of states
    assert list(result) == ["a", "b"] and all(len(t.times) == 6 for t in result.values())


def test_compare_ratios_to_the_first_entry(capsys):
    state = make_state()
    result = compare({"slow": sleeping(0.004), "fast": sleeping(0.002)}, state, None, warmup=1, iters=20, rounds=4)
    s = result.speedups()
    assert s["slow"] == 1.0 and 1.5 < s["fast"] < 2.5
    out = capsys.readouterr().out
    assert "vs slow" in out and "1.00x" in out and "fast" in out
    assert result.reference == "slow" and "fast=" in repr(result)


def test_compare_on_a_jitted_step_keeps_the_compile_out_of_the_timing():
    jitted = tk.jit(train_step, backend="aot_eager")
    result = compare({"bare": train_step, "jit": jitted}, make_state(), BATCH, warmup=2, iters=20, rounds=2, verbose=False)
    assert jitted.compiles == 1
    assert result["jit"].max < 0.2  # the compile took longer than that, in the warm-up


def test_table_and_markdown():
    c = Comparison({"bare": StepTiming("bare", (0.004, 0.004), "cpu"), "jit": StepTiming("jit", (0.001, 0.001), "cpu")})
    text = c.table()
    assert text.splitlines()[0].split() == ["step", "ms/step", "(median)", "IQR", "(ms)", "steps/s", "vs", "bare"]
    assert "4.00x" in text
    md = c.table(markdown=True).splitlines()
    assert md[0].startswith("| step |") and md[1].startswith("|---|") and md[3] == "| jit | 1.000 | 1.000-1.000 | 1,000 | 4.00x |"


def test_plot_writes_a_png(tmp_path):
    c = Comparison({"bare": StepTiming("bare", (0.004, 0.005, 0.006), "cpu"), "jit": StepTiming("jit", (0.001, 0.0012), "cpu")})
    path = tmp_path / "chart.png"
    ax = c.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert [t.get_text() for t in ax.get_yticklabels()] == ["jit", "bare"]
    import matplotlib.pyplot as plt

    plt.close(ax.figure)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda s: time_step("step", s, BATCH), TypeError, "must be a step function"),
        (lambda s: time_step(tk.epoch_step(train_step), s, BATCH), TypeError, "epoch-level step"),
        (lambda s: time_step(train_step, {"not": "a state"}, BATCH), TypeError, "state must be a TrainState"),
        (lambda s: time_step(train_step, s, BATCH, iters=0), ValueError, "iters must be an int >= 1"),
        (lambda s: time_step(train_step, s, BATCH, warmup=-1), ValueError, "warmup must be an int >= 0"),
        (lambda s: compare({}, s, BATCH), TypeError, "non-empty dict"),
        (lambda s: compare({"a": train_step}, s, BATCH, iters=2, rounds=3), ValueError, "at least rounds"),
        (lambda s: time_step(lambda st, b: st, s, BATCH), TypeError, r"must return \(state, metrics\)"),
    ],
)
def test_bad_calls_say_what_is_wrong(call, err, match):
    with pytest.raises(err, match=match):
        call(make_state())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_steps_are_timed_with_events():
    state = make_state().to("cuda")
    batch = tuple(b.to("cuda") for b in BATCH)
    t = time_step(train_step, state, batch, warmup=3, iters=10)
    assert t.device.startswith("cuda") and len(t.times) == 10 and t.median > 0


# --------------------------------------------------------------------------- the benchmark scripts run

ROOT = Path(__file__).resolve().parents[1]


def run_script(args, tmp_path):
    out = subprocess.run(
        [sys.executable, *args, "--smoke", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_the_cpu_suite_runs_and_writes_a_table_and_a_chart(tmp_path):
    stdout = run_script(["benchmarks/suite.py"], tmp_path)
    md = (tmp_path / "cpu.md").read_text()
    for contender in ("hand", "trainkit eager", "trainkit jit", "trainkit bf16"):
        assert f"| {contender} |" in md
    assert (tmp_path / "cpu.png").read_bytes()[:4] == b"\x89PNG"
    # the same work: every contender ends at the hand loop's loss (bf16 within its precision)
    losses = dict(re.findall(r"^\| ([a-z+ ]+?) \|(?:[^|]*\|){4} ([0-9.]+) \|", md, re.M))
    assert {k for k in losses} >= {"hand", "trainkit eager", "trainkit jit"}
    assert all(abs(float(v) - float(losses["hand"])) < (1e-2 if "bf16" in k else 1e-4) for k, v in losses.items()), losses
    assert "goal >= 0.95x" in stdout


@pytest.mark.slow
def test_the_gpu_script_runs_its_cpu_parts(tmp_path):
    # No GPU here: --smoke runs the same code on the CPU at tiny sizes; contenders whose libraries are
    # missing (JAX, torchvision beside this torch) are recorded as failed and the others still run.
    run_script(["benchmarks/gpu.py"], tmp_path)
    md = (tmp_path / "gpu.md").read_text()
    assert "Smoke run" in md
    for contender in ("hand", "hand fused", "trainkit eager", "trainkit jit"):
        assert re.search(rf"^\| {contender} \| [0-9.]+ \|", md, re.M), md
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["meta"]["smoke"] is True and data["results"]
