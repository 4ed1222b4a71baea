"""The benchmark suite: trainkit's steps against a hand-written PyTorch loop (and Lightning), on CPU.

    python benchmarks/suite.py            # the three workloads; writes benchmarks/results/cpu.md and cpu.png
    python benchmarks/suite.py --smoke    # seconds: checks that the suite runs (used by the tests)
    python benchmarks/suite.py --workloads mlp-32-64-10 mlp-784-512-512-10 --no-lightning   # the jit-vs-JAX table

Every contender does the same work: the same initial weights (one model, copied),
the same batches in the same order (in memory: data loading is not timed), Adam
with the same hyperparameters, the same number of steps; at the end each one's
loss on a held-out batch is compared with the hand-written loop's. The runs are
interleaved: each round runs every contender for the same number of steps, in a
rotating order, all in this one process (separate processes on a 2-core machine
vary up to 2x; interleaved runs agree within a few percent). A contender's time
per step is the median over rounds; its ratio is the hand-written loop's time
divided by its own (higher is faster); where JAX is installed, every contender's ratio to JAX's
jitted step is printed beside it, from the same run.

Contenders:
  hand             zero_grad / forward / backward / torch.optim.Adam.step, as a PyTorch user writes it
  hand foreach     the same with Adam(foreach=True)
  trainkit eager   the step as fit runs it (donated: in-place foreach updates)
  trainkit jit     tk.jit(step): forward, backward and Adam compiled as one graph (inductor)
  trainkit jit K=8 tk.jit(step, steps_per_call=8): 8 steps per compiled call, fed 8 batches at a time
  trainkit bf16    tk.mixed_precision(step, dtype=torch.bfloat16), eager
  trainkit jit+bf16  tk.jit(tk.mixed_precision(step, dtype=torch.bfloat16))
  lightning        a LightningModule and Trainer (no logger, no progress bar, no checkpoints), when installed
  jax              the same MLP (weights copied), batches and Adam in JAX + Optax: one jax.jit step with
                   donated buffers (donate_argnums), when JAX is installed (pip install -e '.[jax]');
                   MLP workloads only. Its threads are set to torch's (XLA_FLAGS, before JAX is imported).
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

    def __init__(self, model: nn.Module, batches: list, *, foreach: bool | None = None) -> None:
        self.model, self.batches = model, batches
        self.opt = torch.optim.Adam(model.parameters(), lr=LR, foreach=foreach)

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
        k = getattr(step, "steps_per_call", 1)
        with tk.donating():
            if k == 1:
                for i in range(start, start + steps):
                    state, _ = step(state, batches[i % n])
            else:  # K batches per call, as fit feeds a steps_per_call step
                for i in range(start, start + steps, k):
                    state, _ = step(state, [batches[j % n] for j in range(i, min(i + k, start + steps))])
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


class Jax:
    """The same MLP in JAX + Optax: params copied from the torch model, one ``jax.jit`` step with the
    params and Adam's state donated (``donate_argnums``), the same batches in the same order."""

    def __init__(self, model: nn.Sequential, batches: list) -> None:
        import jax
        import jax.numpy as jnp
        import optax

        self.jax = jax
        self.linears = [name for name, m in model.named_children() if isinstance(m, nn.Linear)]
        # a Dense kernel is (in, out): the transpose of torch's Linear weight
        linears = [m for m in model if isinstance(m, nn.Linear)]
        params = [(jnp.asarray(m.weight.detach().numpy().T), jnp.asarray(m.bias.detach().numpy())) for m in linears]
        tx = optax.adam(LR)  # torch's defaults: b1 0.9, b2 0.999, eps 1e-8 (added to sqrt(v_hat), as torch)

        def loss_fn(params: list, x: Any, y: Any) -> Any:
            for i, (w, b) in enumerate(params):
                x = x @ w + b
                if i < len(params) - 1:
                    x = jax.nn.relu(x)
            return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()

        def step(params: list, opt_state: Any, x: Any, y: Any) -> tuple:
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.step = jax.jit(step, donate_argnums=(0, 1))
        self.params, self.opt_state = params, tx.init(params)
        self.batches = [(jnp.asarray(x.numpy()), jnp.asarray(y.numpy())) for x, y in batches]

    def run(self, start: int, steps: int) -> None:
        params, opt_state, step, batches, n = self.params, self.opt_state, self.step, self.batches, len(self.batches)
        for i in range(start, start + steps):
            x, y = batches[i % n]
            params, opt_state, _ = step(params, opt_state, x, y)
        self.jax.block_until_ready(params)  # JAX dispatches asynchronously: the time includes the work
        self.params, self.opt_state = params, opt_state

    def weights(self) -> dict[str, torch.Tensor]:
        import numpy as np

        out = {}
        for name, (w, b) in zip(self.linears, self.params, strict=True):
            out[f"{name}.weight"], out[f"{name}.bias"] = torch.from_numpy(np.asarray(w).T.copy()), torch.from_numpy(np.asarray(b).copy())
        return out


def jax_available(threads: int) -> str | None:
    """JAX's version, or None when it is not installed. Sets its CPU threads to torch's before importing it."""
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        import jax
        import optax  # noqa: F401
    except ImportError:
        return None
    return jax.__version__


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


def contenders(
    w: Workload, model: nn.Module, batches: list, *, jit_backend: str, lightning: bool, jax: bool = False, bf16_too: bool = True, k: int = 8
) -> dict[str, Any]:
    mp = getattr(tk, "mixed_precision", None)
    bf16 = mp(train_step, dtype=torch.bfloat16) if mp is not None and bf16_too else None
    out: dict[str, Any] = {
        "hand": Hand(copy.deepcopy(model), batches),
        "hand foreach": Hand(copy.deepcopy(model), batches, foreach=True),
        "trainkit eager": Trainkit(copy.deepcopy(model), batches, train_step),
        "trainkit jit": Trainkit(copy.deepcopy(model), batches, tk.jit(train_step, backend=jit_backend)),
        f"trainkit jit K={k}": Trainkit(copy.deepcopy(model), batches, tk.jit(train_step, backend=jit_backend, steps_per_call=k)),
    }
    if jax and isinstance(model, nn.Sequential) and all(isinstance(m, (nn.Linear, nn.ReLU)) for m in model):
        out["jax"] = Jax(copy.deepcopy(model), batches)
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


def run_workload(
    w: Workload, *, rounds: int, steps: int, warmup: int, jit_backend: str, lightning: bool, seed: int = 0,
    jax: bool = False, bf16: bool = True,
) -> Result:  # fmt: skip
    torch.manual_seed(seed)
    model = w.make()
    batches = make_batches(w, 32, seed)
    held_out = make_batches(w, 1, seed + 1)[0]
    runners = contenders(w, model, batches, jit_backend=jit_backend, lightning=lightning, jax=jax, bf16_too=bf16)
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


def environment(lightning_version: str | None, jax_version: str | None = None) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), trainkit {tk.__version__}, "
        f"Python {platform.python_version()}; Lightning {lightning_version or 'not installed'}; "
        f"JAX {jax_version or 'not installed'}"
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
            "| contender | ms/step | IQR (ms) | steps/s | vs hand | final loss | Δ vs hand | warm-up (s) | vs JAX |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        jax = t["jax"].median if "jax" in t else None
        for name, s in t.items():
            d = r.final_loss[name] - r.final_loss["hand"]
            vs_jax = f"{jax / s.median:.2f}x" if jax else "-"
            lines.append(
                f"| {name} | {s.median * 1e3:.3f} | {s.q1 * 1e3:.3f}-{s.q3 * 1e3:.3f} | {s.steps_per_s:,.0f} | "
                f"{hand / s.median:.2f}x | {r.final_loss[name]:.5f} | {d:+.1e} | {r.warmup_s[name]:.1f} | {vs_jax} |"
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
        out.append(f"{r.workload.name}: trainkit eager {eager:.2f}x the hand loop (goal >= 1.1x): {'met' if eager >= 1.1 else 'MISSED'}")
        if r.workload.input_shape == (32,):
            j = s["trainkit jit"] / s["hand"]
            out.append(f"{r.workload.name}: trainkit jit {j:.2f}x the hand loop (goal >= 2.5x): {'met' if j >= 2.5 else 'MISSED'}")
        if "jax" in s:
            goal = {(32,): 0.5, (784,): 0.9}.get(r.workload.input_shape)
            for name in (n for n in s if n.startswith("trainkit jit") and "bf16" not in n):
                x = s[name] / s["jax"]
                verdict = "" if goal is None else f" (goal >= {goal}x): {'met' if x >= goal else 'MISSED'}"
                out.append(f"{r.workload.name}: {name} {x:.2f}x JAX's jitted step{verdict}")
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
    p.add_argument("--no-jax", action="store_true", help="leave JAX out even when installed")
    p.add_argument("--no-bf16", action="store_true", help="leave the bf16 contenders out")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--smoke", action="store_true", help="the tiny MLP, 2 rounds of 5 steps, jit on aot_eager: a check, not a measurement")
    args = p.parse_args(argv)

    jit_backend = "inductor"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.workloads, args.rounds, args.steps, args.warmup, jit_backend = ["mlp-32-64-10"], 2, 5, 2, "aot_eager"
    pl_version = None if args.no_lightning else lightning_available()
    jax_version = None if args.no_jax else jax_available(torch.get_num_threads())
    env = environment(pl_version, jax_version)
    print(f"trainkit benchmark suite: {env}", flush=True)
    if jax_version is None and not args.no_jax:
        print("JAX is not installed: the jax contender is left out (pip install -e '.[jax]' adds it).")
    if getattr(tk, "mixed_precision", None) is None:
        print("trainkit.mixed_precision is not in this tree: the bf16 contenders are left out.")
    results = []
    for key in args.workloads:
        w = WORKLOADS[key]
        if args.steps:
            w = Workload(w.name, w.make, w.input_shape, w.batch_size, args.steps)
        print(f"\n{w.name}: {args.rounds} rounds x {w.steps_per_round} steps ...", flush=True)
        r = run_workload(
            w, rounds=args.rounds, steps=w.steps_per_round, warmup=args.warmup, jit_backend=jit_backend, lightning=pl_version is not None,
            jax=jax_version is not None, bf16=not args.no_bf16,
        )  # fmt: skip
        print(r.timings.table())
        if "jax" in r.timings:
            jax_s = r.timings["jax"].median
            print("vs JAX: " + ", ".join(f"{k} {jax_s / v.median:.2f}x" for k, v in r.timings.items()))
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
