"""The documentation runs as written, on a machine without a GPU.

- Every ```python block of README.md and of the pages under docs/ (and every
  ``.. code-block:: python`` of the .rst pages) runs on its own, in a fresh namespace, and must
  not raise. A block that needs what such a machine may lack starts with a comment
  "# Requires ..." (a CUDA GPU, several processes) and is skipped with that comment as the
  reason; a block that imports an optional package that is not installed (peft, opacus) is
  skipped naming it.
- Every public name (manual_layers.__all__ and the __all__ of its public submodules) has a page
  in the API reference (the autosummary lists of docs/api/*.rst), and every name listed there
  imports, so a renamed or moved name fails here before the Sphinx build.
- Every MANUAL_LAYERS_* switch in the code is in the table of docs/environment.md, and the files
  that table says read them exist.
- README.md stays short: at most 250 lines.
"""

import contextlib
import importlib
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SKIP_PREFIX = "# Requires"  # the same marker docs/conf.py skips in the doctest build
# Imports a block may need that the test environment might not have: skip, do not fail.
OPTIONAL = {"peft", "opacus", "transformers", "accelerate"}

_MD_FENCE = re.compile(r"^(?P<ind>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=ind)```[ \t]*$",
                       re.M | re.S)
_RST_BLOCK = re.compile(r"^(?P<ind>[ \t]*)\.\. code-block:: *(?P<lang>\w+)[^\n]*\n"
                        r"(?:(?P=ind)[ \t]+:[^\n]*\n)*\n(?P<body>(?:(?P=ind)[ \t]+[^\n]*\n|\n)+)",
                        re.M)


def _pages():
    pages = [ROOT / "README.md"]
    for p in sorted(DOCS.rglob("*")):
        rel = p.relative_to(DOCS).parts
        if p.suffix in (".md", ".rst") and rel[0] != "_build" and "generated" not in rel:
            pages.append(p)
    return pages


def _dedent(body, ind):
    lines = body.splitlines()
    return "\n".join(line[len(ind):] if line.startswith(ind) else line.lstrip() for line in lines)


def python_blocks(path):
    """(line number, source) of every Python code block of a page."""
    text = path.read_text()
    out = []
    if path.suffix == ".md":
        for m in _MD_FENCE.finditer(text):
            lang = m.group("info").strip().split()[0] if m.group("info").strip() else ""
            if lang in ("python", "python3", "py"):
                out.append((text.count("\n", 0, m.start()) + 2,
                            _dedent(m.group("body"), m.group("ind"))))
    else:
        for m in _RST_BLOCK.finditer(text):
            if m.group("lang") in ("python", "python3", "py"):
                body = m.group("body")
                ind = min((len(line) - len(line.lstrip()) for line in body.splitlines()
                           if line.strip()), default=0)
                out.append((text.count("\n", 0, m.start("body")) + 1,
                            "\n".join(line[ind:] for line in body.splitlines())))
    return out


def _cases():
    cases = []
    for page in _pages():
        for line, src in python_blocks(page):
            rel = page.relative_to(ROOT).as_posix()
            cases.append(pytest.param(src, id=f"{rel}:{line}"))
    return cases


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


@pytest.mark.parametrize("src", _cases())
def test_code_block_runs(src):
    first = src.lstrip().splitlines()[0] if src.strip() else ""
    if first.startswith(SKIP_PREFIX):
        pytest.skip(first.lstrip("# ").strip())
    code = compile(src, "<code block>", "exec")
    try:
        # One BLAS thread: scikit-learn's own fits in the examples otherwise wake a BLAS thread
        # pool per core, which costs seconds on a small, busy machine.
        with contextlib.redirect_stdout(io.StringIO()), _one_blas_thread():
            exec(code, {"__name__": "__main__"})
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in OPTIONAL:
            pytest.skip(f"needs the optional package {e.name}")
        raise


def test_pages_have_python_blocks():
    """The block finder sees the pages' examples (a format change must not empty the test)."""
    counts = {p.name: len(python_blocks(p)) for p in _pages()}
    assert counts["README.md"] >= 1, counts
    assert sum(counts.values()) >= 20, counts


def test_skip_marker_is_a_reason():
    """A skipped block says why: the comment after "# Requires" names what it needs."""
    for page in _pages():
        for line, src in python_blocks(page):
            first = src.lstrip().splitlines()[0]
            if first.startswith(SKIP_PREFIX):
                assert len(first) > len(SKIP_PREFIX) + 5, f"{page}:{line}: {first!r}"


# ---- the API reference -------------------------------------------------------------------------

_AUTOSUMMARY = re.compile(r"^\.\. autosummary::[^\n]*\n((?:[ \t]+[^\n]*\n|\n)+)", re.M)


def documented_names():
    """Every name listed in an autosummary directive of docs/api/*.rst."""
    names = set()
    for page in sorted((DOCS / "api").glob("*.rst")):
        for m in _AUTOSUMMARY.finditer(page.read_text()):
            for line in m.group(1).splitlines():
                s = line.strip()
                if s and not s.startswith(":"):
                    names.add(s.lstrip("~"))
    return names


def public_names():
    """manual_layers.__all__, qualified, and the __all__ of its public submodules."""
    import manual_layers
    names = {f"manual_layers.{n}" for n in manual_layers.__all__}
    for sub in ("functional", "autograd", "sklearn", "utils"):
        if sub == "sklearn":
            pytest.importorskip("sklearn")
        try:
            mod = importlib.import_module(f"manual_layers.{sub}")
        except ModuleNotFoundError as e:
            if e.name == f"manual_layers.{sub}":  # a submodule this version does not have
                continue
            raise
        names.add(f"manual_layers.{sub}")
        names |= {f"manual_layers.{sub}.{n}" for n in getattr(mod, "__all__", ())}
    return names


def test_every_public_name_has_an_api_page():
    missing = sorted(public_names() - documented_names())
    assert not missing, f"public names without a page in docs/api/: {missing}"


def _resolve(name):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def test_every_api_page_name_imports():
    pytest.importorskip("sklearn")
    bad = []
    for name in sorted(documented_names()):
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            bad.append(f"{name}: {e}")
    assert not bad, "names in docs/api/ that do not import: " + "; ".join(bad)


# ---- the table of environment switches ---------------------------------------------------------

_SWITCH = re.compile(r"\bMANUAL_LAYERS_[A-Z0-9_]*[A-Z0-9]\b")


def code_switches():
    """{switch: files} for every MANUAL_LAYERS_* name in the build, the sources, the tests and the
    benchmarks."""
    files = [ROOT / "setup.py", ROOT / "Makefile", ROOT / "CMakeLists.txt"]
    for folder, patterns in (("csrc", ("*.cpp", "*.h", "*.cu", "*.cuh")),
                             ("manual_layers", ("*.py",)), ("tests", ("*.py", "*.cpp", "*.cu")),
                             ("benchmarks", ("*.py", "*.sh"))):
        for pattern in patterns:
            files += (ROOT / folder).rglob(pattern)
    found = {}
    for f in files:
        if f.is_file() and f.name != "test_docs.py":
            for name in _SWITCH.findall(f.read_text(errors="replace")):
                found.setdefault(name, set()).add(f.relative_to(ROOT).as_posix())
    return found


def _environment_rows():
    """(variable, read-in cell) of every row of docs/environment.md's tables."""
    rows = []
    for line in (DOCS / "environment.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4:
            rows.append((cells[0], cells[3]))
    return rows


def test_every_switch_is_in_the_environment_table():
    documented = {name for var, _ in _environment_rows() for name in _SWITCH.findall(var)}
    missing = {k: sorted(v) for k, v in code_switches().items() if k not in documented}
    assert not missing, f"switches read in the code but not in docs/environment.md: {missing}"


def test_environment_table_names_files_that_exist():
    """The "read in" column names files of this checkout (it goes stale when a file moves)."""
    bad = []
    for var, where in _environment_rows():
        for path in re.findall(r"`([^`]+)`", where):
            if "/" in path or path.endswith((".py", ".cpp", ".h", ".cu", ".cuh", ".sh")) or \
                    path == "Makefile":
                if not path.startswith("torch.") and not (ROOT / path).exists():
                    bad.append(f"{var}: {path}")
    assert not bad, f"docs/environment.md names files that do not exist: {bad}"


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines; the rest belongs in docs/"
