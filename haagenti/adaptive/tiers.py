"""Precision tiers in the fragment library: a model's Linear/Conv-like weights stored again at
INT8, INT6, INT5 or INT4 (packed values plus scales and shifts) as a tier model "<id>.<precision>", whose fragments carry that
quality level. A loader asked for a precision reads only that tier's fragments; `LayerTiers`
reads them a few layers at a time, for a switcher that keeps only what its next step needs."""
from __future__ import annotations

import posixpath
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping

import fsspec
import torch
from safetensors.torch import save

from haagenti.adaptive.precision import AdaptiveError, Precision
from haagenti.adaptive.quantize import QuantizedTensor, quantize
from haagenti.core import LibraryCore
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.hashing import content_hash
from haagenti.ingest import IngestReport, ModelInput, ingest_models
from haagenti.loader import ModelLoader

TIERS = (Precision.INT8, Precision.INT6, Precision.INT5, Precision.INT4)
_SCALE = ".__scale"
_SHIFT = ".__shift"  # INT4's group minimum, INT5/INT6's channel minimum; INT4 tiers stored before the affine grid have none


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
            if q.shift is not None:
                out[name + _SHIFT] = q.shift.contiguous()
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


def _require_tier(library: LibraryCore, model_id: str, p: Precision) -> None:
    if p not in tiers_of(library, model_id):
        raise AdaptiveError(f"model {model_id!r} has no {p.value} tier; add it first: `haagenti tier add LIBRARY {model_id} {p.value}` (tiers.add_tier)")


def load_model(library: LibraryCore, model_id: str, precision: Precision | str = Precision.FP32) -> dict[str, torch.Tensor]:
    """The model's tensors; at a tier's precision only the tier's fragments are read and the weights come
    back dequantised (FP32) with the tier's error; FP16/BF16 are casts of the exact model."""
    p = precision if isinstance(precision, Precision) else Precision.parse(precision)
    if p in TIERS:
        _require_tier(library, model_id, p)
        raw = ModelLoader(library).load(tier_id(model_id, p))
        shapes = {k: v.shape for k, v in library.manifest(model_id).tensors_by_name().items()}
        state = {}
        for name, t in raw.items():
            if name.endswith((_SCALE, _SHIFT)):
                continue
            if name + _SCALE in raw:
                state[name] = QuantizedTensor(p, torch.Size(shapes[name]), t, raw[name + _SCALE], raw.get(name + _SHIFT)).dequantize()
            else:
                state[name] = t
        return state
    state = ModelLoader(library).load(model_id)
    if p in (Precision.FP16, Precision.BF16):
        dt = torch.float16 if p is Precision.FP16 else torch.bfloat16
        return {k: v.to(dt) if v.is_floating_point() else v for k, v in state.items()}
    return state


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class LayerTiers:
    """A denoiser's layer weights at each precision, read from the library a few tensors at a
    time: INT8..INT4 as the stored tier's values and scales (dequantised per call by whoever
    holds them), FP32 as the exact model's weights, FP16/BF16 as those rounded and held at 2
    bytes. Tensors are read straight into buffers allocated for them (ModelLoader's `into`), and
    the loader keeps no fragment cache: what is resident is exactly what the caller holds."""

    def __init__(self, library: LibraryCore, model_id: str, threads: int = 1):
        self.library, self.model_id = library, model_id
        self.loader = ModelLoader(library, cache_bytes=0, threads=threads)
        self.tensors = self.loader.manifest(model_id).tensors_by_name()

    def check(self, weights: Mapping[str, torch.Tensor], precisions: Collection[Precision]) -> None:
        """One AdaptiveError line unless every tier asked for is stored and each named weight is
        this model's, bit for bit (the switcher drops the denoiser's own copy and restores it
        from the library afterwards, so a weight that differs would come back changed)."""
        for p in TIERS:
            if p in precisions:
                _require_tier(self.library, self.model_id, p)
        for name, w in weights.items():
            ref = self.tensors.get(name)
            if ref is None or tuple(ref.shape) != tuple(w.shape) or lookup_dtype(ref.dtype).torch_dtype != w.dtype:
                held = "no such tensor" if ref is None else f"{ref.dtype} {list(ref.shape)}"
                raise AdaptiveError(f"the denoiser's {name!r} ({w.dtype} {list(w.shape)}) is not model {self.model_id!r}'s ({held})")
            if w.device.type != "cpu":
                raise AdaptiveError(f"layers are streamed from the library into CPU memory; the denoiser's {name!r} is on {w.device}")
            raw = w.detach().contiguous().view(-1).view(torch.uint8).numpy()
            size = w.element_size()
            if any(content_hash(raw[r.elem_offset * size:(r.elem_offset + r.elem_count) * size]) != r.fragment_id for r in ref.fragments):
                raise AdaptiveError(f"the denoiser's {name!r} differs from model {self.model_id!r} in the library: stream the model that is stored")

    def _stored(self, p: Precision, names: Collection[str]) -> tuple[str, dict[str, tuple[torch.Size, torch.dtype]]]:
        """The library model that holds `names` at `p`, and the shape and dtype of what it stores."""
        if p in TIERS:
            model = tier_id(self.model_id, p)
            refs = self.loader.manifest(model).tensors_by_name()
            names = [*names, *(n + _SCALE for n in names), *(n + _SHIFT for n in names if n + _SHIFT in refs)]
        else:
            model, refs = self.model_id, self.tensors
        return model, {n: (torch.Size(refs[n].shape), lookup_dtype(refs[n].dtype).torch_dtype) for n in names}

    def weight_bytes(self, p: Precision, names: Collection[str]) -> int:
        """Bytes `names` occupy held at `p` (scales included)."""
        stored = self._stored(p, names)[1].values()
        if p in (Precision.FP16, Precision.BF16):
            return sum(shape.numel() * 2 for shape, _ in stored)
        return sum(shape.numel() * dt.itemsize for shape, dt in stored)

    def load(self, p: Precision, names: Collection[str], tally: Callable[[int], None] = lambda n: None) -> dict[str, QuantizedTensor]:
        """`names` at precision `p`; `tally` hears of every byte allocated (+) and freed (-)
        on the way, the FP32 staging of a 16-bit precision included."""
        model, stored = self._stored(p, names)
        into = {n: torch.empty(shape, dtype=dt) for n, (shape, dt) in stored.items()}
        tally(_nbytes(into.values()))
        try:
            self.loader.load(model, into=into, names=list(into))
        except BaseException:
            tally(-_nbytes(into.values()))
            raise
        shapes = {n: torch.Size(self.tensors[n].shape) for n in names}
        if p in TIERS:
            return {n: QuantizedTensor(p, shapes[n], into[n], into[n + _SCALE], into.get(n + _SHIFT)) for n in names}
        if p is Precision.FP32:
            return {n: QuantizedTensor(p, shapes[n], into[n]) for n in names}
        half = {n: QuantizedTensor(p, shapes[n], into[n].to(torch.float16 if p is Precision.FP16 else torch.bfloat16)) for n in names}
        tally(sum(q.nbytes for q in half.values()))
        staged = _nbytes(into.values())
        del into
        tally(-staged)
        return half
