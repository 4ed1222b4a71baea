"""Core v2: scoped hooks, one module skeleton, to_module, the observer runner, gauges, layering.

Each test here failed on the core before this change (see the issue it names).
"""

import ast
import copy
import gc
import pathlib
import weakref

import pytest
import torch
import torch.nn.functional as F

import trainkit as tk

ROOT = pathlib.Path(__file__).resolve().parents[1] / "trainkit"


def _linear_state(seed=0, n_in=3, dtype=torch.float64):
    torch.manual_seed(seed)
    return tk.TrainState.create(torch.nn.Linear(n_in, 1), tk.optim.sgd(0.1), dtype=dtype)


def _step_with_input_grad(state, batch):
    """A step with a per-sample input-gradient metric: a second differentiation, not of the params."""
    x, y = batch
    loss, g = tk.value_and_grad(lambda p: F.mse_loss(state.apply(p, x)[0], y))(state.params)
    gx = tk.grad(lambda i: state.apply(None, i["x"])[0].sum())({"x": x})["x"]
    return state.apply_gradients(g), {"loss": loss, "input_grad_norm": gx.norm(dim=1).mean()}


def _batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- 1. scoped hooks


def test_an_input_gradient_under_data_parallel_is_plain_math():
    # Before: the input gradients were averaged across replicas (or crashed the reducer on 15 rows).
    state = _linear_state()
    for n in (16, 15):
        batch = _batch(n)
        dp_state, dp_m = tk.data_parallel(_step_with_input_grad, devices=["cpu", "cpu"])(state, batch)
        ref_state, ref_m = _step_with_input_grad(state, batch)
        tk.testing.assert_trees_close(dp_state.params, ref_state.params, rtol=1e-10, atol=1e-12)
        assert torch.allclose(dp_m["input_grad_norm"], ref_m["input_grad_norm"], rtol=1e-10)


def test_fp16_scaling_sees_only_the_parameter_gradient():
    state = tk.TrainState.create(torch.nn.Linear(3, 1), tk.optim.sgd(0.1))
    x, y = (t.float() for t in _batch())
    seen = []

    def step(state, batch):
        x, y = batch
        loss, g = tk.value_and_grad(lambda p: F.mse_loss(state.apply(p, x)[0], y))(state.params)
        gx = tk.grad(lambda i: (i["x"] * 2.0).sum())({"x": x})["x"]
        seen.append(gx)
        return state.apply_gradients(g), {"loss": loss}

    new, m = tk.mixed_precision(step, dtype=torch.float16, init_scale=1024.0)(state, (x, y))
    assert torch.equal(seen[0], torch.full_like(x, 2.0))  # not scaled by 2**16, not unscaled either
    assert new.slots["mixed_precision"]["skipped_steps"] == 0 and new.step == 1


# --------------------------------------------------------------------------- 2. one skeleton


def test_nothing_is_written_on_the_users_module_and_copies_of_it_stay_clean():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    before = {name: set(m.__dict__) for name, m in model.named_modules()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = tk.TrainState.create(model, tk.optim.adam(1e-2))

    def step(state, batch):
        x, y = batch
        loss, g = tk.value_and_grad(lambda p: F.mse_loss(state.apply(p, x, train=True)[0], y))(state.params)
        return state.apply_gradients(g), {"loss": loss}

    data = [(torch.randn(8, 3), torch.randn(8, 1))] * 3
    trained, _ = tk.fit(step, state, data, epochs=1, progress=False)
    tk.jit(step, backend="eager")(trained, data[0])
    assert {name: set(m.__dict__) for name, m in model.named_modules()} == before
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    clone = copy.deepcopy(model)
    assert not any(k.startswith("_trainkit") for m in clone.modules() for k in m.__dict__)
    assert trained.module is not model and all(p.is_meta for p in trained.module.parameters())


def test_nothing_outlives_the_states():
    # Before: a process-wide binder kept the final params alive after every state was dropped.
    model = torch.nn.Linear(64, 64)
    state = tk.TrainState.create(model, tk.optim.sgd(0.1))

    def step(state, batch):
        loss, g = tk.value_and_grad(lambda p: state.apply(p, batch)[0].square().mean())(state.params)
        return state.apply_gradients(g), {"loss": loss}

    final, _ = tk.fit(step, state, [torch.randn(4, 64)] * 2, epochs=1, progress=False)
    refs = [weakref.ref(final.params["weight"]), weakref.ref(final.module), weakref.ref(state.params["weight"])]
    del final, state
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    assert model.weight.shape == (64, 64)  # the user's module lives on, untouched


def test_the_state_keeps_the_architecture_it_was_created_with():
    model = torch.nn.Linear(2, 1)
    state = tk.TrainState.create(model, tk.optim.sgd(0.1))
    model.register_forward_hook(lambda m, i, o: o * 0)  # a change after create: not the state's business
    out, _ = state.apply(None, torch.ones(1, 2))
    assert out.abs().sum() > 0


def test_tied_weights_bind_and_come_back_tied():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3, bias=False)
            self.b = torch.nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    state = tk.TrainState.create(Tied(), tk.optim.sgd(0.1))
    assert list(state.params) == ["a.weight"]
    x = torch.randn(2, 3)
    out, _ = state.apply(None, x)
    w = state.params["a.weight"]
    assert torch.allclose(out, x @ w.T @ w.T)
    module = tk.to_module(state)
    assert module.a.weight is module.b.weight and torch.equal(module.a.weight, w)


# --------------------------------------------------------------------------- 3. back to a module


def test_to_module_gives_the_trained_weights_for_inference():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    state = tk.TrainState.create(model, tk.optim.adam(1e-2))

    def step(state, batch):
        x, y = batch
        (loss, buffers), g = tk.value_and_grad(
            lambda p: (lambda o: (F.mse_loss(o[0], y), o[1]))(state.apply(p, x, train=True)), has_aux=True
        )(state.params)
        return state.apply_gradients(g, buffers=buffers), {"loss": loss}

    trained, _ = tk.fit(step, state, [(torch.randn(16, 3), torch.randn(16, 1))] * 4, epochs=2, progress=False)
    module = tk.to_module(trained)
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.allclose(module(x), trained.apply(None, x)[0])
    assert not module.training and torch.equal(module[1].running_mean, trained.buffers["1.running_mean"])
    assert module[0].weight.data_ptr() != trained.params["0.weight"].data_ptr()  # a copy
    assert not torch.equal(model[0].weight, module[0].weight)  # the user's module still holds the initial weights


# --------------------------------------------------------------------------- 4. the runner


def test_a_lightning_style_step_is_an_error_at_the_first_step():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def lightning_step(state, batch):
        x, y = batch
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return state, {"loss": loss.detach()}

    state = tk.TrainState.create(model, tk.optim.sgd(0.1))
    with pytest.raises(RuntimeError, match=r"did not advance(.|\n)*tk.value_and_grad(.|\n)*apply_gradients"):
        tk.fit(lightning_step, state, [(torch.randn(4, 3), torch.randn(4, 1))] * 3, epochs=3, progress=False)


def test_counters_and_gauges_are_last_values_in_the_history():
    # Before: 3 skipped fp16 steps showed as train_skipped_steps 2.85, and a loss scale that never occurred.
    state = tk.TrainState.create(torch.nn.Linear(3, 1), tk.optim.sgd(0.1))
    huge = 1e6

    def step(state, batch):
        x, y = batch
        loss, g = tk.value_and_grad(lambda p: F.mse_loss(state.apply(p, x)[0], y) * huge)(state.params)
        return state.apply_gradients(g), {"loss": loss / huge}

    data = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(8)]
    fp16 = tk.mixed_precision(step, dtype=torch.float16, init_scale=2.0**24)
    new, history = tk.fit(fp16, state, data, epochs=1, progress=False)
    slot = new.slots["mixed_precision"]
    assert slot["skipped_steps"] >= 1
    assert history[0]["train_skipped_steps"] == slot["skipped_steps"]
    assert history[0]["train_loss_scale"] in {2.0**k for k in range(10, 25)}


def test_a_users_own_epoch_wrapper_gets_a_clear_error_then_works_when_marked():
    state = _linear_state()

    def step(state, batch):
        x, y = batch
        loss, g = tk.value_and_grad(lambda p: F.mse_loss(state.apply(p, x)[0], y))(state.params)
        return state.apply_gradients(g), {"loss": loss}

    def log_epochs(epoch_fn):
        def wrapped(state, data):
            state, m = epoch_fn(state, data)
            return state, {**m, "seen": torch.tensor(1.0)}

        return wrapped

    data = [_batch(4)] * 2
    with pytest.raises(TypeError, match=r"not an EpochData(.|\n)*tk.transforms.mark"):
        tk.fit(log_epochs(tk.epoch_step(step)), state, data, epochs=1, progress=False)

    def marked(epoch_fn):
        return tk.transforms.mark(log_epochs(epoch_fn), epoch_fn, "log_epochs")

    _, history = tk.fit(marked(tk.epoch_step(step)), state, data, epochs=2, progress=False)
    assert [h["seen"] for h in history] == [1.0, 1.0] and "train_loss" in history[0]


def test_early_stop_with_max_steps_cut_and_resume_counts_evaluations_once(tmp_path):
    # Before: the cut epoch was evaluated and counted, and counted again on resume (wait 2, evaluations 7
    # where the uninterrupted run had 1 and 6), so the resumed run stopped an epoch early.
    torch.manual_seed(0)
    x, y = torch.randn(40, 3), torch.randn(40, 1)
    train = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    val = [(x[:16], y[:16])]
    losses = iter([1.0, 0.9, 0.95, 0.91, 0.92, 0.93, 0.94, 0.99] * 3)

    def step(state, batch):
        xb, yb = batch
        loss, g = tk.value_and_grad(lambda p: F.mse_loss(state.apply(p, xb)[0], yb))(state.params)
        return state.apply_gradients(g), {"loss": loss}

    def make(values):
        vals = list(values)
        return lambda s, b: {"loss": torch.tensor(vals[min(s.step // 5, len(vals) - 1)])}

    curve = [next(losses) for _ in range(8)]
    epoch = tk.early_stop(tk.epoch_step(step, make(curve)), monitor="val_loss", patience=3)
    state = tk.TrainState.create(torch.nn.Linear(3, 1), tk.optim.sgd(0.01))
    whole, whole_hist = tk.fit(epoch, state, train, val_loader=val, epochs=8, progress=False)
    ckpt = tk.Checkpointer(tmp_path)
    tk.fit(epoch, state, train, val_loader=val, epochs=8, max_steps=12, checkpoint=ckpt, resume="latest", progress=False)
    resumed, resumed_hist = tk.fit(epoch, state, train, val_loader=val, epochs=8, checkpoint=ckpt, resume="latest", progress=False)
    assert resumed.step == whole.step and resumed.slots["early_stop"] == whole.slots["early_stop"]
    assert [h["epoch"] for h in resumed_hist] == [h["epoch"] for h in whole_hist]
    tk.testing.assert_trees_equal(resumed.params, whole.params)


def test_fit_flushes_and_closes_its_logger(tmp_path):
    logger = tk.TensorBoardLogger(tmp_path, name="run")
    state = _linear_state()

    def step(state, batch):
        x, y = batch
        loss, g = tk.value_and_grad(lambda p: F.mse_loss(state.apply(p, x)[0], y))(state.params)
        return state.apply_gradients(g), {"loss": loss}

    tk.fit(step, state, [_batch(4)] * 3, epochs=2, progress=False, logger=logger, log_every=1)
    scalars = tk.read_scalars(logger.log_dir)  # no close by the caller: fit did it
    assert [s for s, _ in scalars["epoch/train_loss"]] == [3, 6] and len(scalars["train/loss"]) == 6


# --------------------------------------------------------------------------- 5. layering


def _imports(path: pathlib.Path, tree=None):
    tree = tree if tree is not None else ast.parse(path.read_text())
    module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            yield module, target, [a.name for a in node.names], node
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trainkit"):
            yield module, node.module, [a.name for a in node.names], node


def test_no_private_name_is_imported_across_modules():
    bad = [
        f"{module}: from {target} import {name}"
        for path in ROOT.rglob("*.py")
        for module, target, names, _ in _imports(path)
        for name in names
        if name.startswith("_") and name != "__version__"
    ]
    assert bad == []


def test_the_package_has_no_import_cycle_and_imports_optional_packages_only_in_functions():
    graph: dict[str, set[str]] = {}
    late = []
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for module, target, names, node in _imports(path, tree):
            deps = graph.setdefault(module, set())
            for name in names:  # `from . import optim` names a module; `from .state import X` names the module state
                candidate = f"{target}.{name}"
                deps.add(candidate if (ROOT.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                         or (ROOT.parent / candidate.replace(".", "/")).is_dir() else target)
            if id(node) not in top:
                late.append(f"{module} imports {target} inside a function")
    assert late == []
    # no cycles (the package __init__ re-exports: leave it out)
    graph = {m: {d for d in deps if d != "trainkit" and d != m} for m, deps in graph.items() if m != "trainkit"}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            visit(d)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert cycles == []


def test_run_has_no_function_over_60_lines():
    tree = ast.parse((ROOT / "run.py").read_text())
    long = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body[1:] if ast.get_docstring(node) else node.body
            lines = body[-1].end_lineno - body[0].lineno + 1 if body else 0
            if lines > 60:
                long.append((node.name, lines))
    assert long == []


def test_a_transform_around_a_k_step_jit_is_an_error_when_wrapping():
    k_step = tk.jit(lambda s, b: (s, {}), backend="eager", steps_per_call=4)
    with pytest.raises(ValueError, match=r"steps_per_call=4.*Put mixed_precision inside"):
        tk.mixed_precision(k_step, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="Put lr_range_test inside"):
        tk.lr_range_test(k_step)
    assert tk.is_epoch_step(tk.early_stop(tk.epoch_step(k_step), monitor="val_loss"))  # around the fold: fine
