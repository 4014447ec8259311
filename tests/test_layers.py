"""The tree is the architecture: each layer imports only the layers below it.

The runtime and the store are imported in a subprocess in which importing Celery or
kombu (and, for the runtime, SQLAlchemy) raises; every module's own imports are checked
against the layer table; and no module grows past the size one reader can hold.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "celery_durable"

#: Which parts of the package each layer may import. A part is a top-level module or a
#: layer folder; the public API modules (``__init__``, ``workflow``, ``client``, ``cli``,
#: ``testing``, ``_definition``, ``mypy``) sit on top and may import anything.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "runtime": {"errors"},
    "store": {"errors"},
    "_codec": {"errors", "store"},
    "_config": {"_codec", "store"},
    "worker": {"errors", "store", "_codec", "_config"},
    "driver": {"errors", "runtime", "store", "worker", "_codec", "_config"},
    "canvas": {
        "errors",
        "runtime",
        "store",
        "worker",
        "driver",
        "_codec",
        "_config",
        "_definition",
        "client",
        "workflow",
    },
    # The Workflows tab in Flower: reads through the store and acts through handles.
    "flower": {"errors", "store", "_codec", "_config", "client"},
}


def _part(module: str) -> str:
    """The layer (or top-level module) of ``celery_durable.<...>``."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path) -> set[str]:
    """The celery_durable modules that the file at ``path`` imports."""
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    module = ".".join(relative.parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("celery_durable"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith("celery_durable"):
                continue
            if target == "celery_durable":
                # ``from . import workflow``: the names are modules of the package.
                found.update(f"celery_durable.{a.name}" for a in node.names)
            else:
                found.add(target)
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_the_layers_below_it(path: Path) -> None:
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    if own not in ALLOWED:
        return  # a public API module
    for target in _imports(path):
        part = _part(target)
        if part == own:
            continue
        assert part in ALLOWED[own], (
            f"{path.relative_to(PACKAGE)} imports {target}: the {own} layer may import "
            f"only {sorted(ALLOWED[own]) or 'nothing of the package'}"
        )


_BLOCKED_IMPORT = """
import importlib.abc, importlib.machinery, sys, types

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} must not be imported by this layer")
        return None

sys.meta_path.insert(0, Refuse())
# Stand in for the package's __init__ (the public API, which needs Celery) so that only
# the layer and what it imports are loaded.
package = types.ModuleType("celery_durable")
package.__path__ = [PACKAGE]
sys.modules["celery_durable"] = package
importlib.import_module(LAYER)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("ok", LAYER)
"""


@pytest.mark.parametrize(
    ("layer", "blocked"),
    [
        ("celery_durable.runtime", {"celery", "kombu", "sqlalchemy"}),
        ("celery_durable.store", {"celery", "kombu"}),
    ],
)
def test_a_layer_imports_without_celery_or_kombu(layer: str, blocked: set[str]) -> None:
    script = f"BLOCKED = {sorted(blocked)!r}\nLAYER = {layer!r}\nPACKAGE = {str(PACKAGE)!r}\n"
    script += textwrap.dedent(_BLOCKED_IMPORT)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ok {layer}"


def test_the_boundary_check_itself_catches_a_forbidden_import(tmp_path: Path) -> None:
    # The subprocess check must fail when a layer does reach Celery.
    script = f"BLOCKED = ['celery']\nLAYER = 'celery_durable.worker'\nPACKAGE = {str(PACKAGE)!r}\n"
    script += textwrap.dedent(_BLOCKED_IMPORT)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "must not be imported by this layer" in done.stderr


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_too_long_or_vaguely_named(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= 520, f"{path.relative_to(PACKAGE)} has {lines} lines: split it by job"
    assert path.stem.strip("_") not in {"utils", "helpers", "misc", "common", "manager"}


@pytest.mark.parametrize("layer", ["runtime", "store", "worker", "driver", "canvas"])
def test_each_layer_says_what_it_does_and_may_import(layer: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
    assert doc, f"celery_durable/{layer}/__init__.py needs a docstring"
    assert "import" in doc.lower(), (
        f"the docstring of celery_durable/{layer} must say what it imports"
    )
