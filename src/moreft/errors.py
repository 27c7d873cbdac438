"""Exceptions raised by moreft.

Every error names the offending value and the rule it broke, so a user can fix the call
without reading our source. All derive from :class:`MoreftError`; each also derives from the
builtin a caller would naturally catch (``ValueError``, ``TypeError``, ``RuntimeError``).
"""

from __future__ import annotations


class MoreftError(Exception):
    """Base class of every moreft error."""


class ConfigError(MoreftError, ValueError):
    """A configuration value is out of range or of the wrong type."""


class TargetError(MoreftError, ValueError):
    """``target_modules`` selects nothing, something that is not a linear layer, or an adapter."""


class AdapterFileError(MoreftError, ValueError):
    """An adapter directory is missing, malformed, unsafe, or made for another model."""


class MergeError(MoreftError, RuntimeError):
    """A merge would write NaN/Inf into a base weight, or the base cannot be merged into."""


class ExportError(MoreftError, ValueError):
    """A LoRA export would lose part of the adapter's update and the caller accepted no loss.

    Raised before anything is written: a MoRA export (truncated SVD) whose relative error is above
    the ``tolerance`` given, or not exact when neither a ``rank`` nor a ``tolerance`` was given.
    """


class TrainingError(MoreftError, RuntimeError):
    """A training run cannot go on (e.g. a NaN/Inf loss); the last good checkpoint is kept."""


class DataFileError(MoreftError, ValueError):
    """A user's data file cannot be read: not UTF-8, a malformed JSON line or CSV row, wrong structure."""


class OutputError(MoreftError, ValueError):
    """A write would replace or delete something moreft did not create, or its target is busy.

    Raised before anything is written: a path that is a file, a non-empty folder that is not
    moreft's own earlier output of the same kind, the run being read, or a run folder that another
    process is writing.
    """


class CheckpointError(MoreftError, ValueError):
    """A training checkpoint cannot be resumed: unreadable, or its optimizer state does not fit the model."""
