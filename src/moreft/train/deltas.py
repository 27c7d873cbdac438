"""ΔW of a finished run, ``W_trained - W_initial`` per layer (see :mod:`moreft.train.inspection`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import moreft
from moreft.tasks import TaskKind
from moreft.train.config import TrainConfig
from moreft.train.rundir import RunDir, load_base, load_trained, model_defaults


def oriented(module: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight as ``(out, in)`` (transformers' Conv1D stores ``(in, out)``)."""
    return module.weight.T if moreft.layers.is_conv1d(module) else module.weight


def full_targets(config: TrainConfig, model: torch.nn.Module) -> list[str]:
    """The linear layers whose ΔW a full fine-tuning run reports: ``target_modules``, or the model's default."""
    from moreft.config import CONFIG_CLASSES

    spec = (
        config.target_modules
        if config.target_modules is not None
        else model_defaults(config.model, model, TaskKind.GENERATION)[0]
    )
    # resolve_targets reads only target_modules (and modules_to_save) of the config it is given
    return moreft.resolve_targets(model, CONFIG_CLASSES[moreft.Method.LORA](target_modules=spec))


def run_deltas(
    run_dir: str | os.PathLike,
) -> tuple[TrainConfig, torch.nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor, int]]]:
    """``(config, trained model, {layer: (ΔW, W_initial, trained params)})`` of a finished run, ΔW =
    ``W_trained - W_initial`` as the module docstring says, all ``(out, in)``.

    Raises:
        moreft.AdapterFileError / ConfigError: as :func:`moreft.train.rundir.load_trained`.
    """
    from moreft.train.reinit import MERGED_BASE_FILE

    config, task, model, _ = load_trained(run_dir, moreft_only="moreft inspect")
    merged = (RunDir(Path(run_dir)).path / MERGED_BASE_FILE).is_file()
    layers = moreft.adapter_layers(model)
    names = full_targets(config, model) if config.full else list(layers)
    initial: dict[str, torch.Tensor] = {}
    if config.full or merged:
        base, _ = load_base(config, task)
        modules = dict(base.named_modules())
        initial = {n: oriented(modules[n]).detach().float().cpu() for n in names}
        del base
    out = {}
    with torch.no_grad():
        for name in names:
            if config.full:
                module = model.get_submodule(name)
                now = oriented(module).detach().float().cpu()
                out[name] = (now - initial[name], initial[name], sum(p.numel() for p in module.parameters()))
                continue
            layer = layers[name]
            delta = layer.delta_weight().detach().float().cpu()
            base_now = oriented(layer.base_layer).detach().float().cpu()
            if merged:  # the earlier cycles, merged into the base
                delta = delta + base_now - initial[name]
            params = sum(p.numel() for p in layer.adapter_params().values())
            out[name] = (delta, initial.get(name, base_now), params)
    return config, model, out
