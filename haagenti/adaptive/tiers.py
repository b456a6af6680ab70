"""Precision tiers in the fragment library: a model's Linear/Conv-like weights stored again at
INT8 or INT4 (values plus scales) as a tier model "<id>.<precision>", whose fragments carry that
quality level. A loader asked for a precision reads only that tier's fragments."""
from __future__ import annotations

import posixpath
import uuid

import fsspec
import torch
from safetensors.torch import save

from haagenti.adaptive.precision import AdaptiveError, Precision
from haagenti.adaptive.quantize import QuantizedTensor, quantize
from haagenti.core import LibraryCore
from haagenti.ingest import IngestReport, ModelInput, ingest_models
from haagenti.loader import ModelLoader

TIERS = (Precision.INT8, Precision.INT4)
_SCALE = ".__scale"


def tier_id(model_id: str, precision: Precision) -> str:
    return f"{model_id}.{precision.value}"


def _quantizable(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dim() >= 2


def add_tier(library: LibraryCore, model_id: str, precision: Precision | str) -> IngestReport:
    p = precision if isinstance(precision, Precision) else Precision.parse(precision)
    if p not in TIERS:
        raise AdaptiveError(f"tiers are {', '.join(t.value for t in TIERS)}; {p.value} is served by the exact model")
    state = ModelLoader(library).load(model_id)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if _quantizable(t):
            q = quantize(t, p)
            out[name] = q.data.contiguous()
            out[name + _SCALE] = q.scale.contiguous()
        else:
            out[name] = t.contiguous()
    # Held in this process's memory (fsspec's memory://), not a temporary file: a tier add
    # killed midway leaves nothing behind on disk.
    fs = fsspec.filesystem("memory")
    path = f"/haagenti-tier-{uuid.uuid4().hex}/tier.safetensors"
    fs.pipe_file(path, save(out, metadata={"haagenti_tier": p.value, "source": model_id}))
    try:
        tier = ModelInput([f"memory://{path}"], tier_id(model_id, p), library.model(model_id)["family"])
        return ingest_models(library, [tier], quality=p.value)[0]
    finally:
        fs.rm(posixpath.dirname(path), recursive=True)


def tiers_of(library: LibraryCore, model_id: str) -> list[Precision]:
    """The precision tiers stored for a model (an unknown model raises LibraryError)."""
    library.model(model_id)
    ids = {m["model_id"] for m in library.models()}
    return [p for p in TIERS if tier_id(model_id, p) in ids]


def load_model(library: LibraryCore, model_id: str, precision: Precision | str = Precision.FP32) -> dict[str, torch.Tensor]:
    """The model's tensors; at INT8/INT4 only the tier's fragments are read and the weights come
    back dequantised (FP32) with the tier's error; FP16/BF16 are casts of the exact model."""
    p = precision if isinstance(precision, Precision) else Precision.parse(precision)
    if p in TIERS:
        if p not in tiers_of(library, model_id):
            raise AdaptiveError(f"model {model_id!r} has no {p.value} tier; add it first: `haagenti tier add LIBRARY {model_id} {p.value}` (tiers.add_tier)")
        raw = ModelLoader(library).load(tier_id(model_id, p))
        shapes = {k: v.shape for k, v in library.manifest(model_id).tensors_by_name().items()}
        state = {}
        for name, t in raw.items():
            if name.endswith(_SCALE):
                continue
            if name + _SCALE in raw:
                state[name] = QuantizedTensor(p, torch.Size(shapes[name]), t, raw[name + _SCALE]).dequantize()
            else:
                state[name] = t
        return state
    state = ModelLoader(library).load(model_id)
    if p in (Precision.FP16, Precision.BF16):
        dt = torch.float16 if p is Precision.FP16 else torch.bfloat16
        return {k: v.to(dt) if v.is_floating_point() else v for k, v in state.items()}
    return state
