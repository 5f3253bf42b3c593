"""The import contract: layers as folders, dependencies that point one way, no cycles.

web → mailboxes → oauth | people → models → store → config; ``mailproxy`` imports nothing of the
app (the app may use it from any layer). Screens in ``web/`` (modules with a blueprint) do not
import each other; the rest of ``web/`` (forms, helpers) is theirs to share. Read from
the source with ``ast`` (imports inside functions count too), so nothing is imported to check.

The tests have a shape too: fixtures in a ``conftest.py``, helpers in ``tests/helpers/``, and no
test module imports another (nor a conftest, nor a fixture shadowed with ``noqa: F811``).
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections.abc import Set
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Top-level module or folder -> its layer; a module may import its own folder and lower layers.
LAYERS: dict[str, int] = {
    "config": 0,
    "errors": 0,
    "store": 1,
    "models": 2,
    "migrations": 3,
    "people": 3,
    "oauth": 3,
    "mailboxes": 4,
    "web": 5,
    "app": 6,
    "serve": 7,
}
#: Imports nothing of the app; any layer may import it.
LIBRARIES = {"mailproxy"}
# mutants: the copy of the code `make mutation` leaves behind (git-ignored)
NOT_PRODUCT = {"deploy", "tests", "bench", "instance", "docs", "static", "templates", "mutants"}


def product_modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in NOT_PRODUCT or parts[0].startswith("."):
            continue
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def import_graph(sources: dict[str, str], typing: bool = True) -> dict[str, set[str]]:
    """Module -> the app modules it imports (``from pkg import mod`` counts as ``pkg.mod``).

    ``typing=False`` leaves out imports under ``if TYPE_CHECKING:`` (they run never, so they
    make no cycle; they still count for the layers).
    """

    def resolve(name: str) -> str | None:
        while name and name not in sources:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, source in sources.items():
        edges = graph.setdefault(module, set())
        package = module if module in {m.rpartition(".")[0] for m in sources} else None
        tree = ast.parse(source)
        skip: set[ast.AST] = set()
        if not typing:
            for node in ast.walk(tree):
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    skip.update(ast.walk(node))
        for node in ast.walk(tree):
            if node in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = (package or module).split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if package else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                found = resolve(target)
                if found and found != module and not module.startswith(found + "."):
                    edges.add(found)
    return graph


def screens(sources: dict[str, str]) -> set[str]:
    """The web modules that are screens (they define a blueprint); the rest of web/ is shared."""
    return {m for m, source in sources.items() if m.startswith("web.") and "Blueprint(" in source}


def violations(graph: dict[str, set[str]], screens: Set[str] = frozenset()) -> list[str]:
    wrong = []
    for module, imports in sorted(graph.items()):
        top = module.split(".")[0]
        if top not in LAYERS and top not in LIBRARIES:
            wrong.append(f"{module}: in no layer (put it in a folder, or add it to LAYERS)")
            continue
        for target in sorted(imports):
            other = target.split(".")[0]
            if other == top:
                if module in screens and target in screens:
                    wrong.append(f"{module} imports {target}: a screen imports another screen")
                continue
            if top in LIBRARIES:
                wrong.append(f"{module} imports {target}: {top} imports nothing of the app")
            elif other in LIBRARIES:
                continue
            elif other not in LAYERS or LAYERS[other] >= LAYERS[top]:
                wrong.append(f"{module} imports {target}: {top} may not import {other}")
    return wrong


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def product_sources() -> dict[str, str]:
    return {name: path.read_text() for name, path in product_modules().items()}


def product_graph(typing: bool = True) -> dict[str, set[str]]:
    return import_graph(product_sources(), typing)


def test_every_import_points_down_the_layers() -> None:
    assert violations(product_graph(), screens(product_sources())) == []


def test_no_import_cycles() -> None:
    assert cycles(product_graph(typing=False)) == []


def test_the_contract_catches_a_wrong_way_import_and_a_cycle() -> None:
    typing_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from store import db\n"
    sources = {
        "web": "",
        "web.accounts": "from web import admin\nbp = Blueprint('accounts', __name__)\n",
        "web.admin": "from web.forms import EmptyForm\nbp = Blueprint('admin', __name__)\n",
        "web.forms": "",
        "store": "",
        "store.db": "def f():\n    from oauth import tokens\n",
        "oauth": "",
        "oauth.tokens": "from store import db\nfrom people.users import User\n",
        "people": "",
        "people.users": typing_only,
        "mailproxy": "import config\n",
        "config": "",
        "stray": "",
    }
    graph = import_graph(sources)
    assert screens(sources) == {"web.accounts", "web.admin"}
    assert violations(graph, screens(sources)) == [
        "mailproxy imports config: mailproxy imports nothing of the app",
        "oauth.tokens imports people.users: oauth may not import people",
        "store.db imports oauth.tokens: store may not import oauth",
        "stray: in no layer (put it in a folder, or add it to LAYERS)",
        "web.accounts imports web.admin: a screen imports another screen",
    ]
    assert cycles(graph)
    assert cycles(import_graph(sources, typing=False)) == [
        ["oauth.tokens", "store.db", "oauth.tokens"]
    ]


def test_no_peewee_internals_outside_the_store() -> None:
    """``has_secret`` and the model methods say what a row holds; ``__data__`` is the store's."""
    assert [
        m for m, s in product_sources().items() if "__data__" in s and m.split(".")[0] != "store"
    ] == []


def test_per_app_state_lives_on_the_app() -> None:
    """No module global is set at run time (``global``), and ``app.extensions`` is reached
    only through ``store.appstate``'s slots: a second app never reconfigures the first."""
    wrong = []
    for module, source in product_sources().items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Global):
                wrong.append(f"{module}: global {', '.join(node.names)}")
        if "extensions" in source and module != "store.appstate":
            wrong.append(f"{module}: uses app.extensions (declare an appstate.Slot)")
    assert wrong == []


def suite_sources(root: Path = ROOT) -> dict[str, str]:
    """Every module under ``tests/``, by dotted name (``tests.mail.conftest``)."""
    return {
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): (
            path.read_text()
        )
        for path in sorted((root / "tests").rglob("*.py"))
    }


def suite_violations(sources: dict[str, str]) -> list[str]:
    """A test module (``test_*``) imports no other test module and no conftest: fixtures reach it
    through pytest, helpers through ``tests.helpers``. No comment anywhere says ``noqa: F811``
    (the mark of a fixture imported from elsewhere and shadowed by the parameter that uses it)."""
    found = []
    for module, source in sorted(sources.items()):
        comments = tokenize.generate_tokens(io.StringIO(source).readline)
        if any(t.type == tokenize.COMMENT and "noqa: F811" in t.string for t in comments):
            found.append(f"{module}: noqa: F811 (put the fixture in a conftest.py)")
        if not module.rpartition(".")[2].startswith("test_"):
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = module.rsplit(".", node.level)[0]
                    base = f"{parent}.{base}" if base else parent
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
                names = [n for n in names if n == base or n in sources]
            else:
                continue
            for name in names:
                last = name.rpartition(".")[2]
                if name != module and (last.startswith("test_") or last == "conftest"):
                    found.append(f"{module} imports {name}: share it from tests/helpers/")
    return found


def test_no_test_module_imports_another() -> None:
    assert suite_violations(suite_sources()) == []


def test_the_tests_check_catches_an_imported_test_module_and_a_shadowed_fixture() -> None:
    sources = {
        "tests": "",
        "tests.conftest": "",
        "tests.helpers": "",
        "tests.helpers.linking": "def register(): ...\n",
        "tests.test_a": "from tests.helpers.linking import register\n",
        "tests.test_b": "from tests.test_a import peer  # noqa: F401\n",
        "tests.test_c": "def f():\n    from tests import test_a\n",
        "tests.test_d": "from tests.conftest import make_app\n",
        "tests.mail": "",
        "tests.mail.test_e": "from .test_f import x\n\ndef t(peer):  # noqa: F811\n    pass\n",
        "tests.mail.test_f": "import tests.test_a\nx = 'noqa: F811 in a string is no comment'\n",
    }
    assert suite_violations(sources) == [
        "tests.mail.test_e: noqa: F811 (put the fixture in a conftest.py)",
        "tests.mail.test_e imports tests.mail.test_f: share it from tests/helpers/",
        "tests.mail.test_f imports tests.test_a: share it from tests/helpers/",
        "tests.test_b imports tests.test_a: share it from tests/helpers/",
        "tests.test_c imports tests.test_a: share it from tests/helpers/",
        "tests.test_d imports tests.conftest: share it from tests/helpers/",
    ]
