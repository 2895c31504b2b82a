"""The house: imports run one way (the layers below), with no circle, and only
the thin wrappers in ``shmbus.core`` (and the error mapper) reach the C
extension. Read from the source with ``ast``, so a lazy import inside a
function counts as much as one at the top."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import shmbus

PACKAGE = Path(shmbus.__file__).parent

# Lower numbers sit lower. A module may import from a lower layer, or from its
# own room (the same subpackage); never from a higher layer, nor from another
# room of its own layer (agent and coordinator never import each other).
LAYERS = {
    "shmbus._native": -1,  # the cffi extension (csrc/), generated at build time
    "shmbus._decode": -1,  # the CPython-API decoder (csrc/shmbus_pydecode.c)
    "shmbus.errors": 0,  # its one return-code mapper reads the codes from C
    "shmbus.core": 1,
    "shmbus.transport": 2,
    "shmbus.agent": 3,
    "shmbus.coordinator": 3,
    "shmbus.aio": 4,
    "shmbus.runner": 5,
    "shmbus.gateway": 5,
    "shmbus.cli": 6,
    "shmbus": 7,  # the package's own __init__: the public names
}
C_EXTENSIONS = ("shmbus._native", "shmbus._decode")

# Modules above core that still call C themselves, each for a reason.
C_EXCEPTIONS = {
    # The send path: one C call per message (or per batch) is the whole cost
    # of a 64 B send; a Python wrapper in between would add a call per message.
    "shmbus.agent.sender": "the one-message send (lib.shmbus_send), one C call per message",
    "shmbus.agent.receiver": "the C decoder: a block of frames to Messages in one call",
    "shmbus.transport.shm_outbox": "batched sends and publishes into the rings, one C call each",
    "shmbus.transport.stream": "a uds record built and sent in one C call",
    "shmbus.transport.uds": "frame and record headers read in place on the uds receive path",
    # The bridge relays every uds agent's frames in C; its Python side owns the
    # C hub's lifetime and hands it the sockets and rings.
    "shmbus.coordinator.bridge": "the C bridge hub (csrc/shmbus_bridge.c)",
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The shmbus modules ``name`` imports (a submodule, not its package, for
    ``from . import sub``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("shmbus"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("shmbus"):
                continue
            subs = {f"{source}.{a.name}" for a in node.names} & (mods.keys() | set(C_EXTENSIONS))
            if subs:
                found.update(subs)
            if len(subs) < len(node.names):
                found.add(source)
    return {m for m in found if m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _room(module: str) -> str:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    raise AssertionError(f"{module} is in no layer: add its room to LAYERS")


def _entry_point(module: str) -> bool:
    return module.endswith("__main__")  # run, never imported: it sits on top


def test_every_module_has_a_layer():
    for module in _graph():
        _room(module)


def test_no_import_runs_upward_or_sideways():
    wrong = []
    for module, deps in _graph().items():
        if _entry_point(module):
            continue
        room = _room(module)
        for dep in deps:
            other = _room(dep)
            if other == room:
                continue
            if LAYERS[other] >= LAYERS[room]:
                wrong.append(
                    f"{module} (layer {LAYERS[room]}) imports {dep} (layer {LAYERS[other]})"
                )
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                circles.append(" -> ".join(path[path.index(dep) :] + [dep]))
            elif dep in graph and not state.get(dep):
                visit(dep, path)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [])
    assert not circles, "\n".join(circles)


def test_only_core_and_the_error_mapper_touch_the_c_extension():
    allowed = {"shmbus.errors", *C_EXCEPTIONS}
    wrong = [
        f"{module} imports {dep}"
        for module, deps in _graph().items()
        for dep in deps & set(C_EXTENSIONS)
        if _room(module) != "shmbus.core" and module not in allowed
    ]
    assert not wrong, "\n".join(sorted(wrong))


def test_the_c_exceptions_are_still_needed():
    """An exception that no longer calls C is taken off the list."""
    graph = _graph()
    stale = [m for m in C_EXCEPTIONS if not graph.get(m, set()) & set(C_EXTENSIONS)]
    assert not stale, f"no longer import the C extension: {stale}"


def test_star_import_gives_every_public_name():
    namespace: dict[str, object] = {}
    exec("from shmbus import *", namespace)
    missing = [name for name in shmbus.__all__ if name not in namespace]
    assert not missing
    for name in ("connect", "Agent", "Runner", "Message", "ShmbusError", "SystemFailure"):
        assert name in namespace


def test_the_layout_test_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above would pass on an empty graph: prove they can fail."""
    mods = {
        "shmbus.core.a": "from ..agent import b\n",
        "shmbus.agent.b": "from ..core import a\n",
    }
    for name, text in mods.items():
        path = tmp_path.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    paths = {n: tmp_path.joinpath(*n.split(".")).with_suffix(".py") for n in mods}
    monkeypatch.setattr(sys.modules[__name__], "_modules", lambda: paths)
    with pytest.raises(AssertionError, match="imports shmbus.agent.b"):
        test_no_import_runs_upward_or_sideways()
    with pytest.raises(AssertionError, match="shmbus.agent.b -> shmbus.core.a -> shmbus.agent.b"):
        test_no_import_circle()
