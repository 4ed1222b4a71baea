"""Loggers under torchrun: 2 real gloo ranks build the same loggers; only rank 0 writes, once."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import trainkit as tk

WORKER = Path(__file__).parent / "workers" / "logger_worker.py"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    return env


@pytest.mark.slow
def test_two_ranks_write_one_version_folder_from_rank_0(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(WORKER), str(root), str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    assert sorted(p.name for p in root.iterdir()) == ["csv", "jsonl", "tb"]
    for name in ("csv", "jsonl", "tb"):
        assert [p.name for p in (root / name).iterdir()] == ["version_0"], name
    seen = [json.loads((out / f"rank{r}.json").read_text())["log_dirs"] for r in (0, 1)]
    assert seen[0] == {name: str(root / name / "version_0") for name in ("tb", "csv", "jsonl")}
    assert seen[1] == {"tb": None, "csv": None, "jsonl": None}

    # rank 0's values only (rank 1 logged 10 more), the write after close included
    scalars = tk.read_scalars(root / "tb" / "version_0")
    assert scalars["loss"] == [(1, 1.0), (2, 2.0)]
    assert scalars["test/loss"] == [(3, 3.0)]
    assert scalars["hp/acc"] == [(0, pytest.approx(0.9))]
    assert json.loads((root / "tb" / "version_0" / "hparams.json").read_text()) == {"lr": 0.1, "rank": 0}
    rows = list(csv.DictReader(open(root / "csv" / "version_0" / "metrics.csv")))
    assert [(r["step"], r["loss"] or r["hp/acc"] or r["test/loss"]) for r in rows] == [
        ("0", "0.9"), ("1", "1.0"), ("2", "2.0"), ("3", "3.0")]
    lines = [json.loads(x) for x in (root / "jsonl" / "version_0" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 0, "hp/acc": 0.9}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
                     {"step": 3, "test/loss": 3.0}]
