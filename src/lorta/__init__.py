"""lorta: tensor low-rank adapters (LoRTA, TensLoRA, TLoRA) as native PEFT methods.

``import lorta`` registers the methods with PEFT; then ``get_peft_model(model, lorta.LortaConfig(r=8))``.
Each method (``lorta/methods/<name>.py``) brings a config, its factors and its PEFT tuner (``LortaConfig``,
``LortaFactors``, ``LortaModel``, ...), all importable from here. Importing lorta also makes
``PeftModel.save_pretrained`` crash-safe for lorta models (lorta.save_hook; other models are untouched).
"""

from importlib import metadata as _metadata

from . import save_hook as _save_hook
from .arithmetic import AdapterCombinationError
from .bank import AdapterBank, AdapterFileError, load_adapters
from .export import ExportError, export_gguf, export_lora, export_merged
from .import_lora import ImportLoraError, import_lora, save_imported
from .layout import LayoutError, ModelShape
from .methods import (
    LortaConfig,
    LortaFactors,
    LortaModel,
    TensLoraConfig,
    TensLoraFactors,
    TensLoraModel,
    TLoraConfig,
    TLoraFactors,
    TLoraModel,
)
from .packed import PackedAdapters, PackedFileError, append_packed, write_packed
from .paging import PagedAdapterBank, pack_adapters
from .quantized import QuantizedMergeError
from .registry import METHODS as _METHODS
from .registry import register as _register
from .tuner import TensorAdapterConfig, TensorAdapterModel

for _spec in _METHODS:
    _register(_spec)
_save_hook.install()  # PeftModel.save_pretrained of a lorta model: written whole or not at all

__version__ = _metadata.version("lorta")  # the one source is pyproject.toml
__all__ = [
    "AdapterBank",
    "AdapterCombinationError",
    "AdapterFileError",
    "ExportError",
    "ImportLoraError",
    "LayoutError",
    "LortaConfig",
    "LortaFactors",
    "LortaModel",
    "ModelShape",
    "PackedAdapters",
    "PackedFileError",
    "PagedAdapterBank",
    "QuantizedMergeError",
    "TLoraConfig",
    "TLoraFactors",
    "TLoraModel",
    "TensLoraConfig",
    "TensLoraFactors",
    "TensLoraModel",
    "TensorAdapterConfig",
    "TensorAdapterModel",
    "__version__",
    "append_packed",
    "export_gguf",
    "export_lora",
    "export_merged",
    "import_lora",
    "load_adapters",
    "pack_adapters",
    "save_imported",
    "write_packed",
]
