"""The [core] layer stays pure: no aiohttp, no asyncio, no clock, read from the source with ast.

docs/design.md: "[core] modules import neither aiohttp nor asyncio, do no I/O and never read the
clock." A core module is one whose docstring has a paragraph starting with ``[core]`` (in practice
the one after the summary line), or one the module table of docs/design.md marks ``[core]``; a new
core module is covered by writing the marker. The rate limits' pure half is limits_plan.py (core);
limits.py, the Limiter that awaits its stores, is not.

The check walks the import graph without importing anything: every ``import`` anywhere in a core
module (inside functions and ``if TYPE_CHECKING:`` too: core code typed against aiohttp is already
coupled to it), and the same again for every aisix module it reaches, its package ``__init__``
included. A clock read is a reference to a function that returns the current time (``time.time``,
``time.monotonic``, ``datetime.now`` ...), whatever the module was imported as, or ``.time()`` on an
event loop. I/O is not checked here: config_yaml's ``read_mapping`` reads its file by design.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "aisix"
MARKER = "[core]"
# Modules that are core by design (docs/design.md) and must say so in their own docstring.
MINIMUM_CORE = ("config", "errors", "auth", "aliases", "multipart", "guardrails", "limits_plan")
# Top-level packages a core module may not import, directly or through another module. uvloop is
# an asyncio event loop.
FORBIDDEN = frozenset({"aiohttp", "asyncio", "uvloop"})
# Functions whose result is the current time (or carries it: uuid1 embeds a timestamp).
CLOCK = frozenset({
    *(f"time.{name}" for name in (
        "time", "time_ns", "monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns",
        "process_time", "process_time_ns", "thread_time", "thread_time_ns",
        "clock_gettime", "clock_gettime_ns")),
    "datetime.datetime.now", "datetime.datetime.utcnow", "datetime.datetime.today",
    "datetime.date.today", "os.times", "uuid.uuid1", "uuid.uuid6", "uuid.uuid7",
})
# These read the clock only when the time argument is left out.
CLOCK_WITHOUT_ARGS = {"time.localtime": 0, "time.gmtime": 0, "time.ctime": 0, "time.asctime": 0,
                      "time.strftime": 1}
_LOOP_GETTERS = frozenset({"get_running_loop", "get_event_loop", "new_event_loop"})


@dataclass(frozen=True)
class Problem:
    core: str    # the core module the problem is charged to
    chain: tuple[str, ...]  # core module -> ... -> the module where it is
    line: int
    what: str

    def __str__(self) -> str:
        via = f" (via {' -> '.join(self.chain)})" if len(self.chain) > 1 else ""
        return f"{self.core}: {self.chain[-1]}:{self.line} {self.what}{via}"


def package_sources(root: Path = ROOT, package: str = PACKAGE) -> dict[str, str]:
    """Dotted module name -> source, for every .py file of the package (``__init__`` is the package)."""
    sources = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        sources[".".join(parts)] = path.read_text()
    return sources


def is_core(source: str) -> bool:
    docstring = ast.get_docstring(ast.parse(source)) or ""
    return any(paragraph.strip().startswith(MARKER) for paragraph in re.split(r"\n\s*\n", docstring))


def design_core(design: str) -> set[str]:
    """The modules docs/design.md's module table marks [core] (`name.py` [core] | ...)."""
    return set(re.findall(r"^\|\s*`(\w+)\.py`\s*\[core\]", design, re.MULTILINE))


def _is_package(name: str, sources: Mapping[str, str]) -> bool:
    return any(other.startswith(name + ".") for other in sources)


def _imports(name: str, tree: ast.Module, sources: Mapping[str, str]) -> Iterator[tuple[str, int]]:
    """(dotted module, line) for every import in the tree, relative ones resolved; an imported
    submodule also imports its parent packages, and ``from p import m`` imports p.m if that is a
    module."""
    package = name if _is_package(name, sources) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names
                                  if f"{module}.{alias.name}" in sources]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and _dotted(node.func) in
              {"importlib.import_module", "import_module", "__import__"}):
            targets = [node.args[0].value]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                yield ".".join(parts[:i]), node.lineno


def _dotted(node: ast.expr) -> str:
    """``a.b.c`` for a chain of attributes on a name, else ""."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([node.id, *reversed(attrs)])


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> what it was imported as (``dt`` -> ``datetime``, ``now`` -> ``time.monotonic``)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _resolved(node: ast.expr, names: Mapping[str, str]) -> str:
    dotted = _dotted(node)
    if not dotted:
        return ""
    head, _, rest = dotted.partition(".")
    if head not in names:
        return ""
    return names[head] + ("." + rest if rest else "")


def _is_loop(node: ast.expr) -> bool:
    if isinstance(node, ast.Call):
        return _dotted(node.func).rpartition(".")[2] in _LOOP_GETTERS
    return _dotted(node).rpartition(".")[2].lower().endswith("loop")


def clock_reads(tree: ast.Module) -> Iterator[tuple[int, str]]:
    names = _aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level:
            for alias in node.names:
                if alias.name == "*" and node.module in {"time", "datetime"}:
                    yield node.lineno, f"imports * from {node.module}"
                elif f"{node.module}.{alias.name}" in CLOCK:
                    yield node.lineno, f"imports {node.module}.{alias.name}"
        elif (isinstance(node, ast.Attribute | ast.Name) and isinstance(node.ctx, ast.Load)
              and _resolved(node, names) in CLOCK):
            yield node.lineno, f"reads the clock: {_resolved(node, names)}"
        if isinstance(node, ast.Call) and not node.keywords:
            func = _resolved(node.func, names)
            if func in CLOCK_WITHOUT_ARGS and len(node.args) <= CLOCK_WITHOUT_ARGS[func]:
                yield node.lineno, f"reads the clock: {func}() without a time"
            if (isinstance(node.func, ast.Attribute) and node.func.attr == "time" and not node.args
                    and _is_loop(node.func.value)):
                yield node.lineno, "reads the clock: an event loop's time()"


def problems(sources: Mapping[str, str], core: set[str]) -> list[Problem]:
    """Every forbidden import and clock read in the import closure of each core module."""
    trees = {name: ast.parse(source, filename=name) for name, source in sources.items()}
    found = []
    for start in sorted(core):
        chains: dict[str, tuple[str, ...]] = {start: (start,)}
        todo = [start]
        while todo:
            name = todo.pop()
            tree = trees[name]
            for imported, line in _imports(name, tree, sources):
                top = imported.split(".")[0]
                if top in FORBIDDEN:
                    found.append(Problem(start, chains[name], line, f"imports {imported}"))
                elif imported in trees and imported not in chains:
                    chains[imported] = (*chains[name], imported)
                    todo.append(imported)
            found += [Problem(start, chains[name], line, what) for line, what in clock_reads(tree)]
            # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
            parts = name.split(".")
            for parent in (".".join(parts[:i]) for i in range(1, len(parts))):
                if parent in trees and parent not in chains:
                    chains[parent] = (*chains[name], parent)
                    todo.append(parent)
    return sorted(set(found), key=str)


def core_modules(sources: Mapping[str, str], design: str = "") -> set[str]:
    marked = {name for name, source in sources.items() if is_core(source)}
    return marked | {f"{PACKAGE}.{name}" for name in design_core(design)}


# -- the real tree --------------------------------------------------------------------------------

SOURCES = package_sources()
DESIGN = (ROOT / "docs" / "design.md").read_text()


def test_the_minimum_core_is_marked_in_its_docstrings() -> None:
    unmarked = [name for name in MINIMUM_CORE if not is_core(SOURCES[f"{PACKAGE}.{name}"])]
    assert not unmarked, f"no paragraph of the docstring starts with {MARKER}: {unmarked}"


def test_design_md_still_has_a_core_table() -> None:
    # If the table's format changes, design_core() must follow, or its modules go unchecked.
    assert set(MINIMUM_CORE) <= design_core(DESIGN)


def test_core_modules_import_no_aiohttp_or_asyncio_and_read_no_clock() -> None:
    core = core_modules(SOURCES, DESIGN)
    assert core >= {f"{PACKAGE}.{name}" for name in MINIMUM_CORE}
    missing = core - SOURCES.keys()
    assert not missing, f"docs/design.md marks modules [core] that do not exist: {sorted(missing)}"
    found = problems(SOURCES, core)
    assert not found, "[core] modules must not import aiohttp/asyncio or read the clock:\n" + "\n".join(
        map(str, found))


# -- the checker itself, on synthetic packages ----------------------------------------------------

CORE_DOC = '"""Summary line.\n\n[core] No I/O, no clock.\n"""\n'
PLAIN_DOC = '"""A module that may do anything."""\n'


def flagged(core_body: str, **others: str) -> list[str]:
    """The problems found in package ``pkg`` whose ``core`` module is CORE_DOC + core_body."""
    sources = {"pkg": "", "pkg.core": CORE_DOC + core_body}
    sources |= {f"pkg.{name}": PLAIN_DOC + body for name, body in others.items()}
    core = {name for name, source in sources.items() if is_core(source)}
    assert core == {"pkg.core"}
    return [str(problem) for problem in problems(sources, core)]


@pytest.mark.parametrize("body", [
    "import asyncio\n",
    "import asyncio as aio\n",
    "from asyncio import Queue\n",
    "import aiohttp.web\n",
    "from aiohttp import web\n",
    "import uvloop\n",
    "def f():\n    import asyncio\n    return asyncio\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from aiohttp import web\n",
    "import importlib\nmod = importlib.import_module('asyncio')\n",
])
def test_a_direct_import_is_flagged(body: str) -> None:
    found = flagged(body)
    assert found and all(re.search(r"imports (aiohttp|asyncio|uvloop)", p) for p in found), found


@pytest.mark.parametrize("importer", [
    "from . import helper\n",
    "from .helper import thing\n",
    "import pkg.helper\n",
    "from pkg import helper\n",
    "from pkg.helper import thing\n",
    "from . import middle\n",  # two hops: core -> middle -> helper
])
def test_an_import_through_another_module_is_flagged_with_its_chain(importer: str) -> None:
    found = flagged(importer, helper="import asyncio\nthing = 1\n", middle="from .helper import thing\n")
    assert found, importer
    assert "pkg.helper:2 imports asyncio (via pkg.core -> " in found[0]


def test_the_package_init_counts_too() -> None:
    sources = {"pkg": "import aiohttp\n", "pkg.core": CORE_DOC + "from pkg import other\n",
               "pkg.other": PLAIN_DOC}
    assert [str(p) for p in problems(sources, {"pkg.core"})] == [
        "pkg.core: pkg:1 imports aiohttp (via pkg.core -> pkg)"]


@pytest.mark.parametrize(("body", "what"), [
    ("import time\nt = time.time()\n", "time.time"),
    ("import time\nt = time.monotonic()\n", "time.monotonic"),
    ("import time\nt = time.perf_counter_ns()\n", "time.perf_counter_ns"),
    ("import time as clock\nnow = clock.monotonic\n", "time.monotonic"),  # kept to call later
    ("from time import monotonic\n", "time.monotonic"),
    ("from time import monotonic as m\nt = m()\n", "time.monotonic"),
    ("import datetime\nt = datetime.datetime.now()\n", "datetime.datetime.now"),
    ("import datetime as dt\nt = dt.datetime.now(dt.timezone.utc)\n", "datetime.datetime.now"),
    ("from datetime import datetime\nt = datetime.utcnow()\n", "datetime.datetime.utcnow"),
    ("from datetime import date\nd = date.today()\n", "datetime.date.today"),
    ("import time\ns = time.strftime('%Y')\n", "time.strftime"),
    ("import time\nt = time.localtime()\n", "time.localtime"),
    ("import uuid\nu = uuid.uuid1()\n", "uuid.uuid1"),
    ("class C:\n    def f(self):\n        return self._loop.time()\n", "loop's time()"),
    ("def f(loop):\n    return loop.time() + 1\n", "loop's time()"),
    ("def f(a):\n    return a.get_running_loop().time()\n", "loop's time()"),
])
def test_a_clock_read_is_flagged(body: str, what: str) -> None:
    found = flagged(body)
    assert found and all(what in p for p in found), found


def test_a_clock_read_in_an_imported_module_is_flagged() -> None:
    found = flagged("from .helper import stamp\n", helper="import time\ndef stamp():\n    return time.time()\n")
    assert found == ["pkg.core: pkg.helper:4 reads the clock: time.time (via pkg.core -> pkg.helper)"]


def test_pure_time_arithmetic_is_not_flagged() -> None:
    body = (
        "import datetime as dt\nimport time\nfrom datetime import datetime, timezone\n"
        "def f(now: float, t: time.struct_time, loop_count: int) -> object:\n"
        "    a = datetime.fromtimestamp(now, timezone.utc)\n"
        "    b = dt.datetime(2024, 1, 1, tzinfo=dt.UTC).timestamp()\n"
        "    c = time.strftime('%Y', t), time.gmtime(now), a.time()\n"
        "    d = dt.timedelta(seconds=now).total_seconds()\n"
        "    return a, b, c, d, loop_count\n"
        "from . import helper\n"
    )
    assert flagged(body, helper="import re\nimport hashlib\n") == []


def test_a_non_core_module_may_do_anything_unless_core_imports_it() -> None:
    assert flagged("x = 1\n", server="import asyncio\nimport time\nt = time.time()\n") == []


@pytest.mark.parametrize(("docstring", "core"), [
    ('"""Summary.\n\n[core] No I/O."""', True),
    ('"""Summary.\n\n[core], except that read() reads its file."""', True),
    ('"""[core] summary."""', True),
    ('"""Summary.\n\nMore.\n\n    [core] indented paragraph."""', True),
    ('"""Summary.\n\nThe top half is [core]: the rest is not."""', False),
    ('"""Summary mentioning [core] in passing."""', False),
    ('"""Summary."""\n# [core]', False),
    ("x = '[core]'", False),
])
def test_the_marker_is_a_paragraph_that_starts_with_it(docstring: str, core: bool) -> None:
    assert is_core(docstring) is core


def test_design_table_parsing() -> None:
    table = "| module | job |\n|---|---|\n| `a.py` [core] | x |\n| `b.py` | y [core] |\n|`c.py` [core]|z|\n"
    assert design_core(table) == {"a", "c"}
