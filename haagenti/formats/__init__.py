"""Model file readers and writers: each container format (safetensors, GGUF, ONNX and its
external data, PyTorch checkpoints read weights_only, side files) is a ContainerFormat in a
module of its own, listed by name in formats/registry.py; formats/source.py opens a model's
files and folders with them."""
from haagenti.formats.container import ContainerFormat, SourceFile, SourceTensor
from haagenti.formats.dtypes import DType, dtype, from_torch
from haagenti.formats.registry import CONTAINERS, container
from haagenti.formats.safetensors import SafetensorsHeader, TensorEntry, parse_header
from haagenti.formats.source import ModelSource, open_model
from haagenti.formats.torch_file import load_checkpoint

__all__ = [
    "CONTAINERS",
    "ContainerFormat",
    "container",
    "DType",
    "dtype",
    "from_torch",
    "SafetensorsHeader",
    "TensorEntry",
    "parse_header",
    "ModelSource",
    "SourceFile",
    "SourceTensor",
    "load_checkpoint",
    "open_model",
]
