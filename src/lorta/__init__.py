"""lorta: tensor low-rank adapters (LoRTA, TensLoRA, TLoRA) as native PEFT methods.

``import lorta`` registers the methods with PEFT; then ``get_peft_model(model, lorta.LortaConfig(r=8))``.
"""

from .layout import LayoutError, ModelShape
from .methods.lorta import LortaConfig, LortaFactors
from .registry import register
from .tuner import TensorAdapterConfig, TensorAdapterModel, make_tuner

LortaModel = make_tuner("LortaModel", LortaFactors)
register("LORTA", LortaConfig, LortaModel)

__version__ = "0.1.0"
__all__ = [
    "LayoutError",
    "LortaConfig",
    "LortaModel",
    "ModelShape",
    "TensorAdapterConfig",
    "TensorAdapterModel",
]
