"""Repository-wide shape checks (issue 15): what generic code may not know.

Mechanisms are specs: only their own files (``qcexport/mechanisms/``, and the Hugging Face
component specs) may name a mechanism. Generic code that names one (a string equal to the
name, or an identifier built on it) is a second description of the mechanism, which the
registry promises does not exist.

The other checks are the issue's "measured when done": no import cycle (between modules, and
between layers counting imports inside functions), no function over 80 lines, no branch on an
engine outside ``runtimes/qcrun/engines/``, no block of 10 lines written twice (as is here;
with other names through the `duplicates` command where it is installed). Each check is shown
failing on a tiny bad example first.
"""

from __future__ import annotations

import ast
import functools
import io
import re
import shutil
import subprocess
import tokenize
from pathlib import Path

import pytest

from qcexport import mechanisms

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("qcexport", "runtimes")
# Files that are mechanism (or component) descriptions themselves.
SPEC_FILES = ("qcexport/mechanisms/", "qcexport/hf/components.py")
# A key of a file format that happens to equal a mechanism's name: the map descriptor's and
# the inspect report's key for branch choices, defined once and kept as users' files hold it.
FORMAT_KEYS = {("runtimes/qcrun/diagnostics.py", "BRANCH_CHOICES = \"routing\"")}


def _generic_files():
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith(SPEC_FILES):
                yield rel, path


def _identifiers(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.lineno, node.name
        elif isinstance(node, ast.arg):
            yield node.lineno, node.arg
        elif isinstance(node, ast.alias):
            yield node.lineno, (node.asname or node.name).split(".")[-1]


def mechanism_mentions(source: str, names) -> list[tuple[int, str]]:
    """(line, what) for every string equal to a mechanism name and every identifier that
    contains one as a word (``_qformer_sites``, ``RoutingTable``)."""
    tree = ast.parse(source)
    words = {n: re.compile(rf"(^|_){re.escape(n.replace('-', '_'))}(_|$)", re.I) for n in names}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            found.append((node.lineno, f"string {node.value!r}"))
    for line, ident in _identifiers(tree):
        snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", ident)
        hits = [n for n, word in words.items() if word.search(snake)]
        if hits:
            found.append((line, f"identifier {ident} ({hits[0]})"))
    return found


def test_the_checker_finds_a_mechanism_name():
    names = set(mechanisms.names())
    code = ("def _qformer_sites(m):\n    return PLANS['flamingo-xattn']\n"
            "class RoutingPlan: pass\nlabel = 'qformer layers'\n")
    found = mechanism_mentions(code, names)
    assert (1, "identifier _qformer_sites (qformer)") in found
    assert (2, "string 'flamingo-xattn'") in found
    assert (3, "identifier RoutingPlan (routing)") in found
    assert not [f for f in found if f[0] == 4]  # prose that mentions a name is not code


def test_no_mechanism_name_outside_the_mechanism_files():
    names = set(mechanisms.names())
    offenders = []
    for rel, path in _generic_files():
        lines = path.read_text().splitlines()
        for line, what in mechanism_mentions(path.read_text(), names):
            if (rel, lines[line - 1].split("#")[0].strip()) not in FORMAT_KEYS:
                offenders.append(f"{rel}:{line}: {what}")
    assert not offenders, "mechanism names in generic code:\n" + "\n".join(offenders)


# --- measured when done (issue 15): import cycles, long functions, engine branches, copies ---
#
# Each check is a function over {path: source} so that a test can feed it a tiny bad example
# and show it fails; the repository tests feed it the real tree. Offenders are listed as
# path:line so that they can be assigned.

PACKAGES = {"qcexport": "qcexport", "qcrun": "runtimes/qcrun"}  # module root -> folder
CODE_FOLDERS = ("qcexport", "runtimes", "scripts")
ENGINES_FOLDER = "runtimes/qcrun/engines/"
MAX_FUNCTION_LINES = 80
MIN_DUPLICATE_LINES = 10


@functools.cache
def _tree(source: str) -> ast.Module:
    return ast.parse(source)


@functools.cache
def _sources(folders: tuple[str, ...]) -> dict[str, str]:
    return {path.relative_to(ROOT).as_posix(): path.read_text()
            for top in folders for path in sorted((ROOT / top).rglob("*.py"))}


def _package_sources() -> dict[str, str]:
    return _sources(tuple(PACKAGES.values()))


def module_name(path: str) -> str | None:
    """qcexport/export/pipeline.py -> qcexport.export.pipeline; runtimes/qcrun/x.py -> qcrun.x."""
    for module_root, folder in PACKAGES.items():
        if path == f"{folder}/__init__.py":
            return module_root
        if path.startswith(folder + "/") and path.endswith(".py"):
            parts = path[len(folder) + 1:-3].split("/")
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            return ".".join([module_root, *parts])
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """(line, module, names, level, inside a function) of every import that runs; imports
    under `if TYPE_CHECKING:` never run and are left out."""
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                yield from (item for sub in child.orelse for item in visit_one(sub, in_function))
                continue
            yield from visit_one(child, in_function)

    def visit_one(node, in_function):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, (), 0, in_function
        elif isinstance(node, ast.ImportFrom):
            names = tuple(a.name for a in node.names)
            yield node.lineno, node.module or "", names, node.level, in_function
        else:
            inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                     ast.Lambda))
            yield from visit(node, inner)

    yield from visit(tree, False)


def import_edges(sources: dict[str, str]) -> list[tuple[str, str, str, int, bool]]:
    """(importer, imported, path, line, inside a function) between the modules of ``sources``.

    ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``;
    an import also points at the packages it runs on the way.
    """
    modules = {module_name(p): p for p in sources if module_name(p)}
    edges = []
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        for line, target, names, level, in_function in _imports(_tree(sources[path])):
            if level:
                base = module.split(".")[: len(module.split(".")) - level + is_package]
                target = ".".join(base + ([target] if target else []))
            candidates = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            if not candidates or len(candidates) < len(names):
                parts = target.split(".")
                while parts and ".".join(parts) not in modules:
                    parts.pop()
                candidates += [".".join(parts)] if parts else []
            for c in candidates:
                # importing a.b.c runs a/__init__ and a/b/__init__ first (those that are not
                # already running: the importer's own packages)
                parts = c.split(".")
                for target in (".".join(parts[:n]) for n in range(1, len(parts) + 1)):
                    if target in modules and not (module + ".").startswith(target + "."):
                        edges.append((module, target, path, line, in_function))
    return edges


def _cycles(edges) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    graph: dict[str, set[str]] = {}
    for a, b, *_ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def import_cycles(sources: dict[str, str]) -> tuple[list[str], list[str]]:
    """(cycles among module-level imports, imports inside functions that close a cycle)."""
    edges = import_edges(sources)
    top = [e for e in edges if not e[4]]
    cycles = []
    for component in _cycles(top):
        members = set(component)
        sites = sorted(f"{p}:{line} ({a} -> {b})" for a, b, p, line, _ in top
                       if a in members and b in members)
        cycles.append(" <-> ".join(component) + "\n    " + "\n    ".join(sites))
    hidden = []
    for component in _cycles(edges):
        members = set(component)
        hidden += [f"{p}:{line} {a} -> {b} (inside a function; cycle: {', '.join(component)})"
                   for a, b, p, line, inner in edges if inner and a in members and b in members]
    return cycles, sorted(hidden)


def _layer(module: str) -> str:
    return ".".join(module.split(".")[:2])  # qcexport.export.save -> qcexport.export


def layer_cycles(sources: dict[str, str]) -> list[str]:
    """Cycles between the layers (a package's subpackages and top modules: qcexport.export,
    qcexport.golden, qcrun.engines...), imports inside functions included: a cycle of layers
    hidden by imports inside functions is still a cycle."""
    edges = [(_layer(a), _layer(b), p, line, inner) for a, b, p, line, inner
             in import_edges(sources) if _layer(a) != _layer(b)]
    found = []
    for component in _cycles(edges):
        members = set(component)
        sites = sorted({f"{p}:{line} ({a} -> {b}{', inside a function' if inner else ''})"
                        for a, b, p, line, inner in edges if a in members and b in members})
        found.append(" <-> ".join(component) + "\n    " + "\n    ".join(sites))
    return found


def long_functions(sources: dict[str, str], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """path:line name (N lines) for every function or method longer than ``limit`` lines,
    counted from `def` to its last line (decorators not counted)."""
    found = []
    for path, source in sources.items():
        for node in ast.walk(_tree(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append((path, node.lineno, f"{node.name} ({length} lines)"))
    return [f"{p}:{line} {what}" for p, line, what in sorted(found)]


def _named(node, test) -> bool:
    return ((isinstance(node, ast.Name) and test(node.id))
            or (isinstance(node, ast.Attribute) and test(node.attr)))


def engine_branches(sources: dict[str, str]) -> list[str]:
    """path:line for every comparison with an `engine` (==, !=, in, is), `match ... engine`,
    and every isinstance / type comparison against a class named *Adapter."""
    def is_engine(node):
        return _named(node, lambda n: n == "engine")

    def is_adapter(node):
        if isinstance(node, ast.Tuple):
            return any(is_adapter(e) for e in node.elts)
        return _named(node, lambda n: n.endswith("Adapter"))

    found = []
    for path, source in sources.items():
        for node in ast.walk(_tree(source)):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                if any(is_engine(o) for o in operands):
                    found.append((path, node.lineno, "compares an engine"))
                elif any(is_adapter(o) for o in operands):
                    found.append((path, node.lineno, "compares with an *Adapter class"))
            elif isinstance(node, ast.Match) and is_engine(node.subject):
                found.append((path, node.lineno, "matches on an engine"))
            elif (isinstance(node, ast.Call) and _named(node.func, lambda n: n == "isinstance")
                  and len(node.args) == 2 and is_adapter(node.args[1])):
                found.append((path, node.lineno, "isinstance(..., *Adapter)"))
    return [f"{p}:{line} {what}" for p, line, what in sorted(found)]


def _significant_lines(source: str) -> list[tuple[int, str]]:
    """(line number, text with white space folded) of the lines that carry code: comments,
    blank lines, imports and lone punctuation are passed over (as `duplicates` does)."""
    comments = {token.start[0]: token.start[1]
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}
    kept = []
    for number, raw in enumerate(source.splitlines(), 1):
        text = " ".join(raw[:comments.get(number, len(raw))].split())
        if not text or re.fullmatch(r"[\s()\[\]{},:;.]*", text):
            continue
        if text.startswith(("import ", "from ")) and " import " in f" {text} ":
            continue
        kept.append((number, text))
    return kept


def repeated_blocks(sources: dict[str, str], min_lines: int = MIN_DUPLICATE_LINES) -> list[str]:
    """Blocks of ``min_lines`` or more significant lines that stand as is in two places:
    `a.py:10-24 ~ b.py:40-54`. (Copies with other names are left to `duplicates`.)"""
    windows: dict[tuple[str, ...], list[tuple[str, int]]] = {}
    lines = {path: _significant_lines(source) for path, source in sources.items()}
    for path, kept in lines.items():
        for i in range(len(kept) - min_lines + 1):
            key = tuple(text for _, text in kept[i:i + min_lines])
            windows.setdefault(key, []).append((path, i))
    runs: dict[tuple, tuple[int, int]] = {}  # (path a, path b, offset) -> (first i, last i)
    for places in windows.values():
        for (pa, ia), (pb, ib) in zip(places, places[1:], strict=False):
            if pa == pb and abs(ia - ib) < min_lines:
                continue  # a block overlapping itself (a run of equal lines)
            key = (pa, pb, ib - ia)
            first, last = runs.get(key, (ia, ia))
            runs[key] = (min(first, ia), max(last, ia))
    found = []
    for (pa, pb, offset), (first, last) in sorted(runs.items()):
        a, b = lines[pa], lines[pb]
        end = last + min_lines - 1
        found.append(f"{pa}:{a[first][0]}-{a[end][0]} ~ "
                     f"{pb}:{b[first + offset][0]}-{b[end + offset][0]}")
    return found


def similar_blocks(folder: Path, min_lines: int = MIN_DUPLICATE_LINES) -> list[str]:
    """The rows of `duplicates --min-lines N` over ``folder``: blocks that stand twice as is
    or with other names (`shape`). Rows the tool marks boilerplate are left out; a tool that
    did not read everything is an error, not a pass."""
    run = subprocess.run(["duplicates", "--repo", str(folder), "--min-lines", str(min_lines),
                          "--most", "200", "--seconds", "120"],
                         capture_output=True, text=True, timeout=300, check=True)
    lines = run.stdout.splitlines()
    incomplete = [line for line in lines if line.startswith("incomplete:")]
    assert not incomplete and lines, f"duplicates did not finish: {run.stdout}{run.stderr}"
    return [line for line in lines if re.match(r"D\d+ ", line) and "boilerplate" not in line]


def _needs_duplicates():
    if shutil.which("duplicates") is None:
        pytest.skip("the `duplicates` command is not on PATH (a fresh CI machine): the copy "
                    "check with other names is the lead's (duplicates --min-lines 10); the "
                    "check of copies as is ran in test_no_block_of_ten_lines_stands_twice")


def _copy_tree(sources: dict[str, str], root: Path) -> Path:
    for rel, source in sources.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(source)
    return root


def test_the_cycle_check_finds_a_cycle_and_one_hidden_in_a_function():
    sources = {
        "qcexport/__init__.py": "",
        "qcexport/a.py": "from qcexport import b\n",
        "qcexport/b.py": "import qcexport.c\n",
        "qcexport/c.py": "from . import a\n",
        "qcexport/d.py": "def f():\n    from qcexport.e import g\n",
        "qcexport/e.py": "from qcexport.d import f\n",
        "qcexport/t.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                         "    from qcexport.u import X\n",
        "qcexport/u.py": "from qcexport.t import Y\n",
    }
    cycles, hidden = import_cycles(sources)
    assert len(cycles) == 1 and cycles[0].startswith("qcexport.a <-> qcexport.b <-> qcexport.c")
    assert "qcexport/c.py:1 (qcexport.c -> qcexport.a)" in cycles[0]
    assert hidden == ["qcexport/d.py:2 qcexport.d -> qcexport.e (inside a function; cycle: "
                      "qcexport.d, qcexport.e)"]  # t <-> u runs only under TYPE_CHECKING
    assert import_cycles({k: v for k, v in sources.items() if k != "qcexport/c.py"}) == (
        [], hidden)


def test_the_layer_check_finds_a_cycle_of_packages_hidden_in_functions():
    sources = {
        "qcexport/__init__.py": "",
        "qcexport/export/__init__.py": "from qcexport.export.run import go\n",
        "qcexport/export/run.py": "def go():\n    from qcexport.diagnostics.maps import m\n",
        "qcexport/diagnostics/__init__.py": "from qcexport.diagnostics.inputs import i\n",
        "qcexport/diagnostics/maps.py": "m = 1\n",
        "qcexport/diagnostics/inputs.py": "def i():\n    from qcexport.golden import SEED\n",
        "qcexport/golden.py": "from qcexport.export import go\n",
    }
    assert import_cycles(sources)[0] == []  # no cycle between modules at import time
    [cycle] = layer_cycles(sources)
    assert cycle.startswith("qcexport.diagnostics <-> qcexport.export <-> qcexport.golden")
    assert ("qcexport/export/run.py:2 (qcexport.export -> qcexport.diagnostics, inside a "
            "function)") in cycle
    assert "qcexport/golden.py:1 (qcexport.golden -> qcexport.export)" in cycle
    sources["qcexport/golden.py"] = "SEED = 0\n"
    assert layer_cycles(sources) == []


def test_the_length_check_counts_from_def_to_the_last_line():
    def function(name, body_lines):
        return f"def {name}():\n" + "    x = 1\n" * (body_lines - 1)

    source = "@decorator\n" + function("fits", MAX_FUNCTION_LINES) + function("over", 81)
    assert long_functions({"scripts/s.py": source}) == [
        f"scripts/s.py:{MAX_FUNCTION_LINES + 2} over (81 lines)"]


def test_the_engine_check_finds_branches_on_an_engine():
    source = ("if target.engine == 'openvino':\n    pass\n"
              "ok = engine in ('onnxruntime',)\n"
              "if isinstance(adapter, (OrtAdapter, Other)):\n    pass\n"
              "match profile.engine:\n    case _:\n        pass\n"
              "if type(a) is adapters.OpenVinoAdapter:\n    pass\n"
              "fine = target.engines == 2 or isinstance(a, Adapterish) or target.name == 'x'\n")
    assert engine_branches({"m.py": source}) == [
        "m.py:1 compares an engine", "m.py:3 compares an engine",
        "m.py:4 isinstance(..., *Adapter)", "m.py:6 matches on an engine",
        "m.py:9 compares with an *Adapter class"]


def test_the_copy_check_finds_a_block_of_ten_lines_in_two_files():
    block = "".join(f"    total = total + step({i})  # note {i}\n" for i in range(10))
    a = "import os\n\ndef one(total):\n" + block + "    return total\n"
    b = "def two(total):\n    print(total)\n" + block.replace("  # note", "  #") + "    x = 1\n"
    assert repeated_blocks({"a.py": a, "b.py": b}) == ["a.py:4-13 ~ b.py:3-12"]
    nine = block.split("\n", 1)[1]
    assert repeated_blocks({"a.py": a, "b.py": "def two(total):\n" + nine}) == []
    # a run of equal lines inside one file is not a copy of itself
    assert repeated_blocks({"c.py": "x = 1\n" * 30}) == []


def test_no_import_cycle_between_modules():
    cycles, _ = import_cycles(_package_sources())
    assert not cycles, "import cycles (module-level imports):\n" + "\n".join(cycles)


def test_no_import_inside_a_function_hides_a_cycle():
    _, hidden = import_cycles(_package_sources())
    assert not hidden, ("imports inside functions that close an import cycle (move the "
                        "shared code down a layer instead):\n" + "\n".join(hidden))


def test_no_import_cycle_between_layers():
    found = layer_cycles(_package_sources())
    assert not found, "import cycles between layers (imports inside functions included):\n" + (
        "\n".join(found))


def test_no_function_over_80_lines():
    found = long_functions(_sources(CODE_FOLDERS))
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(found)


def test_only_the_engine_modules_branch_on_an_engine():
    sources = {p: s for p, s in _sources(CODE_FOLDERS).items()
               if not p.startswith(ENGINES_FOLDER)}
    found = engine_branches(sources)
    assert not found, ("engine branches outside " + ENGINES_FOLDER + " (call the engine's "
                       "interface instead):\n" + "\n".join(found))


def test_no_block_of_ten_lines_stands_twice():
    found = repeated_blocks(_sources(CODE_FOLDERS))
    assert not found, (f"blocks of {MIN_DUPLICATE_LINES}+ lines that stand twice:\n"
                       + "\n".join(found))


def test_the_similar_copy_check_finds_a_block_with_other_names(tmp_path):
    _needs_duplicates()
    body = "".join(f"    {{v}}_{i} = {{f}}({{v}}, {i}) * scale + offset_{i}\n" for i in range(12))
    one = "def first(alpha, scale):\n" + body.format(v="alpha", f="shift") + "    return 0\n"
    two = "def second(beta, scale):\n" + body.format(v="beta", f="move") + "    return 1\n"
    rows = similar_blocks(_copy_tree({"pkg/a.py": one, "pkg/b.py": two}, tmp_path))
    assert len(rows) == 1 and "a.py:" in rows[0] and "b.py:" in rows[0], rows
    assert similar_blocks(_copy_tree({"pkg/b.py": "x = 1\n"}, tmp_path / "alone")) == []


def test_no_block_of_ten_lines_stands_twice_with_other_names(tmp_path):
    _needs_duplicates()
    rows = similar_blocks(_copy_tree(_sources(CODE_FOLDERS), tmp_path))
    assert not rows, (f"blocks of {MIN_DUPLICATE_LINES}+ lines that stand twice (as is or "
                      "with other names; `duplicates`):\n" + "\n".join(rows))
