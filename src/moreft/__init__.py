"""moreft: structured high-rank adapters (MoRe, MoRA) and LoRA for PyTorch / transformers.

    import moreft
    model = moreft.inject(model, moreft.MoReConfig(target_modules=["query", "key", "value"]))
    ...train...
    moreft.save_adapter(model, "adapter/")
    model = moreft.merge(model)   # zero-overhead inference
"""

from .config import (
    AdapterConfig,
    BlockRule,
    LoRAConfig,
    Method,
    MoRAConfig,
    MoRAOperator,
    MoReConfig,
    RHatRounding,
    SharingLayout,
    config_from_dict,
)
from .errors import AdapterFileError, ConfigError, MergeError, MoreftError, TargetError
from .export import ExportReport, export_lora
from .inject import (
    ParameterCounts,
    adapter_config,
    adapter_layers,
    eject,
    inject,
    merge,
    resolve_targets,
    trainable_parameters,
)
from .layers import AdapterLayer, AdapterModule, LoRALinear, MoRALinear, MoReLinear
from .state import load_adapter, read_adapter_config, save_adapter
from .version import __version__

__all__ = [
    "AdapterConfig", "AdapterFileError", "BlockRule", "RHatRounding", "AdapterLayer", "AdapterModule", "ConfigError", "ExportReport",
    "LoRAConfig", "LoRALinear", "MergeError", "Method", "MoRAConfig", "MoRALinear", "MoRAOperator",
    "MoReConfig", "MoReLinear", "MoreftError", "ParameterCounts", "SharingLayout", "TargetError",
    "__version__", "adapter_config", "adapter_layers", "config_from_dict", "eject", "export_lora",
    "inject", "load_adapter", "merge", "read_adapter_config", "resolve_targets", "save_adapter",
    "trainable_parameters",
]
