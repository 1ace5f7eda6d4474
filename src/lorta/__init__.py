"""lorta: tensor low-rank adapters (LoRTA, TensLoRA, TLoRA) as native PEFT methods.

``import lorta`` registers the methods with PEFT; then ``get_peft_model(model, lorta.LortaConfig(r=8))``.
"""

from . import saving  # noqa: F401
from .bank import AdapterBank, load_adapters  # noqa: F401  (mixed-adapter serving; see lorta.bank)
from .export import ExportError, export_gguf, export_lora, export_merged
from .import_lora import ImportLoraError, import_lora, save_imported
from .layout import LayoutError, ModelShape
from .methods.lorta import LortaConfig, LortaFactors
from .methods.tenslora import TensLoraConfig, TensLoraFactors
from .methods.tlora import TLORA_DEFAULT_TARGETS, TLoraConfig, TLoraFactors
from .quantized import QuantizedMergeError
from .registry import register
from .tuner import TensorAdapterConfig, TensorAdapterModel, make_tuner

LortaModel = make_tuner("LortaModel", LortaFactors)
TensLoraModel = make_tuner("TensLoraModel", TensLoraFactors, default_kinds=("q", "k", "v"))
TLoraModel = make_tuner("TLoraModel", TLoraFactors, default_kinds=TLORA_DEFAULT_TARGETS)
register("LORTA", LortaConfig, LortaModel)
register("TENSLORA", TensLoraConfig, TensLoraModel)
register("TLORA", TLoraConfig, TLoraModel)

__version__ = "0.1.0"
__all__ = [
    "ExportError",
    "ImportLoraError",
    "LayoutError",
    "LortaConfig",
    "LortaModel",
    "ModelShape",
    "QuantizedMergeError",
    "TensorAdapterConfig",
    "TensorAdapterModel",
    "TensLoraConfig",
    "TensLoraModel",
    "TLoraConfig",
    "TLoraModel",
    "export_gguf",
    "export_lora",
    "export_merged",
    "import_lora",
    "save_imported",
]
