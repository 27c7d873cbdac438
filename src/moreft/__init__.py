"""moreft: structured high-rank adapters (MoRe, MoRA) and LoRA for PyTorch / transformers.

    import moreft
    model = moreft.inject(model, moreft.MoReConfig(target_modules=["query", "key", "value"]))
    ...train...
    moreft.save_adapter(model, "adapter/")
    model = moreft.merge(model)   # zero-overhead inference

or, the same adapters through peft: ``peft.get_peft_model(model, moreft.MoReConfig(...))``.

Importing moreft has one effect on the process, on purpose: it registers the peft types
``"MORE"``, ``"MORA"`` and ``"MOREFT_LORA"`` in ``peft.mapping`` (:mod:`moreft.tuners.registration`),
so that peft, transformers and TRL can build, save and load these adapters.
"""

from . import quant  # noqa: F401 - moreft.quant.merge_quantized is public
from .adapter_files import load_adapter, read_adapter_config, save_adapter
from .config import (
    AdapterConfig,
    BlockRule,
    Composition,
    InitMode,
    LoRAConfig,
    Method,
    MoRAConfig,
    MoRAOperator,
    MoReConfig,
    RHatRounding,
    SharingLayout,
    config_from_dict,
)
from .errors import (
    AdapterFileError,
    ConfigError,
    ExportError,
    MergeError,
    MoreftError,
    OutputError,
    TargetError,
)
from .export import ExportReport, export_lora
from .inject import (
    ParameterCounts,
    adapter_config,
    adapter_layers,
    count_parameters,
    eject,
    inject,
    merge,
    resolve_targets,
    trainable_parameters,
)
from .layers import AdapterLayer, AdapterModule, LoRALinear, MoRALinear, MoReLinear
from .peft_files import convert_to_peft
from .tuners import LoRAModel, MoRAModel, MoReModel
from .tuners.registration import register as _register_peft_types
from .version import __version__

_register_peft_types()

__all__ = [
    "AdapterConfig",
    "AdapterFileError",
    "AdapterLayer",
    "AdapterModule",
    "BlockRule",
    "Composition",
    "ConfigError",
    "ExportError",
    "ExportReport",
    "InitMode",
    "LoRAConfig",
    "LoRALinear",
    "LoRAModel",
    "MergeError",
    "Method",
    "MoRAConfig",
    "MoRALinear",
    "MoRAModel",
    "MoRAOperator",
    "MoReConfig",
    "MoReLinear",
    "MoReModel",
    "MoreftError",
    "OutputError",
    "ParameterCounts",
    "RHatRounding",
    "SharingLayout",
    "TargetError",
    "__version__",
    "adapter_config",
    "adapter_layers",
    "config_from_dict",
    "convert_to_peft",
    "count_parameters",
    "eject",
    "export_lora",
    "inject",
    "load_adapter",
    "merge",
    "read_adapter_config",
    "resolve_targets",
    "save_adapter",
    "trainable_parameters",
]
