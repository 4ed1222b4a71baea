"""The benchmark suite: trainkit's steps against a hand-written PyTorch loop (and Lightning), on CPU.

    python benchmarks/suite.py            # the three workloads; writes benchmarks/results/cpu.md and cpu.png
    python benchmarks/suite.py --smoke    # seconds: checks that the suite runs (used by the tests)

Every contender does the same work: the same initial weights (one model, copied),
the same batches in the same order (in memory: data loading is not timed), Adam
with the same hyperparameters, the same number of steps; at the end each one's
loss on a held-out batch is compared with the hand-written loop's. The runs are
interleaved: each round runs every contender for the same number of steps, in a
rotating order, all in this one process (separate processes on a 2-core machine
vary up to 2x; interleaved runs agree within a few percent). A contender's time
per step is the median over rounds; its ratio is the hand-written loop's time
divided by its own (higher is faster).

Contenders:
  hand             zero_grad / forward / backward / torch.optim.Adam.step, as a PyTorch user writes it
  trainkit eager   the step as fit runs it (donated: in-place foreach updates)
  trainkit jit     tk.jit(step): forward, backward and Adam compiled as one graph (inductor)
  trainkit bf16    tk.mixed_precision(step, dtype=torch.bfloat16), eager
  trainkit jit+bf16  tk.jit(tk.mixed_precision(step, dtype=torch.bfloat16))
  lightning        a LightningModule and Trainer (no logger, no progress bar, no checkpoints), when installed
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import logging
import os
import platform
import sys
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
from trainkit.bench import Comparison, StepTiming  # noqa: E402

HERE = Path(__file__).resolve().parent
LR = 1e-3


# --------------------------------------------------------------------------- workloads


def mlp(*sizes: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        return nn.Sequential(*layers)

    return make


def lenet() -> nn.Module:
    """LeNet-5 on 1x28x28 (padding 2 on the first conv, as on MNIST): 61,706 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )  # fmt: skip


@dataclass(frozen=True)
class Workload:
    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch_size: int
    steps_per_round: int


WORKLOADS = {
    "mlp-32-64-10": Workload("MLP 32-64-10, batch 64", mlp(32, 64, 10), (32,), 64, 200),
    "mlp-784-512-512-10": Workload("MLP 784-512-512-10, batch 128", mlp(784, 512, 512, 10), (784,), 128, 40),
    "lenet": Workload("LeNet-5 CNN on 1x28x28, batch 64", lenet, (1, 28, 28), 64, 40),
}


def make_batches(w: Workload, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of a learnable task: the labels are a fixed random network's argmax (a teacher of
    the same architecture, so every contender can learn it).

    (Random labels would be memorised: the held-out loss would then grow without bound, chaotically,
    and the runs' final losses would say nothing about whether they did the same work.)
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        teacher = w.make()
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(n):
            x = torch.randn(w.batch_size, *w.input_shape, generator=g)
            out.append((x, teacher(x).argmax(1)))
    return out


# --------------------------------------------------------------------------- contenders


def train_step(state: tk.TrainState, batch: tuple) -> tuple[tk.TrainState, dict]:
    x, y = batch
    loss, grads = tk.value_and_grad(lambda p: F.cross_entropy(state.apply(p, x)[0], y))(state.params)
    return state.apply_gradients(grads), {"loss": loss}


class Hand:
    """What a PyTorch user writes."""

    def __init__(self, model: nn.Module, batches: list) -> None:
        self.model, self.batches = model, batches
        self.opt = torch.optim.Adam(model.parameters(), lr=LR)

    def run(self, start: int, steps: int) -> None:
        model, opt, batches, n = self.model, self.opt, self.batches, len(self.batches)
        for i in range(start, start + steps):
            x, y = batches[i % n]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())


class Trainkit:
    """A trainkit step folded over the batches as fit folds it: the state donated, metrics left as tensors."""

    def __init__(self, model: nn.Module, batches: list, step: Callable[..., Any]) -> None:
        self.state = tk.TrainState.create(model, tk.optim.adam(LR))
        self.batches, self.step = batches, step

    def run(self, start: int, steps: int) -> None:
        state, step, batches, n = self.state, self.step, self.batches, len(self.batches)
        with tk.donating():
            for i in range(start, start + steps):
                state, _ = step(state, batches[i % n])
        self.state = state

    def weights(self) -> dict[str, torch.Tensor]:
        return self.state.params


class Lightning:
    """A LightningModule with automatic optimization, fitted for each round's steps by a fresh Trainer.

    The optimizer is made once and handed back by configure_optimizers, so Adam's
    state carries over between rounds as in the other contenders. The time is taken
    from the first training batch to the end of training (the Trainer's set-up is not counted).
    """

    def __init__(self, model: nn.Module, batches: list) -> None:
        import pytorch_lightning as pl

        self.pl = pl
        opt = torch.optim.Adam(model.parameters(), lr=LR)

        class Module(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
                x, y = batch
                return F.cross_entropy(self.model(x), y)

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return opt

        class Clock(pl.Callback):
            def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
                if batch_idx == 0:
                    self.t0 = time.perf_counter()

            def on_train_end(self, trainer: Any, module: Any) -> None:
                self.seconds = time.perf_counter() - self.t0

        self.module, self.clock, self.batches = Module(), Clock(), batches

    def run(self, start: int, steps: int) -> float:
        n = len(self.batches)
        data = _Iterable([self.batches[i % n] for i in range(start, start + steps)])
        trainer = self.pl.Trainer(
            max_steps=steps, max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            callbacks=[self.clock],
        )  # fmt: skip
        trainer.fit(self.module, train_dataloaders=data)
        return self.clock.seconds

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(self.module.model.named_parameters())


class _Iterable:
    """One iterable of batches (Lightning reads a plain list as a collection of loaders)."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __iter__(self) -> Any:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def lightning_available() -> str | None:
    try:
        import pytorch_lightning as pl
    except ImportError:
        return None
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LR scheduler).*")
    return pl.__version__


def contenders(w: Workload, model: nn.Module, batches: list, *, jit_backend: str, lightning: bool) -> dict[str, Any]:
    mp = getattr(tk, "mixed_precision", None)
    bf16 = mp(train_step, dtype=torch.bfloat16) if mp is not None else None
    out: dict[str, Any] = {
        "hand": Hand(copy.deepcopy(model), batches),
        "trainkit eager": Trainkit(copy.deepcopy(model), batches, train_step),
        "trainkit jit": Trainkit(copy.deepcopy(model), batches, tk.jit(train_step, backend=jit_backend)),
    }
    if bf16 is not None:
        out["trainkit bf16"] = Trainkit(copy.deepcopy(model), batches, bf16)
        out["trainkit jit+bf16"] = Trainkit(copy.deepcopy(model), batches, tk.jit(bf16, backend=jit_backend))
    if lightning:
        out["lightning"] = Lightning(copy.deepcopy(model), batches)
    return out


# --------------------------------------------------------------------------- the interleaved run


@dataclass
class Result:
    workload: Workload
    timings: Comparison
    final_loss: dict[str, float]
    warmup_s: dict[str, float]


def run_workload(w: Workload, *, rounds: int, steps: int, warmup: int, jit_backend: str, lightning: bool, seed: int = 0) -> Result:
    torch.manual_seed(seed)
    model = w.make()
    batches = make_batches(w, 32, seed)
    held_out = make_batches(w, 1, seed + 1)[0]
    runners = contenders(w, model, batches, jit_backend=jit_backend, lightning=lightning)
    names = list(runners)
    warm: dict[str, float] = {}
    for name, r in runners.items():  # the same warm-up steps for all (the jitted steps compile here)
        t0 = time.perf_counter()
        r.run(0, warmup)
        warm[name] = time.perf_counter() - t0
    per_step: dict[str, list[float]] = {k: [] for k in names}
    start = warmup
    for rnd in range(rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]  # rotate: no contender always goes first
        for name in order:
            t0 = time.perf_counter()
            inner = runners[name].run(start, steps)
            seconds = inner if isinstance(inner, float) else time.perf_counter() - t0
            per_step[name].append(seconds / steps)
        start += steps
    x, y = held_out
    final = {}
    with torch.no_grad():
        for name, r in runners.items():
            params = {k: v.detach() for k, v in r.weights().items()}
            final[name] = float(F.cross_entropy(torch.func.functional_call(model, params, (x,)), y))
    timings = Comparison({k: StepTiming(k, tuple(v), "cpu") for k, v in per_step.items()})
    return Result(w, timings, final, warm)


# --------------------------------------------------------------------------- reports


_ENV_NOTED = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")  # they change the timings


def environment(lightning_version: str | None) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), trainkit {tk.__version__}, "
        f"Python {platform.python_version()}; Lightning {lightning_version or 'not installed'}"
        + "".join(f"; {k}={os.environ[k]}" for k in _ENV_NOTED if k in os.environ)
    )


def markdown(results: list[Result], env: str, rounds: int) -> str:
    lines = [f"Measured {env}.", ""]
    for r in results:
        t, hand = r.timings, r.timings["hand"].median
        lines += [
            f"### {r.workload.name}",
            "",
            f"{rounds} interleaved rounds of {r.workload.steps_per_round} steps; time per step: median over rounds (IQR).",
            "",
            "| contender | ms/step | IQR (ms) | steps/s | vs hand | final loss | Δ vs hand | warm-up (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, s in t.items():
            d = r.final_loss[name] - r.final_loss["hand"]
            lines.append(
                f"| {name} | {s.median * 1e3:.3f} | {s.q1 * 1e3:.3f}-{s.q3 * 1e3:.3f} | {s.steps_per_s:,.0f} | "
                f"{hand / s.median:.2f}x | {r.final_loss[name]:.5f} | {d:+.1e} | {r.warmup_s[name]:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def goals(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        s = r.timings.speedups()
        if "hand" not in s or "trainkit eager" not in s:
            continue
        eager = s["trainkit eager"] / s["hand"]
        out.append(f"{r.workload.name}: trainkit eager {eager:.2f}x the hand loop (goal >= 0.95x): {'met' if eager >= 0.95 else 'MISSED'}")
        if r.workload.input_shape == (32,):
            j = s["trainkit jit"] / s["hand"]
            out.append(f"{r.workload.name}: trainkit jit {j:.2f}x the hand loop (goal >= 2.5x): {'met' if j >= 2.5 else 'MISSED'}")
    return out


def chart(results: list[Result], path: Path, env: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(7, 1.2 + 2.1 * len(results)), squeeze=False)
    for ax, r in zip(axes[:, 0], results, strict=True):
        r.timings.plot(ax=ax, title=r.workload.name)
    fig.suptitle("steps/s on CPU; labels: speed vs the hand-written loop", fontsize=10)
    fig.text(0.01, 0.005, env, fontsize=6, color="gray")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Result]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=None, help="steps per round (default: per workload)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first, for every contender (jit compiles here)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder for cpu.md and cpu.png")
    p.add_argument("--no-lightning", action="store_true", help="leave Lightning out even when installed")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--smoke", action="store_true", help="the tiny MLP, 2 rounds of 5 steps, jit on aot_eager: a check, not a measurement")
    args = p.parse_args(argv)

    jit_backend = "inductor"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.workloads, args.rounds, args.steps, args.warmup, jit_backend = ["mlp-32-64-10"], 2, 5, 2, "aot_eager"
    pl_version = None if args.no_lightning else lightning_available()
    env = environment(pl_version)
    print(f"trainkit benchmark suite: {env}", flush=True)
    if getattr(tk, "mixed_precision", None) is None:
        print("trainkit.mixed_precision is not in this tree: the bf16 contenders are left out.")
    results = []
    for key in args.workloads:
        w = WORKLOADS[key]
        if args.steps:
            w = Workload(w.name, w.make, w.input_shape, w.batch_size, args.steps)
        print(f"\n{w.name}: {args.rounds} rounds x {w.steps_per_round} steps ...", flush=True)
        r = run_workload(
            w, rounds=args.rounds, steps=w.steps_per_round, warmup=args.warmup, jit_backend=jit_backend, lightning=pl_version is not None
        )
        print(r.timings.table())
        print("final loss on a held-out batch: " + ", ".join(f"{k} {v:.5f}" for k, v in r.final_loss.items()))
        results.append(r)
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(results, env, args.rounds)
    lines = goals(results)
    if lines:
        md += "\n" + "\n".join(f"- {g}" for g in lines) + "\n"
    (args.out / "cpu.md").write_text(md)
    chart(results, args.out / "cpu.png", env)
    print("\n" + "\n".join(lines))
    print(f"\nwrote {args.out / 'cpu.md'} and {args.out / 'cpu.png'}")
    return results


if __name__ == "__main__":
    main()
