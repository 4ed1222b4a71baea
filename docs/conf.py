"""Sphinx configuration: the reference is built from the docstrings of the real modules.

``make docs`` builds it with warnings as errors (``make test`` runs it too). Nothing is
mocked but torch_xla, which is installed only in the XLA venv (see the Makefile), and
which ``trainkit.transforms.xla_sharded`` imports only when a step is wrapped anyway.

Each module's page is an ``automodule`` with ``:members:``, so a new public name (one in
the module's ``__all__``) appears by itself. A public module with no page yet (one that
``trainkit.__all__`` exports, or that defines a name it exports, or a transform) appears on
``api/other-modules``. The ``trainkit`` page does not repeat the docstrings: its
``trainkit-names`` directive lists ``trainkit.__all__`` with a link to where each name is
documented, and ``trainkit.X`` cross-references resolve to that place.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import pkgutil
import sys
import types

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging as sphinx_logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

sys.path.insert(0, os.path.abspath(".."))  # this checkout's trainkit, whatever is installed

import trainkit  # noqa: E402

logger = sphinx_logging.getLogger("trainkit.docs")

project = "trainkit"
release = version = trainkit.__version__
copyright = "the trainkit authors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings are Google style: Args:, Returns:, Raises:
]

exclude_patterns = ["_build"]
autodoc_mock_imports = ["torch_xla"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"  # short signatures; each argument's type goes with its description
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"
html_title = f"trainkit {release}"
html_theme_options = {"description": "Pure training steps for PyTorch, and transforms of them."}

# Warnings that a docstring in trainkit causes, silenced one by one until the docstring is fixed:
# (message start, location end). Remove an entry once its docstring is fixed.
KNOWN_DOCSTRING_WARNINGS = [
]


def _canonical(name: str) -> str | None:
    """``trainkit.TrainState.replace`` -> ``trainkit.state.TrainState.replace`` (where it is documented)."""
    parts = name.removeprefix("trainkit.").split(".")
    if parts[0] not in trainkit.__all__:
        return None
    obj = getattr(trainkit, parts[0])
    if isinstance(obj, types.ModuleType):
        head = obj.__name__
    else:  # documented where it is public: trainkit.transforms._base.compose -> trainkit.transforms.compose
        module = ".".join(p for p in obj.__module__.split(".") if not p.startswith("_"))
        head = f"{module}.{obj.__qualname__}"
    return ".".join([head, *parts[1:]])


class TrainkitNames(SphinxDirective):
    """A table of ``trainkit.__all__``: each name, a link to its documentation, its summary line."""

    def run(self) -> list[nodes.Node]:
        lines = [".. list-table::", "   :header-rows: 1", "   :widths: 30 70", "", "   * - name", "     - what it is"]
        for name in trainkit.__all__:
            obj = getattr(trainkit, name)
            target = _canonical(name)
            if isinstance(obj, types.ModuleType):
                role = "mod"
            elif inspect.isclass(obj):
                role = "class"
            elif callable(obj):
                role = "func"
            else:
                role = "data"
            summary = (inspect.getdoc(obj) or "").strip().split("\n\n")[0].replace("\n", " ")
            lines += [f"   * - :py:{role}:`tk.{name} <{target}>`", f"     - {summary}"]
        node = nodes.container()
        self.state.nested_parse(StringList(lines, source="trainkit.__all__"), self.content_offset, node)
        return node.children


def _resolve_toplevel(app, env, node, contnode):
    """Resolve ``trainkit.X`` (and a bare ``TrainState.apply_gradients``) to where X is documented."""
    if node.get("refdomain") != "py":
        return None
    target = _canonical(node["reftarget"])
    if target is None or target == node["reftarget"]:
        return None
    domain = env.get_domain("py")
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], target, node, contnode)


class _KnownDocstringWarnings(logging.Filter):
    """Drops exactly the warnings listed in KNOWN_DOCSTRING_WARNINGS (before Sphinx counts them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message, location = record.getMessage(), str(getattr(record, "location", "") or "")
        return not any(message.startswith(m) and location.endswith(loc) for m, loc in KNOWN_DOCSTRING_WARNINGS)


def _modules_needing_a_page() -> set[str]:
    """``trainkit``, each module that documents a name of ``trainkit.__all__``, and every transform."""
    needed = {"trainkit"}
    for name in trainkit.__all__:
        target = _canonical(name)
        needed.add(target if isinstance(getattr(trainkit, name), types.ModuleType) else target.rpartition(".")[0])
    transforms = importlib.import_module("trainkit.transforms")
    for info in pkgutil.iter_modules(transforms.__path__, "trainkit.transforms."):
        if not info.name.rpartition(".")[2].startswith("_"):
            needed.add(info.name)
    return needed


class OtherModules(SphinxDirective):
    """An automodule (with ``:members:``) for each public module that has no page of its own yet."""

    def run(self) -> list[nodes.Node]:
        missing = sorted(m for m in _modules_needing_a_page() if f"api/{m}" not in self.env.found_docs)
        if not missing:
            return [nodes.paragraph(text="None: every public module has a page of its own.")]
        lines = []
        for name in missing:
            lines += [name, "-" * len(name), "", f".. automodule:: {name}", "   :members:", ""]
        node = nodes.section()
        nested_parse_with_titles(self.state, StringList(lines, source="docs/conf.py"), node)
        return node.children


def setup(app):
    app.add_directive("trainkit-names", TrainkitNames)
    app.add_directive("trainkit-other-modules", OtherModules)
    app.connect("missing-reference", _resolve_toplevel)
    # suppress_warnings can only silence every docutils warning at once ("docutils" has no
    # subtypes), so the known ones are dropped here, first among the filters of the handlers of
    # the logger Sphinx's warnings go through (a later filter counts them for -W).
    for handler in logging.getLogger("sphinx").handlers:
        handler.filters.insert(0, _KnownDocstringWarnings())
    return {"parallel_read_safe": True}
