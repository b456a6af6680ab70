import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from haagenti.signature import SignatureConfig, compute_signatures, hamming
from haagenti.matching import signature_bands
from haagenti.similarity import MatchType, SimilarityThreshold, measure


def frag(t: torch.Tensor) -> tuple[bytes, str]:
    name = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[t.dtype]
    return t.contiguous().view(torch.uint8).numpy().tobytes(), name


def test_signatures_track_cosine_similarity():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1 << 16, generator=g)
    near = base + 0.05 * torch.randn(1 << 16, generator=g)
    other = torch.randn(1 << 16, generator=g)
    s_base, s_near, s_other, s_cast = compute_signatures([frag(base.bfloat16()), frag(near.bfloat16()), frag(other.bfloat16()), frag(base.half())])
    bits = SignatureConfig().bits
    assert hamming(s_base.bits, s_near.bits) < 0.1 * bits
    assert hamming(s_base.bits, s_cast.bits) < 0.05 * bits  # an fp16 re-export signs like its bf16 base
    assert 0.35 * bits < hamming(s_base.bits, s_other.bits) < 0.65 * bits
    assert abs(s_base.mean - float(base.mean())) < 0.02 and abs(s_base.std - float(base.std())) < 0.02
    # 65,536 elements are signed on a stride-4 sample; min and max are exact over all of them.
    assert sum(s_base.histogram) == SignatureConfig().sample == (1 << 16) // 4
    b16 = base.bfloat16().float()
    assert (s_base.min, s_base.max, s_base.scale) == (float(b16.min()), float(b16.max()), float(b16.abs().max()))


def test_nonfinite_values_are_counted_and_ignored():
    t = torch.randn(4096)
    t[::7] = float("nan")
    t[1] = float("inf")
    [s] = compute_signatures([frag(t)])
    assert s.nonfinite == len(range(0, 4096, 7)) + 1
    assert np.isfinite([s.mean, s.std, s.min, s.max]).all()


SCRIPT = """
import sys, torch
from haagenti.signature import compute_signatures
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(3)
frags = [(torch.randn(n, generator=g).to(dt).view(torch.uint8).numpy().tobytes(), name)
         for n, dt, name in [(65536, torch.bfloat16, "BF16"), (32768, torch.float32, "F32"), (1000, torch.float16, "F16")]]
print(",".join(s.bits.hex() + repr((s.mean, s.std, s.histogram)) for s in compute_signatures(frags)))
"""


def test_signatures_bit_identical_across_processes_and_thread_counts():
    outs = {subprocess.run([sys.executable, "-c", SCRIPT, str(n)], capture_output=True, text=True, check=True).stdout for n in (1, 2)}
    assert len(outs) == 1 and len(next(iter(outs))) > 100


def golden_fragments() -> list[tuple[bytes, str]]:
    """Fixed inputs from numpy's legacy RandomState, whose stream numpy keeps frozen across versions."""
    rs = np.random.RandomState(20261123)
    out = []
    for n, dt, name in [(131072, torch.bfloat16, "BF16"), (65536, torch.float32, "F32"), (1000, torch.float16, "F16"), (4096, torch.float64, "F64"), (77, torch.float8_e4m3fn, "F8_E4M3")]:
        out.append((torch.from_numpy(rs.standard_normal(n)).to(dt).view(torch.uint8).numpy().tobytes(), name))
    for n in (100_000, 2048):  # NaN/Inf in a sampled fragment and in a small one
        v = torch.from_numpy(rs.standard_normal(n)).to(torch.bfloat16)
        v[::97] = float("nan")
        v[5] = float("inf")
        out.append((v.view(torch.uint8).numpy().tobytes(), "BF16"))
    return out * 3  # repeated fragments share a batch


# Recorded on CPU (torch 2.13) for format 2. A change here changes every stored signature: bump the format.
GOLDEN_SIGNATURES = "3892f79a0d66e406754fc26220bdeebe518866ca4cb42402f0e75e3f783927c0"


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_signatures_equal_recorded_values_on_every_device(device):
    """A signature computed on a GPU actor today must equal one computed on a CPU tomorrow."""
    sigs = compute_signatures(golden_fragments(), device=device)
    fields = [(s.bits.hex(), s.scale, s.mean, s.std, s.min, s.max, s.nonfinite, s.histogram) for s in sigs]
    assert sigs[-1].nonfinite == 23 and sum(sigs[-1].histogram) == 2048 - 23  # NaN/Inf: counted apart, not binned
    assert hashlib.sha256(repr(fields).encode()).hexdigest() == GOLDEN_SIGNATURES


def _torch_kernel(frags: list[tuple[bytes, str]]):
    """The torch kernel that GPUs run, here on the CPU, one fragment per batch."""
    from haagenti.formats.dtypes import dtype
    from haagenti.signature import _signature_batch

    out = []
    for data, name in frags:
        t = torch.frombuffer(bytearray(data), dtype=dtype(name).torch_dtype) if data else torch.zeros(0)
        out += _signature_batch(t.reshape(1, -1), SignatureConfig())
    return out


def test_cpu_kernel_equals_torch_kernel_on_the_example_family(family):
    """The numpy kernel (CPU) and the torch kernel (GPU) give the same signatures, bit for bit,
    on every fragment of the trained family and on the recorded inputs (NaN/Inf, fp8, f64)."""
    from haagenti.formats import open_model
    from haagenti.ingest import ModelCut, ModelInput
    from haagenti.ingest_steps import signs

    frags = list(golden_fragments())
    for m in family:
        with open_model([m.file]) as src:
            frags += [(o.piece.data, o.piece.dtype) for o in ModelCut(ModelInput([m.file], m.model_id), src, 131072) if signs(o.piece)]
    assert len(frags) > 100
    assert compute_signatures(frags) == _torch_kernel(frags)


def test_fragment_of_denormals_and_zeros_is_signed():
    """A fragment whose max |value| is below ~3.7e-37 made levels / scale overflow float32: the
    quantised values became NaN and bincount failed. Such values are now lifted by 2**100 first."""
    z = np.zeros(1000, np.float32)
    z[3] = np.float32(1e-40)
    frags = [(z.tobytes(), "F32"), (np.array([0, 1, 0, 0x8001], np.uint16).tobytes(), "BF16"), (np.float32([3e-37, -1e-38]).tobytes(), "F32")]
    sigs = compute_signatures(frags)
    assert sigs == _torch_kernel(frags)
    assert sigs[0].histogram[-1] == 1 and sum(sigs[0].histogram) == 1000 and sigs[0].scale == float(z[3])
    assert sigs[1].histogram[0] == 1 and sigs[1].histogram[-1] == 1 and sigs[1].mean == 0.0


@pytest.mark.parametrize("name", ["BF16", "F16"])
def test_16_bit_bounds_from_words_equal_float_min_max(name):
    """BF16/F16 fragments take min and max from integer reductions over their words (only the
    sample is converted): equal to the float min/max on any mix of finite patterns, signs and
    subnormals; NaN/Inf and zero bounds go the float way; both kernels agree."""
    from haagenti.formats.dtypes import dtype
    from haagenti.signature import _bounds16

    rs = np.random.RandomState(7)
    t = dtype(name).torch_dtype
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(t).float().numpy()
    finite = np.flatnonzero(np.isfinite(every)).astype(np.uint16)
    positive, negative = finite[finite < 0x8000], finite[finite >= 0x8000]
    pools = [finite, positive[positive > 0], negative[negative > 0x8000], finite[(finite & 0x7FFF) < 0x400]]
    frags = []
    for pool in pools:
        for n in (1, 2, 7, 5000, 131072):
            frags.append(rs.choice(pool, n).astype(np.uint16).tobytes())
    frags += [np.array(w, np.uint16).tobytes() for w in ([0, 0x8000, 5], [0x8000, 0x8001], [0x3F80, 0, 0x8000], [0x8001, 0x7C00], [0xFFFF, 1])]
    for data in frags:
        x = torch.frombuffer(bytearray(data), dtype=t).float().numpy()
        got = _bounds16(data, name, len(x))
        if not np.isfinite(x).all() or x.min() == 0 or x.max() == 0:
            assert got is None
        else:
            assert got == (float(x.min()), float(x.max()))
    signed = [(d, name) for d in frags]
    assert compute_signatures(signed) == _torch_kernel(signed)


def test_signature_batch_equals_one_by_one():
    g = torch.Generator().manual_seed(5)
    frags = [frag(torch.randn(8192, generator=g).bfloat16()) for _ in range(5)]
    assert compute_signatures(frags) == [compute_signatures([f])[0] for f in frags]


def _sig(t):
    return compute_signatures([frag(t)])[0].bits


def test_index_insert_query_remove_merge_and_persist(monkeypatch):
    """bench/lsh_baseline.py's in-memory LSH, the baseline bench/similarity.py measures against."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("lsh_baseline", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "lsh_baseline.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "lsh_baseline", module)
    spec.loader.exec_module(module)
    SimilarityIndex = module.SimilarityIndex
    g = torch.Generator().manual_seed(1)
    bases = [torch.randn(16384, generator=g) for _ in range(20)]
    a, b = SimilarityIndex(), SimilarityIndex()
    for i, t in enumerate(bases):
        (a if i % 2 else b).insert(f"f{i:02d}", _sig(t), 16384)
    a.merge(b)
    assert len(a) == 20
    probe = _sig(bases[7] + 0.02 * torch.randn(16384, generator=g))
    assert a.query(probe, k=1)[0][0] == "f07"
    assert a.query(probe, k=3, n_elements=99) == []
    a.remove("f07")
    assert all(fid != "f07" for fid, _ in a.query(probe, k=5))
    back = SimilarityIndex.from_table(a.to_table())
    assert back.bits == a.bits
    bands = a.band_rows()
    assert bands.num_rows == 19 * SignatureConfig().bands
    assert set(bands.column_names) == {"band", "band_hash", "fragment_id"}


def test_band_rows_group_candidates_like_the_index():
    cfg = SignatureConfig()
    g = torch.Generator().manual_seed(2)
    t = torch.randn(16384, generator=g)
    ids, bits = ["x", "y"], [_sig(t), _sig(t + 0.01 * torch.randn(16384, generator=g))]
    rows = signature_bands(ids, bits, cfg).to_pylist()
    shared = {(r["band"], r["band_hash"]) for r in rows if r["fragment_id"] == "x"} & {(r["band"], r["band_hash"]) for r in rows if r["fragment_id"] == "y"}
    assert shared  # the near pair meets in at least one band


def test_thresholds_classify_measured_quantities():
    th = SimilarityThreshold()
    a = np.random.default_rng(0).standard_normal(1000)
    cos, rel, mx = measure(a, a + 0.01 * np.random.default_rng(1).standard_normal(1000))
    assert th.classify(cos) is MatchType.NEAR_DUPLICATE and rel < 0.02 and mx < 0.05
    assert th.classify(1.0, identical=True) is MatchType.EXACT
    assert th.classify(0.93) is MatchType.SIMILAR and th.classify(0.2) is MatchType.UNRELATED


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_blocks_signed_on_their_sample_alone_get_the_same_signatures(qtype):
    """The CPU kernel takes legacy blocks' bounds from their extreme codes and dequantizes only
    the sample: the same signatures, bit for bit, as over gguf's whole dequantization, for
    gguf's blocks, scales of both signs and zero, a fragment shorter than the sample, and
    (the full path) scales that are NaN or Inf."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    from haagenti.formats.dtypes import SignatureSample, dtype, signable

    config, d = SignatureConfig(), dtype(qtype)
    rng = np.random.default_rng(5)
    values = (rng.standard_t(4, (512, 256)) * 0.02).astype(np.float32)
    blocks = np.frombuffer(quantize(values, GGMLQuantizationType[qtype]).tobytes(), np.uint8).reshape(-1, GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1])
    signs = blocks.copy()
    signs[:, 1] ^= (rng.integers(0, 2, len(signs)) << 7).astype(np.uint8)  # the scale's sign bit
    signs[::5, :2] = 0
    nonfinite = blocks.copy()
    nonfinite[3, :2] = np.array([np.nan], np.float16).view(np.uint8)
    nonfinite[9, :2] = np.array([np.inf], np.float16).view(np.uint8)
    cases = [blocks.tobytes(), signs.tobytes(), blocks[:100].tobytes(), nonfinite.tobytes()]
    fast = [signable(c, d, config.sample) for c in cases]
    assert [isinstance(f[0], SignatureSample) for f in fast] == [True, True, True, False]
    assert compute_signatures(fast, config) == compute_signatures([signable(c, d) for c in cases], config)
