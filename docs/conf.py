"""Sphinx configuration of the manual_layers documentation.

Built by `make docs` (HTML, then the doctest builder) with warnings as errors:

    sphinx-build -W --keep-going -b html docs docs/_build/html
    sphinx-build -W --keep-going -b doctest docs docs/_build/doctest

The API reference documents the public import paths (manual_layers.Linear,
manual_layers.functional.linear, ...), never the private modules that define them, so the pages
do not change when the source files move. The doctest builder runs the ``>>>`` examples of the
docstrings and every ```python block of the pages (see _python_blocks_as_tests below).
"""

import io
import os
import re
import sys

# The package under documentation: the checkout this file belongs to (built in place or
# installed in editable mode), ahead of any other installation.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import manual_layers  # noqa: E402

project = "manual_layers"
author = "the manual_layers developers"
copyright = "the manual_layers developers"
release = version = manual_layers.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "requirements.txt"]
templates_path = ["_templates"]

# One page per public name, generated from the lists in api/*.md into api/generated/.
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "none"
autodoc_inherit_docstrings = False  # nn.Module's docstrings are torch's, not ours

# The docstrings are numpydoc-style ("Parameters / Returns / Examples" sections).
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Doctests: the examples in the docstrings and pages run on the CPU, as a user's would.
doctest_global_setup = "import torch\ntorch.manual_seed(0)"

try:
    import furo  # noqa: F401
    html_theme = "furo"
except ImportError:  # the docs still build with Sphinx's own theme
    html_theme = "alabaster"
html_title = f"manual_layers {release}"
html_static_path = []

# A code block whose first line is a comment starting with "# Requires" (a CUDA GPU, several
# processes) is shown but not run; tests/test_docs.py skips it the same way, with that reason.
# So is a block that imports an optional package (the tools of guide/tools.md) that is not
# installed.
SKIP_PREFIX = "# Requires"
OPTIONAL = {"peft", "opacus", "transformers", "accelerate"}


def _missing_optional_import(src):
    import ast
    import importlib.util
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return None  # the doctest run reports it
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            top = name.split(".")[0]
            if top in OPTIONAL and importlib.util.find_spec(top) is None:
                return top
    return None


def _python_blocks_as_tests(app, doctree):
    """Marks every Python code block (```python in the pages, ``.. code-block:: python``) as a
    doctest `testcode`, each in its own group and namespace, run with its output discarded: the
    block runs as written and must not raise."""
    from docutils import nodes
    for i, node in enumerate(doctree.findall(nodes.literal_block)):
        if node.get("language") not in ("python", "python3", "py") or "testnodetype" in node:
            continue
        src = node.astext()
        if src.lstrip().startswith(SKIP_PREFIX) or _missing_optional_import(src):
            continue
        node["testnodetype"] = "testcode"
        node["groups"] = [f"block{i}"]
        node["options"] = {}
        node["test"] = (
            "import contextlib as _cl, io as _io\n"
            "with _cl.redirect_stdout(_io.StringIO()):\n"
            f"    exec(compile({src!r}, '<code block>', 'exec'), {{'__name__': '__main__'}})\n")


# ---- docstrings written as plain text ----------------------------------------------------------
# Several docstrings are plain text rather than reStructuredText: an identifier with a trailing
# underscore (coef_, classes_) reads as a hyperlink reference there, |x| as a substitution, and
# hanging indents as block quotes. The hook below makes such identifiers literals and escapes |
# (outside literals and doctests); a docstring that is still not valid reStructuredText is shown
# verbatim, as help() shows it, and named in the build's log.

# Module-level constants have no docstring of their own (autodoc would show their type's);
# their description here until the source documents them with a "#:" comment.
DATA_DOCS = {}  # the constants document themselves with "#:" comments

_TRAILING_UNDERSCORE = re.compile(
    r"(?<![\w`*|\\])([A-Za-z](?:[\w.]*[A-Za-z0-9])?_(?:\[[^\]\s]*\])?)(?![\w`\[])")
_PIPE = re.compile(r"(?<![\\`])\|")
_FIELD = re.compile(r"^(\s*:[^:`]+:\s*)(.*)$")


def _escape_text(segment):
    """Plain-text markup made literal: identifier_ -> ``identifier_``, | -> \\|."""
    segment = _TRAILING_UNDERSCORE.sub(r"``\1``", segment)
    return _PIPE.sub(r"\\|", segment)


def _escape_line(line):
    stripped = line.lstrip()
    if not stripped or stripped.startswith((">>>", "...", ".. ")):
        return line
    m = _FIELD.match(line)
    head, body = (m.group(1), m.group(2)) if m else ("", line)
    parts = body.split("``")  # odd parts are inline literals already
    return head + "``".join(p if i % 2 else _escape_text(p) for i, p in enumerate(parts))


def _rst_problems(text):
    """Docutils' warnings and errors for text, except unknown roles and directives (Sphinx's own,
    which plain docutils does not know)."""
    from docutils import nodes
    from docutils.core import publish_doctree
    # Roles become literals and directives comments: checked without Sphinx's machinery.
    text = re.sub(r":[\w:+.-]+:`([^`]*)`", r"``\1``", text)
    text = re.sub(r"(?m)^(\s*)\.\. [\w:-]+::.*$", r"\1.. directive", text)
    settings = {"report_level": 5, "halt_level": 5, "warning_stream": io.StringIO()}
    tree = publish_doctree(text, settings_overrides=settings)
    problems = []
    for msg in tree.findall(nodes.system_message):
        s = msg.astext()
        if msg["level"] >= 2 and "Unknown interpreted text role" not in s and \
                "Unknown directive type" not in s and 'No role entry for' not in s and \
                'No directive entry for' not in s:
            problems.append(s.splitlines()[0])
    return problems


PLAIN_TEXT_DOCSTRINGS = []  # (name, first problem): docstrings shown as written


def _process_docstring(app, what, name, obj, options, lines):
    if name in DATA_DOCS:
        lines[:] = list(DATA_DOCS[name])
        return
    if what in ("data", "attribute") and getattr(obj, "__doc__", None) is \
            getattr(type(obj), "__doc__", None):
        lines[:] = []  # the docstring of the value's type, not of this name
        return
    if not lines:
        return
    original = list(lines)
    escaped, in_doctest = [], False
    for line in lines:  # a doctest block (a ">>>" line to the next blank line) stays as it is
        in_doctest = bool(line.strip()) and (in_doctest or line.lstrip().startswith(">>>"))
        escaped.append(line if in_doctest else _escape_line(line))
    if not _rst_problems("\n".join(escaped)):
        lines[:] = escaped
        return
    # Not reStructuredText even so: shown verbatim, as a plain-text docstring reads in help().
    PLAIN_TEXT_DOCSTRINGS.append((name, _rst_problems("\n".join(escaped))[0]))
    lines[:] = [".. code-block:: text", ""] + ["    " + line for line in original] + [""]


# nn.Module's hooks that a subclass overrides (their meaning is nn.Module's).
_MODULE_HOOKS = {"extra_repr", "get_extra_state", "set_extra_state"}


def _skip_member(app, what, name, obj, skip, options):
    # scikit-learn's metadata-routing methods (set_fit_request, ...): scikit-learn's API,
    # documented there.
    if name.startswith("set_") and name.endswith("_request"):
        return True
    if name in _MODULE_HOOKS:
        return True
    # Members a class inherits from torch or scikit-learn are documented there.
    owner = _defining_module(obj)
    if owner is not None and not owner.startswith("manual_layers"):
        return True
    return None


def _defining_module(obj):
    for o in (obj, getattr(obj, "fget", None), getattr(obj, "__func__", None)):
        m = getattr(o, "__module__", None) if o is not None else None
        if isinstance(m, str):
            return m
    owner = getattr(obj, "__objclass__", None)
    return getattr(owner, "__module__", None)


def _report_plain_text(app, exception):
    if PLAIN_TEXT_DOCSTRINGS and exception is None:
        from sphinx.util import logging
        log = logging.getLogger(__name__)
        for name, problem in sorted(set(PLAIN_TEXT_DOCSTRINGS)):
            log.info(f"docstring shown as plain text (not reStructuredText): {name}: {problem}")


def setup(app):
    app.connect("doctree-read", _python_blocks_as_tests)
    # After napoleon (priority 500), which turns the numpydoc sections into reStructuredText.
    app.connect("autodoc-process-docstring", _process_docstring, priority=600)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("build-finished", _report_plain_text)
