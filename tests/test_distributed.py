"""distributed: real processes on loopback (gloo). 2 ranks == 1 process on the global batch; a dead peer is an error, not a hang."""

from __future__ import annotations

import datetime
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import trainkit as tk
from trainkit.testing import assert_trees_close, assert_trees_equal, check_step

WORKER = Path(__file__).parent / "workers" / "dist_worker.py"
F64 = dict(rtol=1e-6, atol=1e-6)


def _load_worker():
    spec = importlib.util.spec_from_file_location("dist_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


W = _load_worker()


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]), **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- 2 ranks under torchrun


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One torchrun launch of 2 gloo ranks running every phase of the worker; both ranks' results."""
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER), "train", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return out, results


def _reference_steps(step, state, batches):
    metrics = []
    for b in batches:
        state, m = step(state, b)
        metrics.append({k: v.item() for k, v in m.items()})
    return state, metrics


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["default", "small_buckets", "no_overlap"])
def test_two_ranks_equal_one_process_on_the_global_batch(ranks, variant):
    _, results = ranks
    expected, expected_m = _reference_steps(W.train_step, W.make_state(), W.global_batches())
    for r in results:
        got = r[f"A_{variant}"]
        assert_trees_close(got["params"], expected.params, **F64)
        assert_trees_close(got["opt_state"], expected.opt_state, **F64)
        # metrics averaged across ranks: the global batch's
        assert got["metrics"] == [pytest.approx(m, rel=1e-9, abs=1e-9) for m in expected_m]
    assert_trees_equal(results[0][f"A_{variant}"]["params"], results[1][f"A_{variant}"]["params"])


def test_gradient_accumulation_reduces_only_on_the_final_micro_step(ranks):
    # optim.MultiSteps under distributed: micro-steps 1 and 3 accumulate locally with no collective
    # (DDP's no_sync); 2 and 4 all-reduce the accumulator and the last gradient. Equal to one process
    # accumulating over the global batches.
    _, results = ranks
    state = W.make_state(tx=tk.optim.MultiSteps(tk.optim.adam(1e-2), every_k=2))
    for b in W.global_batches()[:4]:
        state, _ = W.train_step(state, b)
    for r in results:
        counts = r["F"]["collectives"]
        assert counts[0] == counts[2] == 0 and counts[1] > 0 and counts[3] == counts[1]
        assert_trees_close(r["F"]["params"], state.params, **F64)


@pytest.mark.slow
def test_parameters_without_gradient_on_one_rank_do_not_hang(ranks):
    _, results = ranks
    assert_trees_equal(results[0]["A2_params"], results[1]["A2_params"])


@pytest.mark.slow
def test_fit_gives_each_rank_its_shard_reshuffled_per_epoch(ranks):
    _, results = ranks
    rows = [r["B"]["rows"] for r in results]
    assert len(rows[0]) == len(rows[1]) == 8  # 30 rows per rank: 4 batches (8, 8, 8, 6) per epoch, 2 epochs
    everything = W.dataset(60, 1).tensors[0]
    for epoch in range(2):
        seen = torch.cat([torch.cat(rows[r][4 * epoch : 4 * epoch + 4]) for r in range(2)])
        assert seen.shape[0] == 60 and torch.equal(seen.sort(0).values, everything.sort(0).values)  # disjoint, complete
    assert not torch.equal(torch.cat(rows[0][:4]), torch.cat(rows[0][4:]))  # reshuffled for epoch 2


@pytest.mark.slow
def test_fit_on_two_ranks_equals_one_process_on_the_global_batches(ranks):
    _, results = ranks
    ds = W.dataset(60, 1)
    x_all, y_all = ds.tensors
    index = {tuple(row.tolist()): i for i, row in enumerate(x_all)}
    state = W.make_state(tx=tk.optim.sgd(0.1, momentum=0.9))
    val = torch.utils.data.DataLoader(W.dataset(21, 2), batch_size=21)
    history = results[0]["B"]["history"]
    sums, count, epoch = {"loss": 0.0, "acc": 0.0}, 0, 0
    for i in range(8):
        rows = torch.cat([results[0]["B"]["rows"][i], results[1]["B"]["rows"][i]])
        y = y_all[[index[tuple(r.tolist())] for r in rows]]
        state, m = W.train_step(state, (rows, y))
        count += len(rows)
        for k in sums:
            sums[k] += m[k].item() * len(rows)
        if i % 4 == 3:  # end of an epoch: the runner's metrics are the means over both ranks
            row = history[epoch]
            assert abs(row["train_loss"] - sums["loss"] / count) < 1e-9 and abs(row["train_acc"] - sums["acc"] / count) < 1e-9
            assert abs(row["val_loss"] - tk.evaluate(W.eval_step, state, val)["loss"]) < 1e-9  # 21 rows split 11 + 10
            sums, count, epoch = {"loss": 0.0, "acc": 0.0}, 0, epoch + 1
    for r in results:
        assert_trees_close(r["B"]["params"], state.params, **F64)
    assert results[0]["B"]["history"] == results[1]["B"]["history"]


@pytest.mark.slow
def test_fit_logs_and_checkpoints_on_rank_0_only(ranks):
    out, _ = ranks
    assert list((out / "logs-rank0").rglob("metrics.csv")) and not list((out / "logs-rank1").rglob("metrics.csv"))
    assert list((out / "ckpt-rank0").glob("step-*.pt")) and not (out / "ckpt-rank1").exists()


@pytest.mark.slow
def test_resumed_mid_epoch_run_equals_the_uninterrupted_one(ranks):
    _, results = ranks
    for r in results:
        assert_trees_equal(r["C"]["params"], r["B"]["params"])
        assert [h["epoch"] for h in r["C"]["history"]] == [1, 2]


@pytest.mark.slow
def test_composes_with_mixed_precision_and_early_stop_alike_on_every_rank(ranks):
    _, results = ranks
    d0, d1 = results[0]["D"], results[1]["D"]
    assert d0["stopped"] and d1["stopped"] and len(d0["history"]) == 3  # first evaluation, then patience=2
    assert d0["history"] == d1["history"] and d0["slot"]["stop"] == d1["slot"]["stop"]


@pytest.mark.slow
def test_ranks_starting_from_different_states_are_told(ranks):
    _, results = ranks
    for r in results:
        assert "start from different states" in r["E"]


# --------------------------------------------------------------------------- a peer dies or hangs


def _start_loop(out: Path, timeout: float) -> list[subprocess.Popen]:
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, str(WORKER), "loop", str(out), str(timeout)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 60
    while not all((out / f"ready-{r}").exists() for r in range(2)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise AssertionError("the ranks did not start: " + "".join(p.communicate()[1][-2000:] for p in procs))
        time.sleep(0.05)
    return procs


@pytest.mark.slow
def test_killed_peer_gives_the_survivor_a_clear_error(tmp_path):
    survivor, victim = _start_loop(tmp_path, timeout=30.0)
    time.sleep(0.3)  # mid-run: both ranks are stepping
    victim.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    try:
        _, err = survivor.communicate(timeout=30)
    finally:
        survivor.kill()
        victim.wait()
    elapsed = time.monotonic() - t0
    assert survivor.returncode not in (0, None)
    assert "DistributedError" in err and "rank 0 of 2" in err and "peer rank has died" in err, err[-3000:]
    assert elapsed < 10, f"the survivor took {elapsed:.1f}s to exit"  # detected at once, long before timeout=30


@pytest.mark.slow
def test_hung_peer_gives_the_survivor_a_clear_error_within_the_timeout(tmp_path):
    survivor, victim = _start_loop(tmp_path, timeout=2.0)
    victim.send_signal(signal.SIGSTOP)  # alive, connected, silent: only the timeout can tell
    t0 = time.monotonic()
    try:
        _, err = survivor.communicate(timeout=40)
    finally:
        survivor.kill()
        victim.kill()
        victim.wait()
    elapsed = time.monotonic() - t0
    assert survivor.returncode not in (0, None)
    assert "DistributedError" in err and "within timeout=2s" in err, err[-3000:]
    assert elapsed < 2 + 6, f"the survivor took {elapsed:.1f}s to exit with timeout=2"


# --------------------------------------------------------------------------- in this process: a group of one


@pytest.fixture
def group_of_one():
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _batch(n=6):
    x, y = W.global_batches()[0]
    return x[:n], y[:n]


def test_one_rank_is_the_step_and_passes_check_step(group_of_one):
    state, batch = W.make_state(), _batch()
    step = tk.distributed(W.train_step)
    assert tk.applied_transforms(step) == ("distributed",)
    got = check_step(step, state, batch)
    assert_trees_close(got, W.train_step(state, batch), rtol=1e-12, atol=1e-12)
    composed = tk.compose(tk.distributed(overlap=False, bucket_cap_mb=0.0001))(W.train_step)
    assert_trees_close(composed(state, batch), got, rtol=1e-12, atol=1e-12)


def test_sharded_params_on_one_rank_are_the_step_and_pass_check_step(group_of_one):
    from trainkit.transforms.distributed import gather_state, is_sharded, shard_state

    state, batch = W.make_state(), _batch()
    step = tk.distributed(W.train_step, params="fsdp")
    assert tk.applied_transforms(step) == ("distributed",)
    got, metrics = step(state, batch)  # a plain state is sharded on the way in; the caller's stays plain
    assert is_sharded(got) and not is_sharded(state)
    expected, expected_m = W.train_step(state, batch)
    assert_trees_close(gather_state(got).params, expected.params, rtol=1e-12, atol=1e-12)
    assert_trees_close(metrics, expected_m, rtol=1e-12, atol=1e-12)
    check_step(step, shard_state(state), batch)


def test_a_hook_outside_that_changes_gradients_is_respected(group_of_one):
    class Double(tk.StepHook):
        def grads(self, grads, params):
            return [2 * g for g in grads]

    state, batch = W.make_state(tx=tk.optim.sgd(0.1)), _batch()
    with tk.hooks(Double(), params=state.params):
        expected, _ = W.train_step(state, batch)
        got, _ = tk.distributed(W.train_step, bucket_cap_mb=0.0005)(state, batch)
    assert_trees_close(got.params, expected.params, rtol=1e-12, atol=1e-12)


def test_fit_under_a_group_of_one(group_of_one):
    loader = torch.utils.data.DataLoader(W.dataset(20, 0), batch_size=8, shuffle=True)
    state = W.make_state()
    a, ha = tk.fit(tk.distributed(W.train_step), state, loader, epochs=2, progress=False)
    b, hb = tk.fit(W.train_step, state, loader, epochs=2, progress=False)
    assert_trees_close(a.params, b.params, rtol=1e-12, atol=1e-12)


def test_step_without_value_and_grad_is_rejected(group_of_one):
    def step(state, batch):
        return state.replace(step=state.step + 1), {"loss": torch.tensor(0.0)}

    with pytest.raises(RuntimeError, match="no gradients through trainkit.value_and_grad"):
        tk.distributed(step)(W.make_state(), _batch())


# --------------------------------------------------------------------------- errors at wrap time


def test_without_torchrun_or_a_group_the_error_says_how_to_launch(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node 2"):
        tk.distributed(W.train_step)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"timeout": 0}, ValueError, "timeout must be a positive"),
        ({"timeout": "1"}, ValueError, "timeout must be a positive"),
        ({"bucket_cap_mb": 0}, ValueError, "bucket_cap_mb"),
        ({"overlap": 1}, TypeError, "overlap must be True or False"),
        ({"backend": "mpi"}, ValueError, "backend must be"),
    ],
)
def test_bad_arguments_fail_at_wrap_time(kw, error, match):
    with pytest.raises(error, match=match):
        tk.distributed(**kw)


def test_rejects_epoch_steps_other_parallel_transforms_and_foreign_groups():
    with pytest.raises(TypeError, match="batch step"):
        tk.distributed(tk.epoch_step(W.train_step))
    with pytest.raises(ValueError, match="already wrapped by data_parallel"):
        tk.distributed(tk.data_parallel(W.train_step, devices=["cpu"]))
    with pytest.raises(ValueError, match="already wrapped by distributed"):
        tk.data_parallel(_marked_distributed(), devices=["cpu"])
    with pytest.raises(TypeError, match="ProcessGroup"):
        tk.distributed(W.train_step, process_group="world")
    with pytest.raises(ValueError, match="compiled by tk.jit"):
        tk.distributed(tk.transforms.mark(lambda s, b: (s, {}), W.train_step, "jit"))
    with pytest.raises(ValueError, match="already wrapped by data_parallel"):  # sharded params: the same wrap-time checks
        tk.distributed(tk.data_parallel(W.train_step, devices=["cpu"]), params="fsdp")
    with pytest.raises(ValueError, match="params must be 'replicated' or 'fsdp'"):
        tk.distributed(W.train_step, params="zero3")


def _marked_distributed():
    # what tk.distributed(step) returns, without needing a process group here
    return tk.transforms.mark(lambda s, b: (s, {}), W.train_step, "distributed")


def test_state_must_be_a_train_state(group_of_one):
    with pytest.raises(TypeError, match="TrainState"):
        tk.distributed(W.train_step)({"params": 1}, _batch())


def test_runner_helpers_outside_distributed():
    from trainkit.transforms.distributed import reduce_means, shard_loader

    loader = torch.utils.data.DataLoader(W.dataset(5, 0), batch_size=2)
    assert shard_loader(loader, train=False) is loader  # no group: nothing to shard
    assert reduce_means({"a": 3.0, "b": torch.tensor(1.0)}, 2) == {"a": 1.5, "b": 0.5}
    assert reduce_means({}, 0) == {}


# --------------------------------------------------------------------------- xla_sharded where torch_xla is missing
# (its real tests are in tests/xla, run in the XLA venv by `make test`)


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla is installed here")
def test_xla_sharded_without_torch_xla_says_what_to_install():
    for call in (lambda: tk.xla_sharded(W.train_step), lambda: tk.xla_sharded(params="fsdp")):
        with pytest.raises(ImportError, match=r"pip install 'trainkit\[xla\]'"):
            call()
    with pytest.raises(ValueError, match="params must be"):  # arguments are checked first, everywhere
        tk.xla_sharded(params="zero3")
