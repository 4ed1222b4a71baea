"""One rank of tests/test_loggers_dist.py: every rank builds the same loggers and logs.

    python -m torch.distributed.run --standalone --nproc-per-node 2 logger_worker.py ROOT OUT

The TensorBoard logger is built before the process group is up (it reads torchrun's RANK),
the CSV and JSONL loggers after. Each rank logs values that name it (10 * rank + step), closes,
logs once more after close, and writes what it saw to OUT/rank{r}.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

import trainkit as tk


def main(root: str, out: str) -> None:
    loggers = {"tb": tk.TensorBoardLogger(root, name="tb")}
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    loggers["csv"] = tk.CSVLogger(root, name="csv")
    loggers["jsonl"] = tk.JSONLLogger(root, name="jsonl")
    dist.barrier()  # both ranks have built their loggers before anyone writes
    for log in loggers.values():
        log.log_hyperparams({"lr": 0.1, "rank": rank}, metrics={"hp/acc": 0.9 + rank})
        for step in (1, 2):
            log.log_metrics({"loss": 10.0 * rank + step}, step)
        log.flush()
        log.close()
        log.log_metrics({"test/loss": 10.0 * rank + 3}, 3)  # after close: reopens
        log.close()
    seen = {name: None if log.log_dir is None else str(log.log_dir) for name, log in loggers.items()}
    Path(out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "log_dirs": seen}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
