"""distributed(params="fsdp"): sharded params on DTensor, sharded checkpoints (DCP), multi-node, elastic restart.

Real torchrun launches of gloo ranks on loopback: 4 ranks train and save a sharded
checkpoint; 2 ranks check equality with one process and resume the 4-rank checkpoint;
two torchrun agents rendezvous as two nodes; torchrun --max-restarts 1 restarts a group
whose rank was SIGKILLed. The comparisons with one process run here, in the test process.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import trainkit as tk
from trainkit.checkpoint import CheckpointError
from trainkit.sharded_checkpoint import ShardedCheckpointer, load_sharded, load_sharded_run, read_marker, save_sharded
from trainkit.testing import assert_trees_close, assert_trees_equal
from trainkit.transforms import distributed as D

WORKERS = Path(__file__).parent / "workers"
WORKER = WORKERS / "fsdp_worker.py"
F64 = dict(rtol=1e-6, atol=1e-6)


def _load(name: str):
    sys.path.insert(0, str(WORKERS))
    spec = importlib.util.spec_from_file_location(name, WORKERS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


W = _load("fsdp_worker")


def _env(**extra: str) -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]), **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _results(out: Path, mode: str, world: int) -> list[dict]:
    return [torch.load(out / f"{mode}-rank{r}.pt", weights_only=False) for r in range(world)]


def _steps(step, state, batches):
    for b in batches:
        state, _ = step(state, b)
    return state


# --------------------------------------------------------------------------- 4 ranks save, 2 ranks check and resume


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    _torchrun(["--standalone", "--nproc-per-node", "4", str(WORKER), "save4", str(out)])
    _torchrun(["--standalone", "--nproc-per-node", "2", str(WORKER), "equal", str(out)])
    return out, _results(out, "save4", 4), _results(out, "equal", 2)


@pytest.mark.slow
def test_sharded_adam_with_global_clipping_equals_one_process_on_the_global_batch(runs):
    _, four, two = runs
    for world, results, n in ((2, [r["adam_clip"] for r in two], None), (4, [r["state"] for r in four], 3)):
        expected = _steps(W.train_step, W.make_state(tx=W.clipped_adam()), W.global_batches(world)[:n])
        for r in results:
            assert_trees_close(r["params"], expected.params, **F64)
            assert_trees_close(r["opt_state"], expected.opt_state, **F64)
    for r in two:  # the gathers prefetched at the start of the step (overlap) or made as each module runs: same numbers
        assert_trees_equal(r["no_overlap"]["params"], r["adam_clip"]["params"])
    assert two[0]["adam_clip"]["local_shapes"]["0.weight"] == (8, 5)  # 16 rows over 2 ranks
    assert two[0]["adam_clip"]["local_shapes"]["4.bias"] == (2,) and two[1]["adam_clip"]["local_shapes"]["4.bias"] == (1,)


@pytest.mark.slow
def test_local_params_and_optimizer_state_are_about_one_over_world(runs):
    _, four, two = runs
    for world, per_rank in ((2, [r["adam_clip"] for r in two]), (4, four)):
        replicated = per_rank[0]["bytes_replicated"]
        assert sum(r["bytes"] for r in per_rank) == replicated  # every byte is held once, by one rank
        assert max(r["bytes"] for r in per_rank) <= 1.1 * replicated / world + 200  # uneven rows: a little over


@pytest.mark.slow
def test_bf16_and_gradient_accumulation_under_sharding(runs):
    _, _, two = runs
    from trainkit.transforms.mixed_precision import mixed_precision

    one = _steps(mixed_precision(W.train_step, dtype=torch.bfloat16), W.make_state(dtype=torch.float32),
                 W.global_batches(2, torch.float32))
    ms = _steps(W.train_step, W.make_state(tx=tk.optim.MultiSteps(tk.optim.adam(1e-2), every_k=2)), W.global_batches(2)[:4])
    for r in two:
        # the same per-rank bf16 arithmetic as the replicated mode; one process differs by bf16 rounding only
        assert_trees_close(r["bf16"]["fsdp"], r["bf16"]["replicated"], **F64)
        assert_trees_close(r["bf16"]["fsdp"], one.params, rtol=2e-2, atol=2e-2)
        assert_trees_close(r["multisteps"]["params"], ms.params, **F64)


@pytest.mark.slow
def test_evaluating_a_sharded_state_gathers_once_and_allows_uneven_batches(runs):
    _, _, two = runs
    assert [r["eval"]["batches"] for r in two] == [3, 2]  # 21 rows: 11 + 10, batches of 5
    for r in two:
        assert r["eval"]["sharded"] == pytest.approx(r["eval"]["whole"], rel=1e-12)


@pytest.mark.slow
def test_ranks_with_different_models_are_told_which_param_and_ranks(runs):
    _, _, two = runs
    for r in two:
        assert "param '0.weight': shape (16, 5) float64 on rank 0, shape (17, 5) float64 on rank 1" in r["mismatch"]


@pytest.mark.slow
def test_saved_by_4_ranks_resumed_by_2_continues_bit_identically(runs):
    out, four, two = runs
    for r in two:
        assert r["resumed"]["step"] == 5 and r["resumed"]["meta"] == {"epoch": 0, "batch": 3, "history": []}
        assert_trees_equal(r["resumed"]["params"], r["uninterrupted"]["params"])
        assert_trees_equal(r["resumed"]["opt_state"], r["uninterrupted"]["opt_state"])
    # one process (no process group) loads it whole, for inference
    ck = ShardedCheckpointer(out / "ck4")
    state = load_sharded(ck.latest(), like=W.make_state(tx=W.clipped_adam()))
    assert_trees_equal(state.params, four[0]["state"]["params"])
    assert_trees_equal(state.opt_state, four[0]["state"]["opt_state"])
    x = W.global_batches(4)[0][0]
    assert torch.equal(tk.to_module(state)(x), state.apply(None, x)[0])
    assert len(list(ck.latest().glob("*.distcp"))) == 4 and read_marker(ck.latest())["world_size"] == 4


@pytest.mark.slow
def test_loading_into_another_model_names_what_differs(runs):
    out, _, _ = runs
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    like = tk.TrainState.create(other, W.clipped_adam(), dtype=torch.float64)
    with pytest.raises(CheckpointError) as e:
        load_sharded(ShardedCheckpointer(out / "ck4").latest(), like=like)
    msg = str(e.value)
    assert "params '2.weight': checkpoint (16, 16) float64, model (4, 16) float64" in msg
    assert "params '4.weight' (3, 16) float64 is in the checkpoint, not in the model" in msg


# --------------------------------------------------------------------------- sharded checkpoints in one process


def _state(tx=None):
    return W.make_state(tx=tx or tk.optim.adam(1e-2))


def test_sharded_checkpoint_round_trip_in_one_process(tmp_path):
    state = _steps(W.train_step, _state(tk.optim.MultiSteps(tk.optim.adam(1e-2), every_k=2)), W.global_batches()[:3])
    state = state.replace(slots={"mine": {"scale": torch.tensor(2.0), "n": 3, "name": "x", "t": (1, None)}})
    path = save_sharded(state, tmp_path / "step-3", meta={"epoch": 1, "history": [{"loss": 0.5}]})
    back, meta = load_sharded_run(path, like=_state(tk.optim.MultiSteps(tk.optim.adam(1e-2), every_k=2)))
    assert_trees_equal(back.params, state.params)
    assert_trees_equal(back.opt_state, state.opt_state)
    assert back.step == 3 and back.rng == state.rng and meta == {"epoch": 1, "history": [{"loss": 0.5}]}
    assert torch.equal(back.slots["mine"]["scale"], torch.tensor(2.0)) and back.slots["mine"]["t"] == (1, None)
    with pytest.raises(CheckpointError, match="another layout"):
        load_sharded(path, like=_state(tk.optim.sgd(0.1)))


def test_only_checkpoints_with_their_marker_count(tmp_path):
    ck = ShardedCheckpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        ck.save(_state().replace(step=step))
    assert [p.name for p in ck.checkpoints()] == ["step-000000002", "step-000000003"]
    (tmp_path / "step-000000003" / "trainkit.json").unlink()  # as a save that died before its marker
    assert ck.latest().name == "step-000000002"
    with pytest.raises(CheckpointError, match="no complete sharded checkpoint"):
        load_sharded(tmp_path / "step-000000003", like=_state())
    ck.save(_state().replace(step=4))  # the leftover goes with the next save
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step-000000002", "step-000000004"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_tampered_metadata_file_is_refused_without_running_code(tmp_path):
    path = save_sharded(_state(), tmp_path / "step-0")
    (path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match=r"refused .*posix.system|refused .*os.system|not allowed"):
        load_sharded(path, like=_state())


def test_fit_resumes_from_a_sharded_checkpoint_in_one_process(tmp_path):
    loader = [W.global_batches()[i] for i in range(4)]
    ck = ShardedCheckpointer(tmp_path, every_n_steps=2)
    a, _ = tk.fit(W.train_step, _state(), loader, epochs=2, progress=False)
    tk.fit(W.train_step, _state(), loader, epochs=1, checkpoint=ck, progress=False)
    b, _ = tk.fit(W.train_step, _state(), loader, epochs=2, checkpoint=ck, resume="latest", progress=False)
    assert_trees_equal(b.params, a.params)


def test_sharded_state_helpers_outside_distributed():
    s = _state()
    assert not D.is_sharded(s) and D.gather_state(s) is s
    assert D.local_state_bytes(s) == 3 * sum(t.numel() * 8 for t in s.params.values())
    with pytest.raises(ValueError, match="params must be 'replicated' or 'fsdp', got 'zero3'"):
        tk.distributed(params="zero3")


# --------------------------------------------------------------------------- a peer dies mid-step


@pytest.mark.slow
@pytest.mark.parametrize("sig, timeout, expect", [(signal.SIGKILL, "30", "peer rank has died"), (signal.SIGSTOP, "2", "within timeout=2s")])
def test_a_dead_or_hung_peer_of_a_sharded_step_gives_the_survivor_a_clear_error(tmp_path, sig, timeout, expect):
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "loop", str(tmp_path), timeout], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    survivor, victim = procs
    deadline = time.monotonic() + 90
    while not all((tmp_path / f"ready-{r}").exists() for r in range(2)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise AssertionError("the ranks did not start: " + "".join(p.communicate()[1][-2000:] for p in procs))
        time.sleep(0.05)
    victim.send_signal(sig)
    t0 = time.monotonic()
    try:
        _, err = survivor.communicate(timeout=40)
    finally:
        survivor.kill()
        victim.kill()
        victim.wait()
    assert survivor.returncode not in (0, None)
    assert "DistributedError" in err and "rank 0 of 2" in err and expect in err, err[-3000:]
    assert time.monotonic() - t0 < 15


# --------------------------------------------------------------------------- two nodes, and elastic restarts


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes_equal_one_process(tmp_path):
    port = _free_port()
    common = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "tk-test"]
    agents = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *common, "--nproc-per-node", str(n),
                          str(WORKER), "multinode", str(tmp_path)], env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for n in (2, 1)
    ]
    try:
        outs = [a.communicate(timeout=240) for a in agents]
    finally:
        for a in agents:
            a.kill()
    for a, (o, e) in zip(agents, outs, strict=True):
        assert a.returncode == 0, o[-2000:] + e[-5000:]
    results = _results(tmp_path, "multinode", 3)
    expected = _steps(W.train_step, W.make_state(tx=W.clipped_adam()), W.global_batches(3))
    for r in results:
        assert r["world"] == 3
        for mode in ("fsdp", "replicated"):
            assert_trees_close(r[mode]["params"], expected.params, **F64)


def _elastic(tmp_path: Path, mode: str) -> list[dict]:
    _torchrun(["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.2",
               str(WORKER), "elastic", str(tmp_path), mode], timeout=300)
    return _results(tmp_path, f"elastic-{mode}", 2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replicated", "fsdp"])
def test_a_rank_killed_mid_epoch_restarts_and_ends_bit_identical(tmp_path, mode):
    results = _elastic(tmp_path, mode)
    for r in results:
        assert r["attempt"] == 1  # torchrun restarted the group once
        # replicated: killed in the step at 5, the last save was step 4; fsdp: killed while saving step 6
        assert r["latest_at_start"].endswith("step-000000004" + (".pt" if mode == "replicated" else ""))
        assert_trees_equal(r["params"], r["uninterrupted"])
        assert [h["epoch"] for h in r["history"]] == [1, 2, 3]
    assert_trees_equal(results[0]["params"], results[1]["params"])
