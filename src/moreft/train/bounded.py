"""Reading the small text files a run is driven by (recipes, run files) with bounds on everything.

A recipe or a run file may come from anyone. Each read here has a size cap, decodes strict UTF-8,
and turns every parser failure into a :class:`~moreft.errors.ConfigError` that names the file.
YAML aliases are allowed but counted: a document whose aliases *expand* to more than
:data:`MAX_YAML_NODES` nodes (a "billion laughs" file of 1 KB), or refer to themselves, is refused
from the composed node graph, before anything is constructed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from moreft.errors import ConfigError

#: A recipe, a run's config.yaml or split.json; real ones are a few KB (a split of 10^6 ids ~ 8 MB).
MAX_TEXT_BYTES = 64 * 2**20
#: Nodes a YAML document may hold once every alias is expanded (a recipe has ~50).
MAX_YAML_NODES = 100_000


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only); used through :func:`load_yaml`, which bounds it."""


def read_text_file(path: str | os.PathLike, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a file of at most ``max_bytes`` bytes.

    Raises:
        ConfigError: The file is missing or unreadable, too large, or not UTF-8.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ConfigError(f"{what} {str(path)!r} is {size:,} bytes; at most {max_bytes:,} are read")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from None


def read_json_file(path: str | os.PathLike, what: str, max_bytes: int = MAX_TEXT_BYTES) -> Any:
    """A JSON file's value (see :func:`read_text_file` for the bounds).

    Raises:
        ConfigError: Unreadable, too large, not UTF-8, or not JSON.
    """
    text = read_text_file(path, what, max_bytes)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid JSON: {str(exc)[:300]}") from None


def _expanded_size(root: yaml.Node, source: str, limit: int) -> int:
    """Nodes under ``root`` with every alias expanded, without expanding any (shared nodes memoised).

    Raises:
        ConfigError: More than ``limit`` nodes, or a node that contains itself (a recursive alias).
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            active.discard(key)
            children = _children(node)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > limit:
                raise ConfigError(
                    f"{source} expands to more than {limit:,} YAML nodes (through aliases, *name); "
                    "a recipe is a flat mapping of a few dozen values"
                )
            continue
        if key in sizes:
            continue
        if key in active:
            raise ConfigError(f"{source} has a recursive YAML alias (a node that contains itself)")
        active.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def load_yaml(text: str, source: str, max_nodes: int = MAX_YAML_NODES) -> Any:
    """Parse one YAML document of plain data, bounded (module docstring).

    Args:
        text: The document.
        source: What it is, for messages (e.g. ``"recipe 'a.yaml'"``).
        max_nodes: The cap on nodes after alias expansion.

    Raises:
        ConfigError: Not valid YAML, more than one document, too many nodes, a recursive alias, or
            nesting too deep to construct.
    """
    try:
        loader = _Loader(text)  # its reader refuses control characters right away
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {str(exc)[:500]}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, source, max_nodes)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {str(exc)[:500]}") from None
    except RecursionError:
        raise ConfigError(f"{source} is nested too deeply to be a recipe") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer of 5000 digits, a date like 2001-13-45
        raise ConfigError(f"{source} holds a value YAML cannot represent: {str(exc)[:300]}") from None
    finally:
        loader.dispose()
