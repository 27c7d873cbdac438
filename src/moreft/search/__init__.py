"""``moreft search``: adapter architecture and hyperparameter search on Optuna, with ASHA pruning.

    from moreft.search import SearchSettings, SearchSpace, run_search
    from moreft.train import resolve_config
    base = resolve_config("recipes/demo.yaml", {"max_steps": 60, "eval_every": 15})
    result = run_search(base, SearchSpace(methods=("more", "lora")), SearchSettings(trials=8))

One concern per module: :mod:`.settings` (how a search runs), :mod:`.space` (what it samples),
:mod:`.driver` (counting candidates, running the search), :mod:`.study` (the Optuna study, the
objective and worker processes), :mod:`.report` (``search.md``, ``search.png``, ``best.yaml``).
Optuna is imported only when a search runs.
"""

from .driver import SearchResult, candidates, count_adapter_params, run_search
from .settings import Candidate, Pruner, Sampler, SearchSettings, StudyMismatchError
from .space import SearchSpace

__all__ = [
    "Candidate",
    "Pruner",
    "Sampler",
    "SearchResult",
    "SearchSettings",
    "SearchSpace",
    "StudyMismatchError",
    "candidates",
    "count_adapter_params",
    "run_search",
]
