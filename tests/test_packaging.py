"""Packaging: ``pip install moreft`` (the library) needs only its declared dependencies, and the
``moreft`` command names the ``cli`` extra when it is missing.

The library is what ``[tool.mypy] files`` in pyproject.toml lists (the same list ``make lint`` checks).
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moreft import _entry

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"yaml": "pyyaml", "sklearn": "scikit-learn"}
#: Packages the library imports only inside a function, for an optional extra.
OPTIONAL = {"triton": "triton", "torchao": "quant"}
#: The `cli` extra's packages that no library dependency needs (blocked for the whole process below);
#: pyyaml, tqdm and filelock are also dependencies of transformers / huggingface_hub, so they are blocked only
#: for imports made by moreft's own modules.
CLI_ONLY = ("matplotlib", "sklearn", "optuna")
CLI_SHARED = ("yaml", "tqdm", "filelock")


def _library_files() -> list[Path]:
    files = []
    for entry in PYPROJECT["tool"]["mypy"]["files"]:
        path = ROOT / entry
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT / "src").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


LIBRARY_MODULES = [_module_name(p) for p in _library_files()]


def _requirement_name(requirement: str) -> str:
    for stop in "<>=!~;[ ":
        requirement = requirement.split(stop)[0]
    return requirement.lower()


def _third_party_imports(path: Path) -> set[str]:
    """Top-level names of the absolute, non-stdlib imports of one file, module level and in functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(n.partition(".")[0] for n in names)
    return found - set(sys.stdlib_module_names) - {"moreft", "__future__"}


def test_the_library_list_is_complete():
    assert len(LIBRARY_MODULES) > 30
    assert {
        "moreft",
        "moreft.inject",
        "moreft.ops.fused",
        "moreft.layers.more",
        "moreft.tuners.model",
        "moreft.interop.apply",
    } <= set(LIBRARY_MODULES)
    assert not any(
        m.startswith(("moreft.cli", "moreft.train", "moreft.bench", "moreft.tasks")) for m in LIBRARY_MODULES
    )


def test_library_imports_only_its_dependencies():
    """Every third-party import of the library is a dependency of ``pip install moreft`` or of an extra it names."""
    imports = set().union(*(_third_party_imports(p) for p in _library_files()))
    required = {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = PYPROJECT["project"]["optional-dependencies"]
    for name in sorted(imports):
        if name in OPTIONAL:
            assert {_requirement_name(r) for r in extras[OPTIONAL[name]]} >= {name}
        else:
            assert DISTRIBUTIONS.get(name, name) in required, f"the library imports {name}, not a dependency"
    assert imports >= {"torch", "transformers", "peft", "safetensors", "regex"}


def test_cli_extra_is_what_the_command_needs():
    cli = {_requirement_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["cli"]}
    assert cli == {DISTRIBUTIONS.get(m, m) for m in _entry.CLI_MODULES}
    assert not cli & {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert PYPROJECT["project"]["scripts"]["moreft"] == "moreft._entry:main"


def test_dependencies_are_ranges_not_pins():
    for requirement in PYPROJECT["project"]["dependencies"]:
        assert "==" not in requirement and ">=" in requirement, requirement


# A fresh interpreter that blocks the cli-only packages: CLI_ONLY for everyone (as if uninstalled),
# CLI_SHARED for moreft's own modules (a meta_path finder for first imports, and __import__ for
# modules transformers has loaded already, which finders never see). argv[1]: JSON settings.
_BLOCK_CLI = """
import builtins, importlib, json, sys

settings = json.loads(sys.argv[1])
CLI_ONLY, CLI_SHARED = settings["cli_only"], settings["cli_shared"]
tried = []


def from_moreft(globals_):
    caller = (globals_ or {}).get("__name__", "")
    return caller == "moreft" or caller.startswith("moreft.")


def refuse(importer, name):
    tried.append(f"{importer} imports {name}")
    raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)


class BlockCli:
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in CLI_SHARED:
            frame = sys._getframe(1)
            while frame is not None and "importlib" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and from_moreft(frame.f_globals):
                refuse(frame.f_globals["__name__"], fullname)
        return None


real_import = builtins.__import__


def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name.partition(".")[0] in CLI_SHARED and from_moreft(globals):
        refuse(globals["__name__"], name)
    return real_import(name, globals, locals, fromlist, level)


for name in CLI_ONLY:
    sys.modules[name] = None  # import raises ModuleNotFoundError; importlib.util.find_spec gives None
sys.meta_path.insert(0, BlockCli())
builtins.__import__ = guarded_import
"""

# Every library module, then the library on a small model: inject, train step, save, load, export, merge.
_USE_LIBRARY = """
import tempfile

for name in settings["modules"]:
    importlib.import_module(name)

import torch
from torch import nn
import moreft


def base():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))


torch.manual_seed(0)
x = torch.randn(3, 16)
configs = [moreft.MoReConfig(target_modules=["0", "2"], nblocks=4, block_rank=2),
           moreft.MoRAConfig(target_modules=["0"], rank=4),
           moreft.LoRAConfig(target_modules=["2"], rank=2)]
for config in configs:
    model = moreft.inject(base(), config)
    for layer in moreft.adapter_layers(model).values():
        for p in layer.adapter_params().values():
            torch.nn.init.normal_(p, std=0.1)
    y = model(x)
    y.square().sum().backward()
    with tempfile.TemporaryDirectory() as tmp:
        moreft.save_adapter(model, tmp + "/adapter")
        loaded = moreft.load_adapter(base(), tmp + "/adapter")
        assert torch.allclose(loaded(x), y, atol=1e-6)
        if not isinstance(config, moreft.MoRAConfig):
            moreft.export_lora(model, tmp + "/lora")
    merged = moreft.merge(model)
    assert torch.allclose(merged(x), y, atol=1e-5)

print(json.dumps({"tried": tried, "loaded": sorted(m for m in sys.modules if m.startswith("moreft")),
                  "cli_only_loaded": [m for m in CLI_ONLY if sys.modules.get(m) is not None]}))
"""


def _run_blocked(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    settings = {"cli_only": CLI_ONLY, "cli_shared": CLI_SHARED, "modules": LIBRARY_MODULES}
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_CLI + script, json.dumps(settings)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_library_works_without_the_cli_extra(tmp_path):
    out = _run_blocked(_USE_LIBRARY, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["tried"] == [] and report["cli_only_loaded"] == []
    app = [m for m in report["loaded"] if m.startswith(("moreft.cli", "moreft.train", "moreft.bench"))]
    assert app == [], f"the library imported application modules {app}"


def test_the_blocker_blocks(tmp_path):
    """The set-up above does refuse the cli packages (so the test above passing means something)."""
    out = _run_blocked(
        textwrap.dedent("""
        import moreft  # transformers loads yaml and tqdm: moreft's modules still may not import them
        for code in ("import yaml", "from tqdm import auto"):
            try:
                exec(code, {"__name__": "moreft.fake"})
            except ModuleNotFoundError as exc:
                print("refused", exc.name)
        import yaml  # elsewhere it is the installed package
        import matplotlib
    """),
        tmp_path,
    )
    assert out.stdout.split("\n")[:2] == ["refused yaml", "refused tqdm"]
    assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr and "matplotlib" in out.stderr


def test_command_without_cli_extra_names_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    assert _entry.missing_cli_modules() == ["optuna"]
    assert _entry.main(["--help"]) == _entry.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moreft: error:")
    assert "optuna" in err and "pip install 'moreft[cli]'" in err


def test_command_whose_cli_import_fails_names_the_extra(monkeypatch, capsys):
    """A cli package that is found but fails to import while the command loads: the same message."""

    class BrokenCli(importlib.abc.Loader):
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise ModuleNotFoundError("No module named 'yaml'", name="yaml")

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            return (
                importlib.util.spec_from_loader(fullname, BrokenCli()) if fullname == "moreft.cli" else None
            )

    monkeypatch.setattr(_entry, "missing_cli_modules", lambda: [])
    monkeypatch.delitem(sys.modules, "moreft.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    assert _entry.main(["--help"]) == _entry.EXIT_USER_ERROR
    assert "missing: yaml" in capsys.readouterr().err


def test_command_with_cli_extra_runs(capsys):
    assert _entry.missing_cli_modules() == []
    assert _entry.main(["--version"]) == 0
    assert capsys.readouterr().out.strip()


def test_python_dash_m_moreft_without_cli_extra(tmp_path):
    script = (
        "import sys, runpy\n"
        "sys.modules['sklearn'] = None\n"
        "sys.argv = ['moreft', '--help']\n"
        "runpy.run_module('moreft', run_name='__main__')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 2
    assert "missing: sklearn" in out.stderr and "pip install 'moreft[cli]'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.skipif(importlib.util.find_spec("moreft") is None, reason="moreft is not installed")
def test_installed_metadata_matches_pyproject():
    from importlib.metadata import entry_points, requires

    assert any(
        ep.value == "moreft._entry:main" for ep in entry_points(group="console_scripts", name="moreft")
    )
    plain = {_requirement_name(r) for r in requires("moreft") or [] if "extra ==" not in r}
    assert plain == {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
