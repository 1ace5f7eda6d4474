from .config import TensorAdapterConfig
from .layer import Linear, TensorAdapterLayer
from .model import TensorAdapterModel, make_tuner

__all__ = ["Linear", "TensorAdapterConfig", "TensorAdapterLayer", "TensorAdapterModel", "make_tuner"]
