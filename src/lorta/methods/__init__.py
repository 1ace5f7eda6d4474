from .lorta import LORTA_MODES, LortaConfig, LortaFactors, lorta_num_params
from .tenslora import CONSTRUCTIONS, TensLoraConfig, TensLoraFactors, tenslora_num_params, tensor_modes
from .tlora import TLoraConfig, TLoraFactors, tlora_num_params

__all__ = [
    "CONSTRUCTIONS",
    "LORTA_MODES",
    "LortaConfig",
    "LortaFactors",
    "TLoraConfig",
    "TLoraFactors",
    "TensLoraConfig",
    "TensLoraFactors",
    "lorta_num_params",
    "tenslora_num_params",
    "tensor_modes",
    "tlora_num_params",
]
