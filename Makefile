# `make demo` trains the demo; `make test` runs every test. Both create what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -e '.[dev]'
	touch $@

demo: venv
	$(PY) -m trainkit.demo $(ARGS)

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest $(ARGS)

bench: venv
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
