# Scripts that tests start as processes, not test modules: --doctest-modules must not import them
# (resume_run.py parses its command line at import time).
collect_ignore_glob = ["*.py"]
