"""The package layout: every module imports on its own, the imports form no cycle, each room of
specdec/ imports only rooms below it, and ``import specdec`` keeps every public name."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trees", "drafters", "specdec", "bench")

# Rooms from the bottom up: a module may import its own room and rooms of lower rank only.
RANKS = {
    "trees": 0,
    "drafters": 1,
    "specdec.models": 2, "specdec.device": 2, "specdec.schedule": 2, "specdec.constrain": 2,
    "specdec.step": 3,
    "specdec.api": 5,
    "specdec.serving": 6, "specdec.distill": 6,
    "specdec": 7,  # the package itself: the public names
    "specdec.cli": 8,
    "bench": 9,
}

# `specdec.__all__` as of issue 26, plus the engine loop's names (issue 32): every name must stay
# importable from `specdec`.
PUBLIC_NAMES = (
    "AUTO", "ChatSession", "Scheduler", "SpecStats", "SpeculativeDecoder", "SpeculativeGenerateOutput",
    "UnsupportedGeneration", "generate", "is_patched", "load_default_model", "load_model", "patch", "patched",
    "unpatch", "Overloaded", "Cancelled", "TimedOut", "Stream", "Constraint", "ConstraintError",
    "ConstraintLogitsProcessor",
)


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the four packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its file (module level, functions and
    ``TYPE_CHECKING`` blocks alike: a deferred import hides a cycle, it does not remove it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in modules)
    found.discard(name)
    return found


def import_graph() -> nx.DiGraph:
    modules = project_modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        graph.add_edges_from((name, target) for target in imports_of(name, path, modules))
    return graph


def room_of(module: str) -> str:
    return max((room for room in RANKS if module == room or module.startswith(room + ".")), key=len)


def test_the_walk_sees_deferred_and_type_checking_imports(tmp_path):
    """The graph walk must find imports inside functions and ``TYPE_CHECKING`` blocks, or the
    cycle test below could pass over a cycle hidden in one."""
    source = tmp_path / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from specdec.step.engine import Engine\n"
                      "def f():\n    from specdec.device import cache, ops\n    import trees.masks\n")
    modules = project_modules()
    assert imports_of("specdec.probe", source, modules) == {"specdec.step.engine", "specdec.device.cache",
                                                             "specdec.device.ops", "trees.masks"}


def test_no_import_cycle():
    graph = import_graph()
    assert graph.number_of_edges() > 100  # the walk found the project's imports
    tangled = [sorted(group) for group in nx.strongly_connected_components(graph) if len(group) > 1]
    cycles = [[src for src, _ in nx.find_cycle(graph.subgraph(group))] for group in tangled]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle + cycle[:1]) for cycle in cycles)


def test_every_room_imports_only_rooms_below_it():
    graph = import_graph()
    upward = [f"{src} -> {dst}" for src, dst in graph.edges
              if room_of(src) != room_of(dst) and RANKS[room_of(dst)] >= RANKS[room_of(src)]]
    assert not upward, "imports that point up or sideways: " + ", ".join(upward)


def test_every_module_of_specdec_sits_in_a_room():
    loose = [m for m in project_modules() if m.startswith("specdec.") and room_of(m) == "specdec"]
    assert not loose, f"modules directly under specdec/ outside any room: {loose}"


def test_each_module_imports_alone_in_a_fresh_interpreter():
    """One interpreter per module (forked after the heavy third-party libraries load, before any
    project module does), so a module that only works when another was imported first fails here.
    ``__main__`` modules are scripts: they run when imported."""
    names = sorted(m for m in project_modules() if not m.endswith(".__main__"))
    script = (
        "import os, sys, traceback\n"
        "import numba, numpy, torch, transformers\n"
        "import transformers.generation.utils, transformers.masking_utils, transformers.modeling_utils\n"
        f"names = {names!r}\n"
        f"assert not [m for m in sys.modules if m.split('.')[0] in {PACKAGES!r}], 'project modules preloaded'\n"
        "failed = []\n"
        "for name in names:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        try:\n"
        "            __import__(name)\n"
        "        except BaseException:\n"
        "            traceback.print_exc()\n"
        "            os._exit(1)\n"
        "        os._exit(0)\n"
        "    if os.waitpid(pid, 0)[1] != 0:\n"
        "        failed.append(name)\n"
        "print('FAILED', failed)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "FAILED []" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_name_is_still_exported(name):
    import specdec

    assert name in specdec.__all__
    assert getattr(specdec, name) is not None


def test_public_names_import_with_a_star_in_a_fresh_interpreter():
    script = f"from specdec import *\nmissing = [n for n in {PUBLIC_NAMES!r} if n not in globals()]\nprint(missing)\n"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
