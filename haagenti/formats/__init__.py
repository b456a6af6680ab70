"""Model file readers and writers: safetensors, GGUF and ONNX (strict, located without loading
the weights; formats/splice.py says how each file is stored), PyTorch checkpoints (weights_only)
and the folders that hold them."""
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
