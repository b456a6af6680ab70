"""Formats: what the same weights cost in another container, in other shardings, and whether
deltas pay on quantized GGUF blocks.

    python bench/formats.py [--runs N]
Material: the example family's base (bench/.cache, trained once) exported by the field's writers
(haagenti.exports: gguf, torch.onnx, huggingface_hub, diffusers) into a temporary folder.

1. Cross-format: a library holding the published BF16 safetensors ingests one export; "added"
   is its new fragments plus its files' verbatim records (GGUF header and padding, the ONNX
   graph), as a share of the export's size. Baseline: zstd-3 of the export alone.
2. Reshard: the first layout ingested, then the second; what the second adds.
3. Quantized blocks: each fine-tune's Q8_0 / Q4_0 export ingested after the base's, stored
   with deltas (haagenti's default) and without (similarity off: exact dedup and zstd-1 only);
   and the oracle: zstd-1 of changed tensors plain against their XOR with the base's tensor.
Ingest times are min/median/max over --runs runs, interleaved; sizes are deterministic.

    python bench/formats.py --ladder [--families family,large1] [--kquants family=F.npz,large1=L.npz]
4. A quantization ladder (haagenti.exports.export_ladder: GGUF F16, then Q8_0, Q4_0, Q4_1, Q5_0,
   Q5_1 of its values by gguf's quantizers) of each family's base, ingested step after step into
   one library: what each step adds on disk (du of the library before and after), next to the
   ideal of storing its blocks' scale fields only, and to zstd -19, ZipNN (float16 mode) and glyd
   on the file alone; then the whole ladder's saving on disk. With --kquants (blocks of ggml's own
   quantizer, bench/kquant_material.py --tensors), K-quant files follow: a Q4_K_M-like mix, Q2_K,
   Q4_K, Q6_K. Then the ONNX int8 and uint8 files of the base (haagenti.exports.export_onnx_ladder:
   onnxruntime's quantize_dynamic of its fp32 ONNX export), per tensor, then per channel
   (int8ch, uint8ch), in a library of their own after the F16 GGUF (an fp16 source) and after
   the fp32 ONNX file. Only section 4 runs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch
import zstandard
from safetensors.torch import save_file

from common import CACHE, example_family
from storage import glyd_file, zipnn_file, zstd_file

from haagenti import exports as ex
from haagenti.config import LibraryConfig
from haagenti.library import FragmentLibrary


def added(lib: FragmentLibrary, model_id: str, report) -> int:
    return report.stored_bytes + sum(len(f.header) for f in lib.manifest(model_id).files)


def size(path: str) -> int:
    return os.path.getsize(path) if os.path.isfile(path) else sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def zstd3(path: str) -> int:
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    return sum(len(zstandard.ZstdCompressor(level=3).compress(open(p, "rb").read())) for p in files)


def pair_cost(root: str, first: str, second: str, runs: int) -> tuple[int, int, list[float]]:
    """(raw bytes of `second`, bytes it added after `first`, ingest seconds per run)."""
    times, add, raw = [], 0, 0
    for r in range(runs):
        path = os.path.join(root, f"lib-{r}")
        lib = FragmentLibrary.open(path)
        lib.ingest([first], "first")
        t = time.perf_counter()
        report = lib.ingest([second], "second")
        times.append(time.perf_counter() - t)
        add, raw = added(lib, "second", report), report.raw_bytes
        shutil.rmtree(path)
    return raw, add, times


def stored_after_base(root: str, base: str, model: str, similarity: bool) -> int:
    path = os.path.join(root, "qlib")
    lib = FragmentLibrary.open(path, LibraryConfig(similarity=similarity))
    lib.ingest([base], "base")
    stored = lib.ingest([model], "model").stored_bytes
    shutil.rmtree(path)
    return stored


def quantized_xor(paths: dict[str, str], qtype: str) -> tuple[int, int, int, int]:
    """(changed tensors, their raw bytes, zstd-1 plain, zstd-1 of XOR with the base)."""
    z = zstandard.ZstdCompressor(level=1)
    base = ex.quantized_blocks(paths["base"])
    n = raw = plain = xor = 0
    for name, p in paths.items():
        if name == "base":
            continue
        for tname, (kind, data) in ex.quantized_blocks(p).items():
            ref = base[tname][1]
            if kind != qtype or np.array_equal(data, ref):
                continue
            n += 1
            raw += data.size
            plain += len(z.compress(data.tobytes()))
            xor += len(z.compress(np.bitwise_xor(data, ref).tobytes()))
    return n, raw, plain, xor


# Bytes of scales, mins and super-block scales per K-quant block (ggml-common.h).
K_SCALE_BYTES = {"Q2_K": 20, "Q3_K": 14, "Q4_K": 16, "Q5_K": 16, "Q6_K": 18}


def scale_bytes(path: str) -> int:
    """Bytes of the scale and min fields of a GGUF file's quantized blocks, or of an ONNX file's
    scales and zero points (a float32 and a byte each, per int8/uint8 weight or per channel):
    the ideal the issue names, a file costing its scales only."""
    from haagenti.codecs.predict import BLOCK_BYTES, LEGACY

    if path.endswith(".onnx"):
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
        dims = {i.name: i.dims for i in graph.initializer}
        weights = [i.name for i in graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(i.dims)]
        return 5 * sum(int(np.prod(dims.get(w.removesuffix("_quantized") + "_zero_point", []))) for w in weights)  # quantize_dynamic's names

    per_block = {n: 2 * t.fields for n, t in LEGACY.items()} | K_SCALE_BYTES
    return sum(data.size // BLOCK_BYTES[kind] * per_block[kind] for kind, data in ex.quantized_blocks(path).values() if kind in per_block)


# A Q4_K_M-like mix: Q6_K for the value projections and the feed-forward's down projection,
# Q4_K for the other matrices (llama.cpp's Q4_K_M gives Q6_K to attn_v and half of ffn_down).
K_STEPS = {"Q4_K_Mlike": lambda name: "Q6_K" if "v_proj" in name or "mlp.2" in name else "Q4_K",
           "Q2_K": lambda name: "Q2_K", "Q4_K": lambda name: "Q4_K", "Q6_K": lambda name: "Q6_K"}


def kquant_gguf(model: str, material: str, path: str, pick) -> str:
    """The example model as a GGUF whose matrices hold the K-quant blocks of `material`
    (bench/kquant_material.py --tensors: ggml's quantizer over its F16 values), type by `pick`
    of the tensor name; the other tensors F32, as llama.cpp keeps them."""
    import gguf

    blocks = np.load(material)
    w = gguf.GGUFWriter(path, arch="digits")
    for name, t in ex.state_of(ex.load_example(model), torch.float16).items():
        key = f"{pick(name)}/{name}"
        if key in blocks.files:
            w.add_tensor(name, blocks[key], raw_dtype=gguf.GGMLQuantizationType[pick(name)])
        else:
            w.add_tensor(name, t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def alone(fn, path: str, root: str) -> int:
    work = tempfile.mkdtemp(dir=root)
    try:
        return fn(path, work)[0]
    finally:
        shutil.rmtree(work)


def ladder(families: list[str], root: str, kquants: dict[str, str]) -> None:
    print("4. quantization ladder: the GGUF F16 stored first, then each step; % of the step's size "
          "(added on disk by haagenti / scale fields alone / the file alone through zstd -19, ZipNN, glyd)")
    print(f"{'base':8s} {'step':10s} {'size MB':>8s} {'added KB':>9s} {'added %':>8s} {'scales %':>9s} {'zstd-19 %':>10s} {'ZipNN %':>8s} {'glyd %':>7s} {'ingest s':>9s}")
    for fam in families:
        model = example_family(fam)[0].file
        files = ex.export_ladder(model, os.path.join(root, f"ladder-{fam}"))
        if fam in kquants:
            files += [kquant_gguf(model, kquants[fam], os.path.join(root, f"ladder-{fam}", f"k-{step}.gguf"), pick) for step, pick in K_STEPS.items()]
        onnx = ex.export_onnx_ladder(model, os.path.join(root, f"ladder-{fam}"))
        lib = FragmentLibrary.open(os.path.join(root, f"ladder-lib-{fam}"))
        raw = ingest_steps(lib, fam, files, root)
        s = lib.stats()
        print(f"{fam:8s} ladder     {raw / 1e6:8.2f} MB -> {s.disk_bytes / 1e6:.2f} MB on disk: {1 - s.disk_bytes / raw:.1%} saved "
              f"({s.predicted_fragments} of {s.fragments} fragments predicted)", flush=True)
        # ONNX int8/uint8 (quantize_dynamic of the fp32 ONNX export): after the F16 GGUF alone
        # (an fp16 source), and after the fp32 ONNX file they were made from
        ingest_steps(FragmentLibrary.open(os.path.join(root, f"onnx-f16-lib-{fam}")), fam, files[:1] + onnx[1:], root)
        ingest_steps(FragmentLibrary.open(os.path.join(root, f"onnx-f32-lib-{fam}")), fam, onnx, root)


def ingest_steps(lib: FragmentLibrary, fam: str, files: list[str], root: str) -> int:
    """Ingest `files` one model each, in order, printing what each adds on disk; their bytes."""
    before, raw = 0, 0
    for path in files:
        step = os.path.basename(path).rpartition(".")[0].rpartition("-")[2] + (".onnx" if path.endswith(".onnx") else "")
        n = size(path)
        t = time.perf_counter()
        lib.ingest([path], step)
        took = time.perf_counter() - t
        disk = lib.stats().disk_bytes
        raw += n
        # ZipNN's float16 mode corrupts the heap on a file of an odd size (an ONNX file may be one): n/a there
        zipnn = (lambda p, w: zipnn_file(p, w, "float16")) if n % 2 == 0 else None
        others = [alone(fn, path, root) / n if fn else None for fn in (lambda p, w: zstd_file(p, w, 19), zipnn, glyd_file)]
        print(f"{fam:8s} {step:10s} {n / 1e6:8.2f} {(disk - before) / 1e3:9.1f} {(disk - before) / n:8.2%} {scale_bytes(path) / n:9.2%} "
              + " ".join(f"{o:{w}.2%}" if o is not None else f"{'n/a':>{w}s}" for o, w in zip(others, (10, 8, 7))) + f" {took:9.2f}", flush=True)
        before = disk
    return raw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ladder", action="store_true", help="section 4 only: quantization ladders")
    ap.add_argument("--families", default="family,large1", help="--ladder: the bases (bench/common.py)")
    ap.add_argument("--kquants", default="", help="--ladder: FAMILY=MATERIAL.npz,... (bench/kquant_material.py --tensors) "
                    "adds K-quant steps (Q4_K_M-like mix, Q2_K, Q4_K, Q6_K) after the legacy ones")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.ladder:
        root = tempfile.mkdtemp(prefix="haagenti-ladder-", dir=CACHE)
        try:
            ladder(args.families.split(","), root, dict(kv.split("=", 1) for kv in args.kquants.split(",") if kv))
        finally:
            shutil.rmtree(root)
        return
    members = {m.model_id: m.file for m in example_family()}
    root = tempfile.mkdtemp(prefix="haagenti-formats-", dir=CACHE)
    try:
        base = ex.load_example(members["digits-base"])
        f32, bf16 = ex.state_of(base, torch.float32), ex.state_of(base, torch.bfloat16)
        p = {"safetensors BF16": members["digits-base"]}
        save_file(f32, os.path.join(root, "f32.safetensors"))
        for q in ("F16", "BF16", "F32", "Q8_0"):
            p[f"GGUF {q}"] = os.path.join(root, f"base-{q}.gguf")
            ex.export_gguf(f32, p[f"GGUF {q}"], q)
        p["GGUF F16 split"] = os.path.join(root, "split")
        ex.export_gguf(f32, os.path.join(root, "split", "base.gguf"), "F16", split_max_tensors=len(f32) // 4 + 1)
        p["ONNX"] = os.path.join(root, "base.onnx")
        ex.export_onnx(base, p["ONNX"])
        p["ONNX external data"] = os.path.join(root, "onnx-ext")
        os.makedirs(p["ONNX external data"])
        ex.export_onnx(base, os.path.join(p["ONNX external data"], "model.onnx"), external_data=True)
        p["HF folder, 1 shard"], p["HF folder, 4+ shards"] = os.path.join(root, "hf-1"), os.path.join(root, "hf-4")
        ex.save_hf_folder(bf16, p["HF folder, 1 shard"], shards=1)
        ex.save_hf_folder(bf16, p["HF folder, 4+ shards"], shards=4)
        work = os.path.join(root, "libs")
        os.makedirs(work)

        print("1. cross-format: the BF16 safetensors model stored first, then one export of it")
        print(f"{'export':22s} {'size MB':>8s} {'added KB':>9s} {'added %':>8s} {'zstd-3 alone %':>15s} {'ingest s min/med/max':>22s}")
        for kind in ("GGUF F16", "GGUF BF16", "GGUF F32", "GGUF Q8_0", "ONNX", "ONNX external data"):
            raw, add, times = pair_cost(work, p["safetensors BF16"], p[kind], args.runs)
            print(f"{kind:22s} {raw / 1e6:8.2f} {add / 1e3:9.1f} {add / raw:8.2%} {zstd3(p[kind]) / raw:15.1%} "
                  f"{min(times):7.2f}/{statistics.median(times):.2f}/{max(times):.2f}")

        print("\n2. reshard: the first layout stored, then the second")
        print(f"{'first -> second':44s} {'size MB':>8s} {'added KB':>9s} {'added %':>8s}")
        for a, b in (("HF folder, 1 shard", "HF folder, 4+ shards"), ("GGUF F16", "GGUF F16 split"), ("ONNX", "ONNX external data")):
            raw, add, _ = pair_cost(work, p[a], p[b], 1)
            print(f"{a + ' -> ' + b:44s} {raw / 1e6:8.2f} {add / 1e3:9.1f} {add / raw:8.2%}")

        print("\n3. quantized fine-tunes after their base: stored with deltas / without, and the XOR oracle on changed tensors")
        print(f"{'type':6s} {'model':20s} {'size MB':>8s} {'deltas %':>9s} {'plain %':>8s} {'changed MB':>11s} {'zstd-1 %':>9s} {'XOR+zstd-1 %':>13s}")
        for q in ("Q8_0", "Q4_0"):
            qp = {}
            for mid in ("digits-base", "digits-ft-lr1e-4", "digits-ft-lr1e-3", "digits-ft-partial", "digits-lora-merged"):
                qp[mid] = os.path.join(root, f"{mid}-{q}.gguf")
                ex.export_gguf(ex.state_of(ex.load_example(members[mid]), torch.float32), qp[mid], q)
            for mid in list(qp)[1:]:
                raw = size(qp[mid])
                with_d, without = (stored_after_base(work, qp["digits-base"], qp[mid], s) for s in (True, False))
                _, changed, plain, xor = quantized_xor({"base": qp["digits-base"], mid: qp[mid]}, q)
                print(f"{q:6s} {mid:20s} {raw / 1e6:8.2f} {with_d / raw:9.1%} {without / raw:8.1%} {changed / 1e6:11.2f} {plain / changed:9.1%} {xor / changed:13.1%}")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
