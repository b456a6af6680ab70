"""Large safetensors models with trained-like statistics, generated in bounded memory.

A transformer's layout (embeddings, per layer q/k/v/o and a 4x MLP, norms): matrices are
heavy-tailed (Student-t, 5 degrees of freedom) with a per-tensor scale around 0.02 and a
log-normal scale per output row, as trained weights have; norms sit around 1. Tensors are
written one at a time, so generating a 2 GB model holds one tensor in memory."""
from __future__ import annotations

import json
import os
import struct

import numpy as np

_ST = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def layout(total_bytes: int, itemsize: int, d: int = 2048) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a model of about `total_bytes`."""
    shapes = [("model.embed_tokens.weight", (8192, d))]
    per_layer = [("self_attn.q_proj.weight", (d, d)), ("self_attn.k_proj.weight", (d, d)), ("self_attn.v_proj.weight", (d, d)),
                 ("self_attn.o_proj.weight", (d, d)), ("mlp.up_proj.weight", (4 * d, d)), ("mlp.down_proj.weight", (d, 4 * d)),
                 ("input_layernorm.weight", (d,)), ("post_attention_layernorm.weight", (d,))]
    layer_bytes = sum(int(np.prod(s)) for _, s in per_layer) * itemsize
    layers = max(1, round((total_bytes - 8192 * d * itemsize) / layer_bytes))
    for i in range(layers):
        shapes += [(f"model.layers.{i}.{n}", s) for n, s in per_layer]
    return shapes + [("model.norm.weight", (d,))]


def _values(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 1:
        return (1.0 + 0.05 * rng.standard_normal(shape[0])).astype(np.float32)
    x = rng.standard_t(5, size=shape).astype(np.float32)
    x *= np.float32(0.02 * rng.uniform(0.5, 2.0) / np.sqrt(5 / 3))
    x *= np.exp(0.3 * rng.standard_normal((shape[0], 1))).astype(np.float32)
    return x


def _encode(x: np.ndarray, dt: str) -> np.ndarray:
    if dt == "fp32":
        return x
    if dt == "fp16":
        return x.astype(np.float16)
    u = x.view(np.uint32)  # bf16: round to nearest even on the bit pattern (values here are finite)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_model(path: str, total_bytes: int, dt: str = "bf16", seed: int = 0) -> str:
    """Write a model of about `total_bytes` in dtype `dt` (bf16, fp16, fp32) to `path`."""
    itemsize = 4 if dt == "fp32" else 2
    shapes = layout(total_bytes, itemsize)
    header, offset = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": _ST[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes:
            f.write(_encode(_values(rng, name, shape), dt).tobytes())
    os.replace(tmp, path)
    return path
