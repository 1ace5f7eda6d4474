"""The methods of the family, one file each (config, factors, tuner, closed-form count, `SPEC`)."""

from .lorta import LORTA_MODES, LortaConfig, LortaFactors, LortaModel, lorta_num_params
from .tenslora import CONSTRUCTIONS, TensLoraConfig, TensLoraFactors, TensLoraModel, tenslora_num_params, tensor_modes
from .tlora import TLoraConfig, TLoraFactors, TLoraModel, tlora_num_params

__all__ = [
    "CONSTRUCTIONS",
    "LORTA_MODES",
    "LortaConfig",
    "LortaFactors",
    "LortaModel",
    "TLoraConfig",
    "TLoraFactors",
    "TLoraModel",
    "TensLoraConfig",
    "TensLoraFactors",
    "TensLoraModel",
    "lorta_num_params",
    "tenslora_num_params",
    "tensor_modes",
    "tlora_num_params",
]
