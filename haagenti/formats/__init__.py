"""Model file readers and writers: safetensors (strict, streamed), PyTorch checkpoints (weights_only)."""
from haagenti.formats.dtypes import DType, dtype, from_torch
from haagenti.formats.safetensors import SafetensorsHeader, TensorEntry, parse_header
from haagenti.formats.source import ModelSource, SourceFile, SourceTensor, load_checkpoint, open_model

__all__ = [
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
