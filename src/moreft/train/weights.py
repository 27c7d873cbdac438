"""What a run trains besides adapters: full fine-tuning's weights, and the modules ``train_unadapted`` opens.

Full fine-tuning (``method: full``) has no adapter; a run saves the whole trained model as
``model.safetensors`` (:func:`save_full_weights`, in the run folder and in each checkpoint) and
:func:`load_full_weights` puts it back into a freshly loaded base. Tied tensors (an output head
sharing the embedding matrix) are stored once, under the first name the model gives them.

A model built from scratch (:mod:`moreft.models.scratch`) carries the digest of its initial
weights; a run records it (``base_init_sha256`` in ``metrics.json``) and :func:`check_init_digest`
compares a rebuilt base with it, so an adapter trained on a frozen random base is never evaluated
on other random weights (a torch version that draws differently is an error, not a silent mismatch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moreft.errors import AdapterFileError, ConfigError
from moreft.models.scratch import DIGEST_ATTR
from moreft.safe_write import atomic_write_file

#: The trained weights of a full fine-tuning run, in the run folder and in each checkpoint.
FULL_WEIGHTS_FILE = "model.safetensors"
#: ``metrics.json`` key of the initial-weight digest of a from-scratch base.
DIGEST_KEY = "base_init_sha256"


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by name, a tensor shared under several names kept once."""
    seen: set[Any] = set()
    state = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().contiguous().cpu()
    return state


def save_full_weights(model: torch.nn.Module, path: Path, step: int | None = None) -> Path:
    """Write ``model``'s whole state to ``path`` (safetensors), atomically."""
    tensors = full_state(model)
    meta = {"format": "pt", "moreft": "full-weights", **({"step": str(step)} if step is not None else {})}
    return atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


@torch.no_grad()
def load_full_weights(model: torch.nn.Module, path: Path) -> int:
    """Copy the weights :func:`save_full_weights` wrote into ``model`` (a fresh base of the same architecture).

    Returns:
        The number of tensors written.

    Raises:
        moreft.AdapterFileError: The file is missing or unreadable, lacks one of the model's tensors,
            names one the model does not have, or a shape differs; the model is left as it was then.
    """
    if not path.is_file():
        raise AdapterFileError(f"{str(path)!r} does not exist: the full fine-tuning run did not finish")
    try:
        saved = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise AdapterFileError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None
    own = full_state(model)
    live = model.state_dict()
    missing, unknown = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    wrong = sorted(k for k in set(own) & set(saved) if tuple(saved[k].shape) != tuple(own[k].shape))
    if missing or unknown or wrong:
        raise AdapterFileError(
            f"{str(path)!r} does not fit the model: missing {missing[:4]}, unknown "
            f"{unknown[:4]}, other shapes {wrong[:4]}; it belongs to another base model"
        )
    for name, value in saved.items():
        live[name].copy_(value.to(dtype=live[name].dtype))
    return len(saved)


def unadapted_modules(model: torch.nn.Module, targets: list[str]) -> tuple[str, ...]:
    """Modules that own parameters outside the adapted layers ``targets`` (embeddings, norms, heads).

    A module whose parameters all belong to a module listed before it (an output head tied to the
    input embedding) is left out, so each tensor is trained and saved once.
    """
    seen: set[int] = set()
    out = []
    for name, module in model.named_modules():
        if not name or any(name == t or name.startswith(t + ".") for t in targets):
            continue
        own = list(module.parameters(recurse=False))
        if not own or all(id(p) in seen for p in own):
            continue
        seen.update(id(p) for p in own)
        out.append(name)
    return tuple(out)


def adapter_for(config: Any, model: torch.nn.Module, targets: Any, heads: tuple[str, ...]) -> Any:
    """The adapter config a run injects: ``config.adapter_config(targets, heads)``, plus, with
    ``train_unadapted``, every :func:`unadapted_modules` module in ``modules_to_save``.

    Raises:
        ConfigError: A bad hyperparameter (see :meth:`TrainConfig.adapter_config`).
        moreft.TargetError: ``target_modules`` matches nothing.
    """
    import moreft

    adapter = config.adapter_config(targets, heads)
    if not config.train_unadapted:
        return adapter
    names = moreft.resolve_targets(model, adapter)
    extra = [
        n for n in unadapted_modules(model, names) if not any(n == h or n.endswith("." + h) for h in heads)
    ]
    return config.adapter_config(targets, (*heads, *extra))


def init_digest_of(model: torch.nn.Module) -> str | None:
    """The initial-weight digest a from-scratch model carries (None for a loaded model)."""
    return getattr(model, DIGEST_ATTR, None)


def check_init_digest(model: torch.nn.Module, metrics: dict[str, Any], run: Path) -> None:
    """Refuse a rebuilt from-scratch base whose initial weights differ from those the run trained on.

    Raises:
        ConfigError: The digests differ (another torch / transformers version draws other numbers).
    """
    saved, now = metrics.get(DIGEST_KEY), init_digest_of(model)
    if saved is not None and now is not None and saved != now:
        raise ConfigError(
            f"run {str(run)!r} trained on a random base whose initial weights this installation does "
            f"not reproduce (digest {now[:12]}... != {str(saved)[:12]}...): torch or transformers "
            "draws other numbers for the same seed now; evaluate it with the versions that trained it"
        )
