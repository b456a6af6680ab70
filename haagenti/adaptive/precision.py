"""Numeric precisions and what the running hardware supports."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from haagenti.adaptive.presets import AdaptiveError  # noqa: F401  (re-exported)


class Precision(str, Enum):
    INT4 = "int4"
    INT5 = "int5"
    INT6 = "int6"
    INT8 = "int8"
    FP16 = "fp16"
    BF16 = "bf16"
    FP32 = "fp32"

    @property
    def bits(self) -> int:
        return {"int4": 4, "int5": 5, "int6": 6, "int8": 8, "fp16": 16, "bf16": 16, "fp32": 32}[self.value]

    @property
    def bytes(self) -> float:
        return self.bits / 8

    @property
    def memory_ratio(self) -> float:
        """Weight bytes relative to FP16, the reference the targets are stated against."""
        return self.bits / 16

    @property
    def is_integer(self) -> bool:
        return self in (Precision.INT4, Precision.INT5, Precision.INT6, Precision.INT8)

    @classmethod
    def parse(cls, text: str) -> "Precision":
        key = text.strip().lower().replace("float", "fp").replace("bfloat", "bf")
        aliases = {"half": "fp16", "fp": "fp32", "full": "fp32", "single": "fp32", "q4": "int4", "q5": "int5", "q6": "int6", "q8": "int8"}
        key = aliases.get(key, key)
        try:
            return cls(key)
        except ValueError:
            raise AdaptiveError(f"unknown precision {text!r}; use one of {', '.join(p.value for p in cls)}") from None


ORDER = [Precision.INT4, Precision.INT5, Precision.INT6, Precision.INT8, Precision.FP16, Precision.BF16, Precision.FP32]


@dataclass(frozen=True)
class PrecisionCapabilities:
    """Precisions a device can run. Weight-only INT4..INT8 run anywhere (dequantised on the fly);
    BF16 needs compute capability 8.0+ on CUDA, FP16 7.0+ for tensor cores."""

    device: str
    supported: frozenset[Precision]
    compute_capability: tuple[int, int] | None = None

    def supports(self, p: Precision) -> bool:
        return p in self.supported

    def clamp(self, p: Precision) -> Precision:
        """The nearest supported precision at or above `p` (never silently lower)."""
        for q in ORDER[ORDER.index(p):]:
            if q in self.supported:
                return q
        raise AdaptiveError(f"{self.device} supports none of {p.value} or higher")

    @classmethod
    def detect(cls) -> "PrecisionCapabilities":
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return cls.modern_gpu() if major >= 8 else cls.legacy_gpu((major, minor))
        return cls.cpu()

    @classmethod
    def modern_gpu(cls) -> "PrecisionCapabilities":
        return cls("cuda", frozenset(ORDER), (9, 0))

    @classmethod
    def legacy_gpu(cls, cc: tuple[int, int] = (7, 0)) -> "PrecisionCapabilities":
        return cls("cuda", frozenset({Precision.INT4, Precision.INT5, Precision.INT6, Precision.INT8, Precision.FP16, Precision.FP32}), cc)

    @classmethod
    def cpu(cls) -> "PrecisionCapabilities":
        return cls("cpu", frozenset(ORDER))
