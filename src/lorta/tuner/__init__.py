from ..architectures import targets_of_kinds
from .config import TensorAdapterConfig
from .layer import Linear, TensorAdapterLayer
from .model import TensorAdapterModel

__all__ = ["Linear", "TensorAdapterConfig", "TensorAdapterLayer", "TensorAdapterModel", "targets_of_kinds"]
