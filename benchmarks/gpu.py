"""GPU benchmarks, prepared as ONE script for one call on a lent GPU machine (lent for minutes: all in one call).

    python benchmarks/gpu.py                # on the GPU: writes benchmarks/results/gpu.md, gpu.json, gpu.png
    python benchmarks/gpu.py --smoke        # any machine, CPU, tiny sizes, seconds: checks the script runs

Workloads and contenders (same initial weights and batches for every PyTorch contender; the batches
live on the device, so data loading is not timed; rounds interleaved, in rotating order, in this one
process; a contender's time per step is the median over rounds, timed with CUDA events):

  MLP 784-1024-1024-10, batch 512, Adam, float32
    hand             zero_grad / forward / backward / torch.optim.Adam.step (foreach, torch's default)
    hand fused       the same with Adam(fused=True): the best hand-written eager loop
    lightning        LightningModule + Trainer (no logger, no progress bar, no checkpoints)
    jax              a Flax MLP and optax.adam in one jax.jit step with donated buffers (same initial weights)
    trainkit eager   the step as tk.fit runs it (donated, in-place foreach updates)
    trainkit jit     tk.jit(step): forward, backward and Adam as one inductor graph
    trainkit jit ro  tk.jit(step, mode="reduce-overhead"): the same graph under CUDA graphs
    trainkit jit K=8 tk.jit(step, steps_per_call=8): 8 steps per compiled call, fed 8 batches at a time
    trainkit jit ro K=8  the same under CUDA graphs (mode="reduce-overhead")

  torchvision resnet18, batch 256, 224x224, bfloat16 autocast, channels_last, Adam
    hand best        autocast(bf16), channels_last, Adam(fused=True): the best hand-written loop
    lightning        precision="bf16-mixed", channels_last
    trainkit bf16    tk.mixed_precision(step, dtype=torch.bfloat16), eager, channels_last
    trainkit jit     tk.jit(tk.mixed_precision(step, dtype=torch.bfloat16)), channels_last

The MLP also runs at the small size of the CPU suite (784-64-64-10 is the smoke size; --small-mlp adds
32-64-10 at batch 64, where per-call cost dominates and steps per call matter most).

Goals (issue 5): the jitted MLP step at least 1.5x the hand-written eager loop and within 2x of JAX;
resnet18 with trainkit within 5% of the best hand-written loop. Each contender is built and run inside
its own try/except: one that fails is recorded with its error and the others still run. A time budget
(--budget-s) cuts the rounds short rather than losing everything to the machine's time limit.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import trainkit as tk  # noqa: E402

HERE = Path(__file__).resolve().parent
LR = 1e-3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Seconds of a block of work on the device: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def time(self, fn: Callable[[], Any]) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            _sync(self.device)
            start.record()
            fn()
            end.record()
            _sync(self.device)
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


# --------------------------------------------------------------------------- contenders


def train_step(state: tk.TrainState, batch: tuple) -> tuple[tk.TrainState, dict]:
    x, y = batch

    def loss_fn(params: dict) -> tuple:
        logits, buffers = state.apply(params, x, train=True)
        return F.cross_entropy(logits, y), buffers

    (loss, buffers), grads = tk.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads, buffers=buffers), {"loss": loss}


class Hand:
    def __init__(self, model: nn.Module, batches: list, *, fused: bool = False, autocast: torch.dtype | None = None) -> None:
        self.model, self.batches, self.autocast = model, batches, autocast
        kw = {"fused": True} if fused else {}
        self.opt = torch.optim.Adam(model.parameters(), lr=LR, **kw)
        self.device = next(model.parameters()).device

    def run(self, start: int, steps: int) -> None:
        model, opt, batches, n = self.model, self.opt, self.batches, len(self.batches)
        model.train()
        for i in range(start, start + steps):
            x, y = batches[i % n]
            opt.zero_grad(set_to_none=True)
            if self.autocast is not None:
                with torch.autocast(self.device.type, dtype=self.autocast):
                    loss = F.cross_entropy(model(x), y)
            else:
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

    def weights(self) -> tuple[dict, dict]:
        return dict(self.model.named_parameters()), dict(self.model.named_buffers())


class Trainkit:
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

    def weights(self) -> tuple[dict, dict]:
        return self.state.params, self.state.buffers


class _Iterable:
    def __init__(self, items: list) -> None:
        self.items = items

    def __iter__(self) -> Any:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class Lightning:
    def __init__(self, model: nn.Module, batches: list, *, precision: str, device: torch.device) -> None:
        import pytorch_lightning as pl

        self.pl, self.precision, self.device = pl, precision, device
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

        self.module, self.batches = Module(), batches

    def run(self, start: int, steps: int) -> None:
        n = len(self.batches)
        data = _Iterable([self.batches[i % n] for i in range(start, start + steps)])
        trainer = self.pl.Trainer(
            max_steps=steps, max_epochs=1, accelerator="gpu" if self.device.type == "cuda" else "cpu", devices=1,
            precision=self.precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(self.module, train_dataloaders=data)

    def weights(self) -> tuple[dict, dict]:
        return dict(self.module.model.named_parameters()), dict(self.module.model.named_buffers())


class Jax:
    """A Flax MLP with optax.adam, jitted with the state's buffers donated; weights copied from the torch model."""

    def __init__(self, model: nn.Sequential, batches: list) -> None:
        import jax
        import jax.numpy as jnp
        import optax

        self.jax = jax
        linears = [m for m in model if isinstance(m, nn.Linear)]
        # Dense kernels are (in, out): the transpose of torch's Linear weight.
        params = [(jnp.asarray(m.weight.detach().cpu().numpy().T), jnp.asarray(m.bias.detach().cpu().numpy())) for m in linears]
        tx = optax.adam(LR)

        def forward(params: list, x: Any) -> Any:
            for i, (w, b) in enumerate(params):
                x = x @ w + b
                if i < len(params) - 1:
                    x = jax.nn.relu(x)
            return x

        def loss_fn(params: list, x: Any, y: Any) -> Any:
            logits = forward(params, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        def step(params: list, opt_state: Any, x: Any, y: Any) -> tuple:
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.step = jax.jit(step, donate_argnums=(0, 1))
        self.forward, self.loss_fn = forward, loss_fn
        self.params, self.opt_state = params, tx.init(params)
        self.batches = [(jnp.asarray(x.cpu().numpy()), jnp.asarray(y.cpu().numpy())) for x, y in batches]

    def run(self, start: int, steps: int) -> None:
        params, opt_state, batches, n = self.params, self.opt_state, self.batches, len(self.batches)
        for i in range(start, start + steps):
            x, y = batches[i % n]
            params, opt_state, loss = self.step(params, opt_state, x, y)
        self.jax.block_until_ready(params)
        self.params, self.opt_state = params, opt_state

    def held_out_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        import jax.numpy as jnp

        return float(self.loss_fn(self.params, jnp.asarray(x.cpu().numpy()), jnp.asarray(y.cpu().numpy())))


# --------------------------------------------------------------------------- workloads


def mlp(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def mlp_workload(
    device: torch.device, smoke: bool, jit_backend: str, sizes: tuple[int, ...] | None = None, batch: int | None = None
) -> tuple[str, dict[str, Callable[[], Any]], Callable, list, tuple]:
    if sizes is None:
        sizes, batch = ((784, 64, 64, 10), 32) if smoke else ((784, 1024, 1024, 10), 512)
    torch.manual_seed(0)
    model = mlp(*sizes).to(device)
    g = torch.Generator(device="cpu").manual_seed(0)

    def make_batch() -> tuple:
        return torch.randn(batch, sizes[0], generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device)

    batches = [make_batch() for _ in range(8)]
    held = make_batch()
    fresh = lambda: copy.deepcopy(model)
    makers: dict[str, Callable[[], Any]] = {
        "hand": lambda: Hand(fresh(), batches),
        "hand fused": lambda: Hand(fresh(), batches, fused=True),
        "lightning": lambda: Lightning(fresh(), batches, precision="32-true", device=device),
        "jax": lambda: Jax(fresh(), batches),
        "trainkit eager": lambda: Trainkit(fresh(), batches, train_step),
        "trainkit jit": lambda: Trainkit(fresh(), batches, tk.jit(train_step, backend=jit_backend)),
        "trainkit jit K=8": lambda: Trainkit(fresh(), batches, tk.jit(train_step, backend=jit_backend, steps_per_call=8)),
    }
    if device.type == "cuda":
        makers["trainkit jit ro"] = lambda: Trainkit(fresh(), batches, tk.jit(train_step, mode="reduce-overhead"))
        makers["trainkit jit ro K=8"] = lambda: Trainkit(fresh(), batches, tk.jit(train_step, mode="reduce-overhead", steps_per_call=8))
    name = f"MLP {'-'.join(map(str, sizes))}, batch {batch}, Adam, float32"
    return name, makers, lambda: model, batches, held


def resnet_workload(device: torch.device, smoke: bool, jit_backend: str) -> tuple[str, dict[str, Callable[[], Any]], Callable, list, tuple]:
    import torchvision

    batch, size = (4, 32) if smoke else (256, 224)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1000).to(device).to(memory_format=torch.channels_last)
    g = torch.Generator(device="cpu").manual_seed(0)

    def make_batch() -> tuple:
        x = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, 1000, (batch,), generator=g).to(device)

    batches = [make_batch() for _ in range(4)]
    held = make_batch()
    fresh = lambda: copy.deepcopy(model)
    bf16 = tk.mixed_precision(train_step, dtype=torch.bfloat16)
    makers: dict[str, Callable[[], Any]] = {
        "hand best": lambda: Hand(fresh(), batches, fused=device.type == "cuda", autocast=torch.bfloat16),
        "lightning": lambda: Lightning(fresh(), batches, precision="bf16-mixed", device=device),
        "trainkit bf16": lambda: Trainkit(fresh(), batches, bf16),
        "trainkit jit": lambda: Trainkit(fresh(), batches, tk.jit(bf16, backend=jit_backend)),
    }
    name = f"resnet18 (torchvision), batch {batch}, {size}x{size}, bf16 autocast, channels_last, Adam"
    return name, makers, lambda: model, batches, held


# --------------------------------------------------------------------------- the run


def run_workload(
    name: str, makers: dict, model_fn: Callable, held: tuple, *, device: torch.device, rounds: int, steps: int, warmup: int, deadline: float
) -> dict[str, Any]:
    clock = Clock(device)
    runners: dict[str, Any] = {}
    notes: dict[str, str] = {}
    warm_s: dict[str, float] = {}
    for key, make in makers.items():
        try:
            r = make()
            warm_s[key] = clock.time(lambda r=r: r.run(0, warmup))  # jitted steps compile here
            runners[key] = r
        except Exception as e:  # noqa: BLE001 - one contender's failure must not lose the others
            notes[key] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            traceback.print_exc(limit=3)
    per_step: dict[str, list[float]] = {k: [] for k in runners}
    start, names = warmup, list(runners)
    for rnd in range(rounds):
        if time.monotonic() > deadline:
            notes["_rounds"] = f"time budget reached after {rnd} of {rounds} rounds"
            break
        for key in names[rnd % len(names) :] + names[: rnd % len(names)]:
            try:
                per_step[key].append(clock.time(lambda key=key, start=start: runners[key].run(start, steps)) / steps)
            except Exception as e:  # noqa: BLE001
                notes[key] = f"failed in round {rnd}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                names.remove(key)
                break
        start += steps
    # The same work: each contender's loss on a held-out batch with its final weights (float32, eval mode).
    x, y = held
    final: dict[str, float] = {}
    model = model_fn()
    for key, r in runners.items():
        try:
            if isinstance(r, Jax):
                final[key] = r.held_out_loss(x, y)
                continue
            params, buffers = r.weights()
            tensors = {k: v.detach() for k, v in {**params, **buffers}.items()}
            was = model.training
            model.eval()
            with torch.no_grad():
                final[key] = float(F.cross_entropy(torch.func.functional_call(model, tensors, (x,)).float(), y))
            model.train(was)
        except Exception as e:  # noqa: BLE001
            notes.setdefault(key, f"final loss not computed: {type(e).__name__}")
    return {"name": name, "per_step": per_step, "final_loss": final, "warmup_s": warm_s, "notes": notes, "steps": steps}


def summary(res: dict[str, Any], ref: str) -> list[dict[str, Any]]:
    rows = []
    per = res["per_step"]
    ref_med = statistics.median(per[ref]) if per.get(ref) else None
    for key in list(per) + [k for k in res["notes"] if k not in per and not k.startswith("_")]:
        times = per.get(key) or []
        med = statistics.median(times) if times else None
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [med, med, med]
        rows.append({
            "contender": key, "ms_per_step": med and med * 1e3, "q1_ms": q[0] and q[0] * 1e3, "q3_ms": q[2] and q[2] * 1e3,
            "steps_per_s": med and 1 / med, "vs_ref": (ref_med / med) if (med and ref_med) else None,
            "final_loss": res["final_loss"].get(key), "warmup_s": res["warmup_s"].get(key), "note": res["notes"].get(key, ""),
        })  # fmt: skip
    return rows


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def goals(results: list[dict[str, Any]]) -> list[str]:
    out = []
    for res in results:
        rows = {r["contender"]: r for r in res["rows"]}
        ms = lambda k, rows=rows: rows.get(k, {}).get("ms_per_step")  # noqa: E731
        if res["name"].startswith("MLP") and ms("hand") and ms("trainkit jit"):
            best = min(v for v in (ms("trainkit jit"), ms("trainkit jit ro"), ms("trainkit jit K=8"), ms("trainkit jit ro K=8")) if v)
            s = ms("hand") / best
            out.append(f"{res['name']}: trainkit jit {s:.2f}x the hand eager loop (goal >= 1.5x): {'met' if s >= 1.5 else 'MISSED'}")
            if ms("jax"):
                r = best / ms("jax")
                out.append(f"{res['name']}: trainkit jit takes {r:.2f}x JAX's time per step (goal <= 2x): {'met' if r <= 2 else 'MISSED'}")
        if res["name"].startswith("resnet18") and ms("hand best"):
            best = min(v for v in (ms("trainkit bf16"), ms("trainkit jit")) if v) if (ms("trainkit bf16") or ms("trainkit jit")) else None
            if best:
                r = best / ms("hand best")
                verdict = "met" if r <= 1.05 else "MISSED"
                out.append(f"{res['name']}: trainkit's best takes {r:.3f}x the best hand loop's time (goal <= 1.05x): {verdict}")
    return out


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "trainkit": tk.__version__}
    for mod in ("torchvision", "pytorch_lightning", "jax", "flax", "optax"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = "not installed"
    return out


def write_reports(results: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"Measured on **{meta['device']}**, {meta['date']}; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", ""]
    if meta["smoke"]:
        lines += ["**Smoke run** (CPU, tiny sizes, a few steps): it checks that the script runs; these are not measurements.", ""]
    for res in results:
        done = len(next(iter(res["per_step"].values()), []))
        lines += [f"### {res['name']}", "", f"{done} interleaved rounds of {res['steps']} steps.", ""]
        lines += [f"| contender | ms/step | IQR (ms) | steps/s | vs {res['ref']} | final loss | warm-up (s) | note |"]
        lines += ["|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in res["rows"]:
            lines.append(
                f"| {r['contender']} | {_fmt(r['ms_per_step'], '.3f')} | {_fmt(r['q1_ms'], '.3f')}-{_fmt(r['q3_ms'], '.3f')} | "
                f"{_fmt(r['steps_per_s'], ',.0f')} | {_fmt(r['vs_ref'], '.2f')}x | {_fmt(r['final_loss'], '.5f')} | "
                f"{_fmt(r['warmup_s'], '.1f')} | {r['note']} |"
            )
        if "_rounds" in res["notes"]:
            lines.append(f"\n{res['notes']['_rounds']}")
        lines.append("")
    lines += [f"- {g}" for g in meta["goals"]]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    (out / "gpu.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(results), 1, figsize=(7, 1.2 + 2.4 * len(results)), squeeze=False)
        for ax, res in zip(axes[:, 0], results, strict=True):
            rows = [r for r in res["rows"] if r["steps_per_s"]][::-1]
            ax.barh([r["contender"] for r in rows], [r["steps_per_s"] for r in rows], color="#4c72b0")
            for i, r in enumerate(rows):
                ax.text(r["steps_per_s"], i, f"  {_fmt(r['vs_ref'], '.2f')}x", va="center")
            ax.set_title(res["name"], fontsize=9)
            ax.set_xlabel(f"steps/s (labels: speed vs {res['ref']})")
            ax.margins(x=0.2)
        fig.suptitle(f"{meta['device']}, {meta['date']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "gpu.png", dpi=120)
        plt.close(fig)
    except Exception as e:  # noqa: BLE001
        print(f"chart not drawn: {e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, a few steps, jit on aot_eager: a check, not a measurement")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new rounds after this many seconds")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--only", choices=["mlp", "resnet18"], nargs="+", default=["mlp", "resnet18"])
    p.add_argument("--small-mlp", action="store_true", help="also the 32-64-10 MLP at batch 64 (the CPU suite's small model)")
    args = p.parse_args(argv)
    t_start = time.monotonic()
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX must not take the whole GPU from torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if not args.smoke and device.type != "cuda":
        print("gpu.py: no CUDA device here; run it on the GPU machine, or pass --smoke to check it on CPU.")
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32, in torch and (below) JAX alike
        torch.backends.cudnn.allow_tf32 = True  # resnet18 runs in bf16 anyway
        os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
    jit_backend = "aot_eager" if args.smoke else "inductor"
    rounds = args.rounds or (2 if args.smoke else 10)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    meta: dict[str, Any] = {
        "device": name, "date": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "smoke": args.smoke, "versions": versions(),
    }  # fmt: skip
    print(f"gpu.py on {meta['device']}, {meta['date']}: {meta['versions']}", flush=True)
    results = []
    plan: list[tuple[str, Callable, str, int]] = [("mlp", mlp_workload, "hand", 48), ("resnet18", resnet_workload, "hand best", 10)]
    if args.small_mlp:  # per-call cost dominates here: where steps per call and CUDA graphs matter most
        small = lambda d, smoke, b: mlp_workload(d, smoke, b, sizes=(32, 64, 10), batch=64)  # noqa: E731
        plan.insert(1, ("mlp-small", small, "hand", 200))
    for key, build, ref, steps in plan:
        if key.split("-")[0] not in args.only:
            continue
        try:
            wname, makers, model_fn, _, held = build(device, args.smoke, jit_backend)
        except Exception as e:  # noqa: BLE001 - e.g. torchvision missing beside this torch
            results.append({"name": key, "ref": ref, "rows": [], "per_step": {}, "final_loss": {}, "warmup_s": {}, "steps": 0,
                            "notes": {"_rounds": f"workload not run: {type(e).__name__}: {e}"}})  # fmt: skip
            print(f"{key}: not run: {type(e).__name__}: {e}", flush=True)
            continue
        steps = (8 if key.startswith("mlp") else 3) if args.smoke else steps  # 8: the K=8 contenders run their graph
        remaining = args.budget_s - (time.monotonic() - t_start)
        left = [k for k, *_ in plan[[k for k, *_ in plan].index(key):] if k.split("-")[0] in args.only]
        share = remaining / len(left)
        print(f"\n{wname}: {len(makers)} contenders, {rounds} rounds x {steps} steps", flush=True)
        res = run_workload(wname, makers, model_fn, held, device=device, rounds=rounds, steps=steps, warmup=3 if args.smoke else 10,
                           deadline=time.monotonic() + share)  # fmt: skip
        res["ref"] = ref
        res["rows"] = summary(res, ref)
        for r in res["rows"]:
            speed, loss = _fmt(r["vs_ref"], "5.2f"), _fmt(r["final_loss"], ".5f")
            print(f"  {r['contender']:16s} {_fmt(r['ms_per_step'], '8.3f')} ms  {speed}x  loss {loss}  {r['note']}")
        results.append(res)
    meta["goals"] = [] if args.smoke else goals(results)
    meta["seconds"] = round(time.monotonic() - t_start, 1)
    write_reports(results, meta, args.out)
    print("\n" + "\n".join(meta["goals"]))
    print(f"wrote {args.out / 'gpu.md'} ({meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
