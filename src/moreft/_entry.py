"""The ``moreft`` console script and ``python -m moreft``: the ``cli`` extra first, then :func:`moreft.cli.main`.

``pip install moreft`` installs the library (torch, transformers, peft, safetensors, regex). The
command line (training, recipes, search, plots, benchmarks) needs ``pip install 'moreft[cli]'``;
without it the command prints one line naming that, and exits with status 2 (a user error).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

#: Import names of the ``cli`` extra's packages (pyproject.toml), in its order.
CLI_MODULES = ("accelerate", "yaml", "tqdm", "matplotlib", "sklearn", "optuna", "filelock")
EXIT_USER_ERROR = 2


def missing_cli_modules() -> list[str]:
    """The packages of the ``cli`` extra that cannot be imported (none are imported to find out)."""
    missing = []
    for name in CLI_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ValueError:  # in sys.modules without a __spec__: imported already
            found = True
        except ImportError:
            found = False
        if not found:
            missing.append(name)
    return missing


def _refuse(missing: Sequence[str]) -> int:
    print(
        f"moreft: error: the moreft command needs the 'cli' extra (missing: {', '.join(missing)}); "
        "install it with: pip install 'moreft[cli]'",
        file=sys.stderr,
    )
    return EXIT_USER_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (:func:`moreft.cli.main`), or say which extra is missing; returns the exit status."""
    missing = missing_cli_modules()
    if missing:
        return _refuse(missing)
    try:
        from moreft.cli import main as cli_main
    except ModuleNotFoundError as exc:  # found above but broken, or a package imported under another name
        if exc.name is None or exc.name.partition(".")[0] not in CLI_MODULES:
            raise
        return _refuse([exc.name])
    return cli_main(argv)
