"""How a search runs: its settings, the study's file names and trial attributes, one checked candidate.

Shared by the driver (:mod:`moreft.search.driver`), the Optuna side (:mod:`moreft.search.study`) and
the report (:mod:`moreft.search.report`), so none of them imports another for these names.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from moreft.config import coerce_enum
from moreft.errors import ConfigError

STUDY_FILE = "study.db"
WORKERS_FILE = "workers.json"
#: Lock file the search workers take while they claim a trial.
CLAIM_FILE = "claim.lock"
#: A trial whose process has not written a heartbeat for this long is failed and retried once.
HEARTBEAT_SECONDS, GRACE_SECONDS = 30, 90


class StudyMismatchError(ConfigError):
    """A stored search study was made with other settings (base config, budget or sampled space)."""


class Pruner(str, enum.Enum):
    """Early stopping of trials: ``asha`` (successive halving), ``hyperband``, or ``none``."""

    ASHA = "asha"
    HYPERBAND = "hyperband"
    NONE = "none"


class Sampler(str, enum.Enum):
    """How trials are drawn: ``tpe`` (Optuna's default Bayesian sampler) or ``random``."""

    TPE = "tpe"
    RANDOM = "random"


@dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """How a search runs (the ``search:`` mapping of a search file; ``moreft search`` flags override it).

    Attributes:
        trials: Trials to finish (complete or pruned); failed ones do not count.
        jobs: Worker processes sharing the study on this machine (the CPU threads are split among them).
        pruner: ``asha``, ``hyperband`` or ``none``.
        reduction_factor: Keep the best ``1 / reduction_factor`` of the trials at each rung.
        min_steps: Steps of the first rung (None: the run's ``eval_every``).
        max_params: Reject configurations with more trainable adapter parameters (None: no budget).
        storage: An Optuna storage URL (e.g. ``postgresql://...``); None: SQLite in the search directory.
        sampler: ``tpe`` or ``random``.
        seed: Sampler seed (worker ``i`` uses ``seed + i``).
        name: Search directory and study name (None: ``search-<task>-<model>``).
        timeout: Stop starting new trials after this many seconds (None: no limit).
    """

    trials: int = 8
    jobs: int = 1
    pruner: Pruner = Pruner.ASHA
    reduction_factor: int = 3
    min_steps: int | None = None
    max_params: int | None = None
    storage: str | None = None
    sampler: Sampler = Sampler.TPE
    seed: int = 0
    name: str | None = None
    timeout: float | None = None

    def __post_init__(self) -> None:
        for name in ("trials", "jobs", "reduction_factor", "min_steps", "max_params"):
            value = getattr(self, name)
            if value is None and name in ("min_steps", "max_params"):
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (2 if name == "reduction_factor" else 1)
            ):
                raise ConfigError(
                    f"search {name}={value!r} must be an integer >= {2 if name == 'reduction_factor' else 1}"
                )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"search seed={self.seed!r} must be an integer >= 0")
        object.__setattr__(self, "pruner", coerce_enum(Pruner, self.pruner, "search pruner"))
        object.__setattr__(self, "sampler", coerce_enum(Sampler, self.sampler, "search sampler"))
        if self.name is not None and (not isinstance(self.name, str) or not self.name or "/" in self.name):
            raise ConfigError(f"search name={self.name!r} must be a non-empty folder name without '/'")
        if self.storage is not None and (not isinstance(self.storage, str) or "://" not in self.storage):
            raise ConfigError(
                f"search storage={self.storage!r} must be a database URL such as "
                "sqlite:///search.db or postgresql://user@host/db"
            )
        if self.timeout is not None and (
            isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or self.timeout <= 0
        ):
            raise ConfigError(f"search timeout={self.timeout!r} must be a number of seconds > 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SearchSettings:
        """Settings from a mapping (the ``search:`` entry of a search file).

        Raises:
            ConfigError: Unknown keys or invalid values.
        """
        data = dict(data or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"search settings have unknown key(s) {unknown}; valid keys are {known}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: (v.value if isinstance(v := getattr(self, f.name), enum.Enum) else v)
            for f in fields(self)
        }


#: Trial user attributes (what the report reads).
INTERRUPTED, RETRY_OF = "interrupted", "retry_of"
#: Trial attribute: the search run (one ``run_search`` call) whose worker runs the trial.
SESSION = "session"
TRIALS_DIR = "trials"


@dataclass(frozen=True)
class Candidate:
    """One architecture of the space, checked against the model and the budget before any training.

    Attributes:
        key: The architecture's key (see :meth:`SearchSpace.architectures`).
        changes: Its :class:`TrainConfig` changes (square ``block_rank`` resolved).
        params: Trainable adapter parameters (None if it does not fit the model).
        excluded: Why it is not tried (over the budget, or invalid for the model); None if it is.
    """

    key: str
    changes: dict[str, Any]
    params: int | None
    excluded: str | None
