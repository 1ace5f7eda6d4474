from .lorta import LORTA_MODES, LortaConfig, LortaFactors, lorta_num_params

__all__ = ["LORTA_MODES", "LortaConfig", "LortaFactors", "lorta_num_params"]
