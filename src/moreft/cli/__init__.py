"""The ``moreft`` command line; :func:`main` is the console script.

:mod:`.main` builds the parser and runs a command; :mod:`.commands` holds what ``train``, ``eval``,
``merge``, ``export-lora``, ``inspect`` and ``compare`` do; :mod:`.search` and :mod:`.bench` hold the
flags and drivers of ``moreft search`` and ``moreft bench``. Everything below (training, search,
benchmarks, the library) is usable from Python without this package.
"""

from .main import EXIT_USER_ERROR, build_parser, main

__all__ = ["EXIT_USER_ERROR", "build_parser", "main"]
