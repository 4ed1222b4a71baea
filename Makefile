# `make demo` trains the demo; `make test` runs every test. Both create what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv bench clean xla-venv test-xla test-vision docs

# The XLA tests (tests/xla) need torch 2.9.0 + torch_xla 2.9.0, which imports beside no other torch: their
# own venv, built once (the marker file; about 2 min and 7 GB the first time), run on 4 XLA CPU devices.
# torchvision 0.24.0 is the build that matches torch 2.9.0 (beside the main venv's 2.13 CPU wheel it does
# not import), so tests/vision runs here too (+ torchvision, pillow, scikit-learn: ~250 MB, ~10 s).
# The marker's name is a checksum of XLA_REQS: change the list and `make test` upgrades an existing venv.
XLA_VENV ?= .venv-xla
XLA_PY := $(XLA_VENV)/bin/python
XLA_REQS := torch==2.9.0 torch_xla==2.9.0 torchvision==0.24.0 scikit-learn numpy pytest pytest-timeout hypothesis tensorboardX tqdm
XLA_MARKER := $(XLA_VENV)/.installed-$(shell printf '%s' '$(XLA_REQS)' | cksum | cut -d' ' -f1)
XLA_TEST := PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 $(XLA_PY) -m pytest tests/xla -o addopts="" -p no:cacheprovider --timeout=600
# Its own process: torch_xla SPMD is process-wide, and a CPU backward pass before XLA steps breaks them.
VISION_TEST := PJRT_DEVICE=CPU $(XLA_PY) -m pytest tests/vision -o addopts="" -p no:cacheprovider --timeout=600

# The documentation (docs/, Sphinx autodoc of the real modules): warnings are errors, -E rereads every
# page so that a warning is never hidden by a cached one. A few seconds; `make test` runs it too.
DOCS := $(PY) -m sphinx -W --keep-going -E -q -b html docs docs/_build/html

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -e '.[dev]'
	touch $@

xla-venv: $(XLA_MARKER)

$(XLA_MARKER):
	rm -f $(XLA_VENV)/.installed*
	$(PYTHON) -m venv $(XLA_VENV)
	$(XLA_PY) -m pip install -q $(XLA_REQS)
	$(XLA_PY) -m pip install -q --no-deps -e .
	touch $@

demo: venv
	$(PY) -m trainkit.demo $(ARGS)

docs: venv
	$(DOCS)

test: venv xla-venv
	$(PY) -m ruff check .
	$(DOCS)
	$(PY) -m pytest $(ARGS)
	$(XLA_TEST)
	$(VISION_TEST)

test-xla: xla-venv
	$(XLA_TEST) $(ARGS)

test-vision: xla-venv
	$(VISION_TEST) $(ARGS)

# bench: the JAX contender needs the `jax` extra (JAX + Optax CPU wheels, ~300 MB; never a core dependency).
bench: venv
	$(PY) -c "import jax, optax" 2>/dev/null || $(PY) -m pip install -q 'jax[cpu]>=0.4' 'optax>=0.2'
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/scaling.py
	$(PY) benchmarks/suite.py
	$(PY) benchmarks/jit_overhead.py
	$(PY) benchmarks/multistep.py

clean:
	rm -rf $(VENV) $(XLA_VENV) runs .pytest_cache
