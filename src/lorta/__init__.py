"""lorta: tensor low-rank adapters (LoRTA, TensLoRA, TLoRA) as native PEFT methods.

``import lorta`` registers the methods with PEFT; then ``get_peft_model(model, lorta.LortaConfig(r=8))``.
Every method of ``lorta/methods`` (its `MethodSpec`, see lorta.registry) gets a PEFT tuner, is registered with
PEFT and is exported here under its config's, factors' and tuner's names (``LortaConfig``, ``LortaFactors``,
``LortaModel``, ...).
"""

from importlib import metadata as _metadata

from .arithmetic import AdapterCombinationError
from .bank import AdapterBank, load_adapters  # noqa: F401  (mixed-adapter serving; see lorta.bank)
from .export import ExportError, export_gguf, export_lora, export_merged
from .import_lora import ImportLoraError, import_lora, save_imported
from .layout import LayoutError, ModelShape
from .quantized import QuantizedMergeError
from .registry import install_atomic_save, method_specs, register
from .tuner import TensorAdapterConfig, TensorAdapterModel, make_tuner

install_atomic_save()  # PeftModel.save_pretrained of a lorta model: written whole or not at all
_METHOD_EXPORTS: list[str] = []
for _spec in method_specs().values():
    _tuner = make_tuner(_spec.tuner_name, _spec.factors_cls, _spec.default_kinds)
    register(_spec, _tuner)
    for _cls in (_spec.config_cls, _spec.factors_cls, _tuner):
        globals()[_cls.__name__] = _cls
        _METHOD_EXPORTS.append(_cls.__name__)

__version__ = _metadata.version("lorta")  # the one source is pyproject.toml
__all__ = [
    "AdapterCombinationError",
    "ExportError",
    "ImportLoraError",
    "LayoutError",
    "ModelShape",
    "QuantizedMergeError",
    "TensorAdapterConfig",
    "TensorAdapterModel",
    "export_gguf",
    "export_lora",
    "export_merged",
    "import_lora",
    "save_imported",
    *_METHOD_EXPORTS,
]
