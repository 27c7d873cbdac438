"""Build the API reference of the library with pdoc, offline: ``make docs`` (output: build/docs/).

The modules are the library's, as ``[tool.mypy] files`` in pyproject.toml lists them (private ones
left out). Any warning pdoc gives (a module that fails to import, a docstring it cannot parse) fails
the build, except the one listed in ``_KNOWN``.

    .venv/bin/python docs/build_api.py [OUTPUT_DIR]
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]

# The adapter configs are dataclasses that inherit peft's PeftConfig fields, whose annotations are
# strings such as "Optional[str]" written in peft's module; pdoc evaluates them in moreft.config and
# cannot (the signature is still shown, as written).
_KNOWN = re.compile(
    r"Error parsing type annotation .+ for moreft\.(\w+\.)*\w+Config\.__init__\. "
    r"Import of (Optional|Union) failed"
)


def library_modules() -> list[str]:
    files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    modules = []
    for entry in files:
        path = ROOT / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            parts = file.relative_to(ROOT / "src").with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            if not any(p.startswith("_") for p in parts):
                modules.append(".".join(parts))
    return modules


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "build" / "docs"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import pdoc
    import pdoc.extract
    import pdoc.render

    pdoc.render.configure(
        docformat="google",
        math=False,
        mermaid=False,
        search=True,
        show_source=True,
        footer_text="moreft API reference",
    )
    if out.exists():
        shutil.rmtree(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # a package documents the submodules its __all__ names (all of them without __all__): pass
        # each library module once, either itself or through its package
        specs: list[str] = []
        covered: set[str] = set()
        for module in library_modules():
            if module not in covered:
                specs.append(module)
                covered.update(pdoc.extract.walk_specs([module]))
        pdoc.pdoc(*specs, output_directory=out)
    problems = [
        str(w.message)
        for w in caught
        if "pdoc" in w.filename.replace(os.sep, "/").split("/site-packages/")[-1].split("/")[0]
        and not _KNOWN.search(str(w.message))
    ]
    for message in problems:
        print(f"docs: error: {message}", file=sys.stderr)
    if problems:
        return 1
    print(f"API reference of {len(covered)} modules in {out}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
