from .config import TensorAdapterConfig
from .layer import Linear, TensorAdapterLayer
from .model import TensorAdapterModel, targets_of_kinds

__all__ = ["Linear", "TensorAdapterConfig", "TensorAdapterLayer", "TensorAdapterModel", "targets_of_kinds"]
