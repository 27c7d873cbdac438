"""The shape of the code base: library below application, no import cycles, no import side effects.

The library is what ``[tool.mypy] files`` in pyproject.toml lists (the one list of it); every other
module belongs to an application package below. The library must not import the application (not
even inside a function), so ``pip install moreft`` without the command line's extras keeps working
and the layering stays visible in the folders.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
LIBRARY_PATHS = tuple(
    ROOT / f for f in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
)
APPLICATION = (
    "moreft.__main__",
    "moreft._entry",
    "moreft.cli",
    "moreft.train",
    "moreft.search",
    "moreft.bench",
    "moreft.tasks",
    "moreft.models",
)
MAX_LINES = 400


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in (SRC / "moreft").rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return mods


def _imports(name: str, path: pathlib.Path, mods: dict[str, pathlib.Path]) -> set[str]:
    """Every moreft module ``name`` imports, at module level or inside functions."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
                )
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def _is_application(name: str) -> bool:
    return any(name == app or name.startswith(app + ".") for app in APPLICATION)


def _is_library(path: pathlib.Path) -> bool:
    return any(path == lib or lib in path.parents for lib in LIBRARY_PATHS)


def test_every_module_is_library_or_application():
    unplaced = sorted(m for m, p in _modules().items() if _is_library(p) == _is_application(m))
    assert not unplaced, f"list these in [tool.mypy] files (library) or put them in {APPLICATION}: {unplaced}"


def test_no_import_cycles():
    mods = _modules()
    edges = {m: _imports(m, p, mods) for m, p in mods.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(m for m in mods if m in reach(m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_the_library_never_imports_the_application():
    mods = _modules()
    wrong = {
        m: sorted(t for t in _imports(m, p, mods) if _is_application(t))
        for m, p in mods.items()
        if _is_library(p)
    }
    assert not {m: t for m, t in wrong.items() if t}


def test_files_stay_small():
    long = {
        str(p.relative_to(SRC)): n
        for p in (SRC / "moreft").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long


_SIDE_EFFECTS = """
import os, sys, json
env, mask = dict(os.environ), os.umask(0o027)
os.umask(mask)
import torch
state = (torch.get_default_dtype(), torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
import matplotlib
backend = matplotlib.rcParams._get_backend_or_none() if hasattr(matplotlib.rcParams, "_get_backend_or_none") else None
for name in sys.argv[1:]:
    __import__(name)
after_mask = os.umask(0o027)
os.umask(after_mask)
print(json.dumps({
    "env": sorted(set(os.environ.items()) ^ set(env.items())),
    "umask": [mask, after_mask],
    "torch": [str(state), str((torch.get_default_dtype(), torch.get_num_threads(),
                                torch.are_deterministic_algorithms_enabled()))],
    "pyplot": "matplotlib.pyplot" in sys.modules,
    "backend": [backend, matplotlib.rcParams._get_backend_or_none()
                if hasattr(matplotlib.rcParams, "_get_backend_or_none") else None],
}))
"""


@pytest.mark.parametrize(
    "modules",
    [
        ("moreft",),
        ("moreft.train", "moreft.train.loop", "moreft.train.plots", "moreft.search", "moreft.search.report"),
        ("moreft.cli", "moreft.cli.bench", "moreft.models", "moreft.tasks"),
    ],
)
def test_importing_changes_nothing_in_the_process(modules):
    import json

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MPLBACKEND")
    }
    out = subprocess.run(
        [sys.executable, "-c", _SIDE_EFFECTS, *modules],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    ).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["env"] == []
    assert seen["umask"][0] == seen["umask"][1]
    assert seen["torch"][0] == seen["torch"][1]
    assert seen["pyplot"] is False
    assert seen["backend"][0] == seen["backend"][1]
