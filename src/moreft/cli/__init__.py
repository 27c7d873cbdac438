"""The ``moreft`` command line: ``train``, ``eval``, ``merge``, ``export-lora``, ``inspect``, ``compare``,
``search``, ``study``, ``convert`` and ``bench``.

    moreft train --config recipes/demo.yaml               # a recipe; any flag overrides it
    moreft train --task sentiment --method lora --rank 8 --max-steps 200
    moreft eval runs/NAME                                   # re-score the saved adapter
    moreft merge runs/NAME merged/                          # a plain transformers model
    moreft export-lora runs/NAME lora/ [--rank 64]          # a peft LoRA directory (MoRA: --rank or --tolerance)
    moreft inspect runs/NAME                                # per-layer rank / norm, |ΔW| heat map
    moreft compare --task sentiment --methods lora:rank=8 more:block_rank=4 --seeds 3
    moreft search --config recipes/demo.yaml --space recipes/search-sentiment-cpu.yaml  # Optuna + ASHA
    moreft study --plan recipes/fidelity/sentiment.yaml     # lr search per arm, seeds, paired CIs
    moreft convert THEIRS/ adapter/ --from kongds-mora      # the papers' adapters -> moreft (docs/interop.md)
    moreft bench --quick                                    # step speed / memory next to peft (docs/performance.md)

User errors (bad flags, unknown task or method, missing packages, bad recipes) print one line
``moreft: error: ...`` and exit with status 2; no traceback.

:mod:`.main` builds the parser and runs a command; :mod:`.commands` holds what ``train``, ``eval``,
``merge``, ``export-lora``, ``inspect`` and ``compare`` do; :mod:`.search` and :mod:`.bench` hold the
flags and drivers of ``moreft search`` and ``moreft bench``. Everything below (training, search,
benchmarks, the library) is usable from Python without this package.
"""

from .main import EXIT_USER_ERROR, build_parser, main

__all__ = ["EXIT_USER_ERROR", "build_parser", "main"]
