"""Write docs/settings.md, the table of every run setting, from the declarations in :mod:`moreft.train.config`.

    python -m moreft.train.settings_doc docs/settings.md     # or no argument: print it

tests/test_settings.py checks that the checked-in file equals what this writes.
"""

from __future__ import annotations

import sys
from pathlib import Path


def settings_doc() -> str:
    """The text of docs/settings.md."""
    from moreft.train.config import TrainConfig
    from moreft.train.settings import settings_markdown
    from moreft.train.trainer_args import FIXED

    return settings_markdown(TrainConfig, FIXED)


def main(argv: list[str]) -> int:
    """Print the table, or write it to the path given."""
    text = settings_doc()
    if argv:
        Path(argv[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
