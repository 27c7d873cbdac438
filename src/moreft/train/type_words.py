"""A type hint in words, for error messages that name the rule (``peft:vera option r='many' must be an integer``).

Shared by the checks of peft options (``peft_options``) and of transformers' TrainingArguments
(``trainer_args``), which both read the types from the dataclass fields they set.
"""

from __future__ import annotations

import enum
import types
import typing
from typing import Any

_WORDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "text",
    dict: "a mapping",
    list: "a list",
    tuple: "a list",
    type(None): "null",
}


def union_members(hint: Any) -> tuple[Any, ...]:
    """The members of ``A | B`` / ``Optional[A]``; a lone type as a one-element tuple."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def type_in_words(hint: Any) -> str:
    """``hint`` in words, e.g. ``a number``, ``a list or text``, ``one of 'a', 'b'`` (a Literal) or
    ``one of ['x', 'y']`` (an Enum's values)."""
    words = []
    for t in union_members(hint):
        origin = typing.get_origin(t) or t
        if origin is typing.Literal:
            words.append("one of " + ", ".join(map(repr, typing.get_args(t))))
        elif isinstance(origin, type) and issubclass(origin, enum.Enum):
            words.append(f"one of {[m.value for m in origin]}")
        else:
            words.append(_WORDS.get(origin, getattr(origin, "__name__", str(t))))
    return " or ".join(dict.fromkeys(words))
