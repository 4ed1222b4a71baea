"""The XLA tests run in their own venv (torch 2.9.0 + torch_xla 2.9.0): `make test` does it, as

    PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 .venv-xla/bin/python -m pytest tests/xla

Every test here runs SPMD (xr.use_spmd() is process-wide), so this folder gets a process of
its own. Where torch_xla is missing (the main venv) the folder is skipped at collection.
"""

import importlib.util
import os

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("CPU_NUM_DEVICES", "4")

if importlib.util.find_spec("torch_xla") is None:
    collect_ignore_glob = ["*.py"]
