"""Real K-quant blocks of an example model, from ggml's own quantizer (gguf's python quantizers
write none): every matrix whose rows are multiples of 256, as F16 values, through
`ggml_quantize_chunk` (what llama-quantize runs per tensor; without an imatrix, ggml's
quantize_row_q*_K_ref). Writes an .npz of the F16 rows ("source") and each type's blocks; with
--tensors, each matrix's blocks apart ("<type>/<tensor name>", rows of blocks), what
`bench/formats.py --ladder --kquants` writes GGUF files of.

Runs in an environment of its own (ggml-python builds ggml from source, about a minute):
    python -m venv /tmp/kq && /tmp/kq/bin/pip install ggml-python==0.0.45 numpy safetensors torch==2.13.0
    /tmp/kq/bin/python bench/kquant_material.py MODEL.safetensors OUT.npz [--rows 16]
--rows N keeps N rows spread over the model (tests/data/kquants.npz: the example family's base,
16 rows). docs/decisions/0281-quantized-prediction.md has what the blocks measured.
"""
from __future__ import annotations

import argparse
import ctypes

import ggml
import numpy as np
from safetensors.torch import load_file

BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def quantize(rows: np.ndarray, name: str) -> np.ndarray:
    """(rows, 256 x k) float32 values -> their blocks, one row of bytes per row."""
    kind = getattr(ggml, f"GGML_TYPE_{name}")
    src = np.ascontiguousarray(rows, np.float32)
    out = np.zeros((len(rows), rows.shape[1] // 256 * BLOCK_BYTES[name]), np.uint8)
    ggml.ggml_quantize_init(kind)
    written = ggml.ggml_quantize_chunk(kind, src.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.ctypes.data, 0, len(rows), rows.shape[1], None)
    assert written == out.size, (written, out.size)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=0, help="keep this many rows of 256 values, spread over the model (0: all)")
    ap.add_argument("--tensors", action="store_true", help="each matrix's blocks apart, rows as in the tensor")
    args = ap.parse_args()
    state = {k: v.half().float().numpy() for k, v in load_file(args.model).items() if v.ndim == 2 and v.shape[-1] % 256 == 0}
    if args.tensors:
        found = {f"{name}/{k}": quantize(v, name) for k, v in state.items() for name in BLOCK_BYTES}
        np.savez_compressed(args.out, **found)
        print(f"{len(state)} tensors, {len(found)} arrays")
        return
    mats = list(state.values())
    source = np.concatenate([m.reshape(-1, 256) for m in mats]).astype(np.float16)
    if args.rows:
        source = source[np.arange(0, len(source), len(source) // args.rows)[: args.rows]]
    found = {"source": source} | {name: quantize(source.astype(np.float32), name) for name in BLOCK_BYTES}
    np.savez_compressed(args.out, **found)
    print({k: v.shape for k, v in found.items()})


if __name__ == "__main__":
    main()
