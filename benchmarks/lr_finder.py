"""LR finder suggestions against a grid of fixed LRs and against Lightning's, on four small real tasks.

    python benchmarks/lr_finder.py             # the four tasks (a few minutes on 2 cores); prints the tables
    python benchmarks/lr_finder.py --steps 60  # quicker, rougher

For each task, every contender starts from the same initial weights (one model,
copied) and trains on the same batches in the same order (drawn once with a fixed
seed) for the same number of steps at a constant LR, with the task's optimizer;
its *final loss* is the loss on a held-out set after the last step (a diverged
run counts as inf): what the LR is chosen for, and it has a floor (label noise, or
the gap between training and held-out data) that makes ratios to the best meaningful,
where a training loss heading for 0 would make them noise. Contenders:

  grid        each of 12 LRs log-spaced over the task's range (the reference: its best)
  valley      trainkit's default suggestion, ``tk.find_lr(...).suggestion``
  steepest    trainkit's ``suggestions["steepest"]`` (the rule Lightning uses, on log-LR)
  minimum     trainkit's ``suggestions["minimum"]`` (the LR of the lowest smoothed loss / 10)
  lightning   ``Tuner(trainer).lr_find(...).suggestion()`` on a LightningModule holding a copy
              of the same model and the same optimizer

Both finders sweep the same range (1e-7 to 10, 100 steps, exponential, early stop at 4x)
on the same batches, from the same initial weights; only the rule (and the finder's own
bookkeeping) differs. The ratio is a contender's final loss over the grid's best.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import io
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import trainkit as tk  # noqa: E402

SWEEP = {"min_lr": 1e-7, "max_lr": 10.0, "num_steps": 100}
RULES = ("valley", "steepest", "minimum")


# --------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """A model, its loss, the data and the optimizer family: everything a contender shares."""

    name: str
    make_model: Callable[[], nn.Module]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    optimizer: str  # "adam" or "sgd"
    grid: tuple[float, float]  # log10 range of the grid
    batch_size: int = 64


def digits_task(name: str, make_model: Callable[[], nn.Module]) -> Task:
    splits = tk.data.digits(seed=0)
    return Task(name, make_model, F.cross_entropy, *splits.train, *splits.val, "adam", (-4.5, 0.5))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )


class GRURegressor(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


def gru_task(n: int = 2048, n_val: int = 512, length: int = 20) -> Task:
    """The sum of a sequence of 20 standard normals read at its end (unit variance), plus noise of variance 0.04."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n + n_val, length, 1, generator=g)
    y = x.sum(dim=1) / math.sqrt(length) + 0.2 * torch.randn(n + n_val, 1, generator=g)
    return Task("gru sum", GRURegressor, F.mse_loss, x[:n], y[:n], x[n:], y[n:], "adam", (-4.5, 0.5))


def regression_task(n: int = 2048, n_val: int = 512, d: int = 16) -> Task:
    """Noisy linear regression (noise variance 1, signal variance ~10), plain SGD: 2/L is the stable limit."""
    g = torch.Generator().manual_seed(2)
    scales = torch.logspace(0.5, -1, d)
    x = torch.randn(n + n_val, d, generator=g) * scales
    y = x @ torch.randn(d, 1, generator=g) + 1.0 * torch.randn(n + n_val, 1, generator=g)
    model = lambda: nn.Linear(d, 1)  # noqa: E731
    return Task("noisy regression", model, F.mse_loss, x[:n], y[:n], x[n:], y[n:], "sgd", (-4.0, 0.0), batch_size=32)


def two_over_l(task: Task) -> float:
    """The stable limit of full-batch gradient descent on mean((xw + b - y)^2): 2 / the Hessian's top eigenvalue."""
    xb = torch.cat([task.x.double(), torch.ones(len(task.x), 1, dtype=torch.float64)], dim=1)
    return 2 / torch.linalg.eigvalsh(2 * xb.T @ xb / len(xb)).max().item()


def batches(task: Task, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled epochs of mini-batches, drawn once: every contender sees these, in this order."""
    g = torch.Generator().manual_seed(seed)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(out) < steps:
        perm = torch.randperm(len(task.x), generator=g)
        for i in range(0, len(perm) - task.batch_size + 1, task.batch_size):
            idx = perm[i : i + task.batch_size]
            out.append((task.x[idx], task.y[idx]))
    return out[:steps]


# --------------------------------------------------------------------------- training at a fixed LR


def torch_optimizer(task: Task, params: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr) if task.optimizer == "adam" else torch.optim.SGD(params, lr=lr)


def train_at(task: Task, init: nn.Module, data: list[Any], lr: float) -> float:
    """Final held-out loss after training a copy of ``init`` at ``lr`` on ``data`` (inf if it diverged)."""
    model = copy.deepcopy(init)
    opt = torch_optimizer(task, model.parameters(), lr)
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = task.loss_fn(model(x), y)
        if not torch.isfinite(loss):
            return math.inf
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = task.loss_fn(model(task.x_val), task.y_val).item()
    return final if math.isfinite(final) else math.inf


# --------------------------------------------------------------------------- the finders


def trainkit_find(task: Task, init: nn.Module, data: list[Any]) -> Any:
    tx = tk.optim.adam(1e-3) if task.optimizer == "adam" else tk.optim.sgd(1e-3)
    state = tk.TrainState.create(copy.deepcopy(init), tx)

    def step(state: tk.TrainState, batch: Any) -> tuple[tk.TrainState, dict[str, torch.Tensor]]:
        x, y = batch
        loss, grads = tk.value_and_grad(lambda p: task.loss_fn(state.apply(p, x)[0], y))(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    return tk.find_lr(step, state, data, **SWEEP)


def lightning_find(task: Task, init: nn.Module, data: list[Any]) -> float | None:
    import pytorch_lightning as pl
    from pytorch_lightning.tuner import Tuner

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = copy.deepcopy(init)
            self.lr = 1e-3

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return task.loss_fn(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch_optimizer(task, self.parameters(), self.lr)

    class Batches(torch.utils.data.Dataset):  # the same batches, in the same order
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> Any:
            return data[i]

    loader = torch.utils.data.DataLoader(Batches(), batch_size=None, shuffle=False)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # after the import, which sets them to INFO
    with tempfile.TemporaryDirectory() as root, contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=1000,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        finder = Tuner(trainer).lr_find(
            Module(), train_dataloaders=loader, min_lr=SWEEP["min_lr"], max_lr=SWEEP["max_lr"], num_training=SWEEP["num_steps"]
        )
        return None if finder is None else finder.suggestion()


# --------------------------------------------------------------------------- one task


def run_task(task: Task, steps: int, grid_points: int, seeds: int) -> dict[str, Any]:
    """Every contender on ``seeds`` draws of (initial weights, batches); losses are means over the draws.

    Near the edge of stability a single run's final loss is chaotic (one draw can be 3x
    another at the same LR), so each figure averages the draws; each draw runs its own
    sweeps (trainkit's and Lightning's) and trains at its own suggestions.
    """
    grid = [10 ** (task.grid[0] + (task.grid[1] - task.grid[0]) * i / (grid_points - 1)) for i in range(grid_points)]
    t0 = time.perf_counter()
    grid_runs: list[list[float]] = []
    lrs: dict[str, list[float | None]] = {k: [] for k in (*RULES, "lightning")}
    runs: dict[str, list[float]] = {k: [] for k in lrs}
    message = stop = ""
    for seed in range(seeds):
        torch.manual_seed(seed)
        init = task.make_model()
        train = batches(task, steps, seed=seed)
        sweep_data = batches(task, SWEEP["num_steps"], seed=1000 + seed)  # the finders' batches (shared by both)
        grid_runs.append([train_at(task, init, train, lr) for lr in grid])
        found = trainkit_find(task, init, sweep_data)
        suggested = {**{r: found.suggestions[r] for r in RULES}, "lightning": lightning_find(task, init, sweep_data)}
        for k, lr in suggested.items():
            lrs[k].append(lr)
            runs[k].append(math.inf if lr is None else train_at(task, init, train, lr))
        if seed == 0:
            message, stop = found.message, found.stop_reason
    grid_loss = [sum(col) / seeds for col in zip(*grid_runs, strict=True)]
    best = min(grid_loss)
    return {
        "task": task,
        "grid": grid,
        "grid_loss": grid_loss,
        "best": best,
        "best_lr": grid[grid_loss.index(best)],
        "lrs": lrs,
        "losses": {k: sum(v) / seeds for k, v in runs.items()},
        "message": message,
        "stop": stop,
        "two_over_l": two_over_l(task) if task.optimizer == "sgd" else None,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- report


def fmt_loss(v: float | None) -> str:
    return "-" if v is None else ("inf" if not math.isfinite(v) else f"{v:.4g}")


def fmt_ratio(v: float | None, best: float) -> str:
    return "-" if v is None else ("inf" if not math.isfinite(v) else f"{v / best:.2f}")


def report(results: list[dict[str, Any]], steps: int, seeds: int) -> str:
    lines = [f"Grid ({len(results[0]['grid'])} LRs, {steps} steps each) and final held-out loss, mean of {seeds} draws:", ""]
    for r in results:
        cells = ", ".join(f"{lr:.2g}: {fmt_loss(v)}" for lr, v in zip(r["grid"], r["grid_loss"], strict=True))
        lines.append(f"**{r['task'].name}** ({r['task'].optimizer}): {cells}")
        lines.append("")
    lines += [
        "| task | grid best (lr) | valley lr | valley loss (x best) | steepest lr | steepest loss (x best) | "
        "minimum lr | minimum loss (x best) | Lightning lr | Lightning loss (x best) | valley vs Lightning |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        best, lrs, losses = r["best"], r["lrs"], r["losses"]
        cells = [r["task"].name, f"{best:.4g} ({r['best_lr']:.2g})"]
        for k in (*RULES, "lightning"):
            cells += [" / ".join("-" if v is None else f"{v:.2g}" for v in lrs[k]), f"{fmt_loss(losses[k])} ({fmt_ratio(losses[k], best)})"]
        v, light = losses["valley"], losses["lightning"]
        cells.append("-" if v is None or light is None else ("better" if v < light else ("same" if v == light else "worse")))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in results:
        tol = r["two_over_l"]
        at = " / ".join("-" if v is None else f"{v / tol:.2g}" for v in r["lrs"]["valley"]) if tol else ""
        extra = f"; 2/L = {tol:.3g}, valley at {at} x 2/L" if tol else ""
        lines.append(f"- {r['task'].name}, draw 0: {r['message']}; {r['stop']}{extra} ({r['seconds']:.0f} s for the task)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per contender (default 300)")
    parser.add_argument("--grid", type=int, default=12, help="LRs in the grid (default 12)")
    parser.add_argument("--seeds", type=int, default=3, help="draws of (initial weights, batches) per task (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core machine)")
    parser.add_argument("--tasks", default="mlp,cnn,gru,regression", help="comma-separated subset of mlp,cnn,gru,regression")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    makers = {
        "mlp": lambda: digits_task("digits mlp", mlp),
        "cnn": lambda: digits_task("digits cnn", cnn),
        "gru": gru_task,
        "regression": regression_task,
    }
    t0 = time.perf_counter()
    results = [run_task(makers[name](), args.steps, args.grid, args.seeds) for name in args.tasks.split(",")]
    import pytorch_lightning as pl

    cpu = platform.processor() or platform.machine()
    print(f"{dt.date.today()}, torch {torch.__version__}, pytorch-lightning {pl.__version__}, {cpu}, {os.cpu_count()} cores, "
          f"{args.threads} thread(s), {args.seeds} draws, {time.perf_counter() - t0:.0f} s in all\n")
    print(report(results, args.steps, args.seeds))


if __name__ == "__main__":
    main()
