import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import zstandard

from haagenti.codecs import DENSE, PLANES, ByteGroup, RotateLeft, Zstd, apply_delta, cast_reference, chain_for, codec_chain, smallest_encoding
from haagenti.codecs.core import BLOCK_FIELDS, block_planes
from haagenti.codecs.rans import QUANTIZED_FIELDS
from haagenti.codecs.delta import residual
from haagenti.errors import FragmentError
from haagenti.fragment import Encoding, FragmentType


@pytest.mark.parametrize("width", [2, 4, 8])
def test_byte_group_round_trip_and_layout(width):
    data = os.urandom(width * 1000)
    enc = ByteGroup(width).encode(data)
    assert ByteGroup(width).decode(enc, len(data)) == data
    assert enc[:1000] == data[0::width]  # plane 0 holds every word's first byte


@pytest.mark.parametrize("width,bits", [(2, 1), (2, 3), (2, 15), (4, 1), (4, 3), (8, 1), (8, 63)])
def test_rotate_left_round_trip_and_layout(width, bits):
    data = os.urandom(width * 1000)
    enc = bytes(RotateLeft(width, bits).encode(data))
    assert bytes(RotateLeft(width, bits).decode(enc, len(data))) == data
    words = np.frombuffer(data, f"<u{width}").astype(np.uint64)
    size = 8 * width
    mask = (1 << size) - 1 if size < 64 else np.uint64(2**64 - 1)
    expected = ((words << np.uint64(bits)) | (words >> np.uint64(size - bits))) & np.uint64(mask)
    assert np.array_equal(np.frombuffer(enc, f"<u{width}"), expected)


@pytest.mark.parametrize("spec", ["rotl:2:0", "rotl:2:16", "rotl:3:1", "rotl:2", "rotl:2:1:1", "rotl:x:1"])
def test_rotate_left_refuses_bad_specs(spec):
    with pytest.raises(Exception, match="unknown codec"):
        codec_chain(spec)


def test_format_4_sign_last_rows_still_decode():
    """Rows written as signlast:W (format 4 before the rotation became per dtype) decode as
    rotl:W:1, which is the same transform."""
    data = (torch.randn(1 << 14) * 0.02).bfloat16().view(torch.uint8).numpy().tobytes()
    new = codec_chain("rotl:2:1+bytegroup:2+zstd:planes:2")
    assert codec_chain("signlast:2+bytegroup:2+zstd:planes:2").decode(new.encode(data), len(data)) == data


def test_chains_reuse_their_buffers_and_never_hand_them_out():
    """Intermediate stages write into buffers the (per-thread) chain reuses; what a chain returns
    is its own: a second encode must not change the first one's result."""
    chain = codec_chain("rotl:2:3+bytegroup:2")
    a, b = os.urandom(4096), os.urandom(4096)
    ea = chain.encode(a)
    eb = chain.encode(b)
    assert chain.decode(ea, len(a)) == a and chain.decode(eb, len(b)) == b


@pytest.mark.parametrize("width", [2, 4, 8])
def test_a_float_chain_decodes_its_planes_into_words_as_each_codec_does_alone(width):
    """A float chain joins zstd's streams into words and rotates them back in place; the same
    bytes come out as from each codec's own decode, and the stored blob is left as it was."""
    data = (torch.randn(1 << 12) * 0.02).to({2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[width]).view(torch.uint8).numpy().tobytes()
    rotl, group, zstd = RotateLeft(width, 3), ByteGroup(width), Zstd(PLANES, width)
    blob = bytearray(codec_chain(f"rotl:{width}:3+bytegroup:{width}+zstd:planes:{width}").encode(data))
    kept = bytes(blob)
    one_by_one = rotl.decode(group.decode(zstd.decode(blob, len(data)), len(data)), len(data))
    assert bytes(codec_chain(f"rotl:{width}:3+bytegroup:{width}+zstd:planes:{width}").decode(blob, len(data))) == bytes(one_by_one) == data
    assert bytes(blob) == kept


def test_byte_planes_of_unequal_lengths_are_refused_as_damage():
    """Streams a stored row claims as byte planes but of different lengths (one compressed,
    one raw here) are damage, not joined into words."""
    a = zstandard.ZstdCompressor().compress(bytes(1000))
    raw = os.urandom(998)
    blob = struct.pack("<BI", 1, len(a)) + struct.pack("<BI", 0, len(raw)) + a + raw
    with pytest.raises(FragmentError, match="byte planes"):
        codec_chain("bytegroup:2+zstd:planes:2").decode(blob, 4000)


def test_format_3_chains_still_decode():
    """Rows written by format 3 (no rotation) decode with today's registry."""
    data = (torch.randn(1 << 14) * 0.02).bfloat16().view(torch.uint8).numpy().tobytes()
    old = codec_chain("bytegroup:2+zstd:planes:2")
    assert codec_chain(old.spec).decode(old.encode(data), len(data)) == data


@pytest.mark.parametrize("name,torch_dtype", [("BF16", torch.bfloat16), ("F16", torch.float16), ("F32", torch.float32)])
def test_each_dtypes_rotation_makes_plain_float_fragments_smaller(name, torch_dtype):
    """The dtype's rotated planes against unrotated and sign-last ones on trained-like values
    (heavy tails, rows of different scale): bf16 and fp32 rotate by 3, fp16 by 1."""
    rng = np.random.default_rng(0)
    x = rng.standard_t(5, (256, 512)) * 0.02 * np.exp(0.3 * rng.standard_normal((256, 1)))
    data = _bits(torch.from_numpy(x.astype(np.float32)).to(torch_dtype))
    w = torch_dtype.itemsize
    chain = chain_for(name)
    assert chain.spec == f"rotl:{w}:{3 if name != 'F16' else 1}+bytegroup:{w}+zstd:planes:{w}"
    assert len(chain.encode(data)) < len(codec_chain(f"bytegroup:{w}+zstd:planes:{w}").encode(data))
    if name != "F16":
        assert len(chain.encode(data)) < len(codec_chain(f"rotl:{w}:1+bytegroup:{w}+zstd:planes:{w}").encode(data))


def test_zstd_streams_store_incompressible_parts_raw():
    noise, zeros = os.urandom(1 << 18), bytes(1 << 18)
    z = Zstd(3, streams=2)
    enc = z.encode(noise + zeros)
    assert z.decode(enc, 2 << 18) == noise + zeros
    assert len(enc) < len(noise) + 1000  # the zero stream compressed, the noise kept raw


def test_zstd_tries_every_part_whole():
    """A part whose start looks incompressible is still coded when the whole part shrinks (a
    16 KiB probe of its start used to store it raw)."""
    part = os.urandom(1 << 14) + bytes(7 << 14)
    z = Zstd(PLANES, streams=2)
    enc = z.encode(part + part)
    assert len(enc) < (1 << 15) + 1000
    assert z.decode(enc, 1 << 18) == part + part


@pytest.mark.parametrize("level,spec", [(None, "rotl:2:3+bytegroup:2+zstd:planes:2"), (3, "rotl:2:3+bytegroup:2+zstd:3:2")])
def test_chain_spec_round_trips(level, spec):
    chain = chain_for("BF16") if level is None else chain_for("BF16", level)
    assert chain.spec == spec
    data = torch.randn(5000).bfloat16().view(torch.uint8).numpy().tobytes()
    assert codec_chain(chain.spec).decode(chain.encode(data), len(data)) == data
    with pytest.raises(Exception, match="unknown codec"):
        codec_chain("lz4:1")


def test_byte_grouping_beats_plain_zstd_on_bf16():
    data = (torch.randn(1 << 17) * 0.02).bfloat16().view(torch.uint8).numpy().tobytes()
    assert len(chain_for("BF16").encode(data)) < len(codec_chain("zstd:3").encode(data))


def test_planes_preset_is_no_larger_than_level_1_on_exponent_planes():
    data = (torch.randn(1 << 17, generator=torch.Generator().manual_seed(1)) * 0.02).bfloat16().view(torch.uint8).numpy().tobytes()
    assert len(chain_for("BF16").encode(data)) <= len(chain_for("BF16", 1).encode(data))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_deltas_are_exact_and_small_for_fine_tunes(dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1 << 15, generator=g) * 0.05
    tuned = base + 1e-4 * torch.randn(1 << 15, generator=g)
    ref = base.to(dtype).view(torch.uint8).numpy().tobytes()
    raw = tuned.to(dtype).view(torch.uint8).numpy().tobytes()
    name = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    enc, i, spec, blob = smallest_encoding(raw, [ref], name)
    assert enc is not Encoding.PLAIN and i == 0
    res = codec_chain(spec).decode(blob, len(raw))
    assert apply_delta(enc, res, ref, tuned.to(dtype).element_size()) == raw
    assert len(blob) < len(chain_for(name).encode(raw))
    for e in (Encoding.DELTA_XOR, Encoding.DELTA_SUB):
        assert apply_delta(e, residual(e, raw, ref, 2 if name != "F32" else 4), ref, 2 if name != "F32" else 4) == raw


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@pytest.mark.parametrize("src,dst", [(s, d) for s in ("BF16", "F16") for d in ("BF16", "F16", "F32") if s != d])
def test_numpy_casts_equal_torch_on_every_16_bit_pattern(src, dst):
    """Every bf16/fp16 pattern (NaN payloads, signed zeros, subnormals, Inf, ties) casts to the
    bits torch gives, without torch."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).tobytes()
    assert cast_reference(every, src, dst) == _bits(torch.frombuffer(bytearray(every), dtype=_TORCH[src]).to(_TORCH[dst]))


@pytest.mark.parametrize("dst", ["BF16", "F16"])
def test_numpy_casts_from_f32_equal_torch_on_ties_nans_and_edges(dst):
    """F32 to 16 bits: each 16-bit pattern with every interesting low half (exact, ties to even
    either way, just above/below a tie, all ones), NaN payloads in both halves, overflow near the
    top, subnormals, and a million random patterns."""
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1000, 0x2000, 0x0FFF, 0x1FFF], np.uint32)
    patterns = [(hi[:, None] | lows[None, :]).ravel(), np.random.default_rng(0).integers(0, 1 << 32, 1 << 20, dtype=np.uint32)]
    for f16_low in (0x0FFF, 0x1000, 0x1001, 0x3000, 0x2FFF):  # ties of the f32 -> f16 rounding (13 dropped bits)
        patterns.append(hi | f16_low)
    for u in patterns:
        raw = u.tobytes()
        assert cast_reference(raw, "F32", dst) == _bits(torch.frombuffer(bytearray(raw), dtype=torch.float32).to(_TORCH[dst]))


def test_restoring_a_cross_dtype_delta_model_does_not_import_torch(tmp_path):
    """A model stored as fp16 deltas against its bf16 base restores in a process that never
    imports torch (the import alone cost more than restoring a small model), nor pandas
    (pyarrow imports it on a process's first pa.array()/pa.table()/to_numpy() to ask whether
    it got a DataFrame: 0.15-0.4 s of a cold first restore or load; the read path builds its
    Arrow arrays from buffers)."""
    from haagenti.library import FragmentLibrary
    from safetensors.numpy import save_file

    base = (np.random.default_rng(0).standard_normal((256, 1024)) * 0.02).astype(np.float32)
    bf16 = torch.from_numpy(base).bfloat16()
    torch_save = {"w": bf16}
    from safetensors.torch import save_file as save_torch

    save_torch(torch_save, tmp_path / "base.safetensors")
    save_file({"w": bf16.to(torch.float16).numpy()}, tmp_path / "fp16.safetensors")
    lib = FragmentLibrary.open(str(tmp_path / "lib"))
    lib.ingest([str(tmp_path / "base.safetensors")], "base")
    lib.ingest([str(tmp_path / "fp16.safetensors")], "fp16")
    rows = lib.store.read("fragments", columns=["encoding", "ref_dtype"]).to_pylist()
    assert any(r["ref_dtype"] == "BF16" and r["encoding"] != "plain" for r in rows)  # really a cross-dtype delta
    script = (
        "import sys; from haagenti.library import FragmentLibrary; "
        f"FragmentLibrary.open({str(tmp_path / 'lib')!r}).restore('fp16', {str(tmp_path / 'out')!r}); "
        "print('torch' in sys.modules, 'pandas' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False False"
    assert (tmp_path / "out" / "fp16.safetensors").read_bytes() == (tmp_path / "fp16.safetensors").read_bytes()


def test_fragment_type_inference():
    assert FragmentType.infer("model.layers.0.self_attn.q_proj.weight") is FragmentType.ATTENTION_Q
    assert FragmentType.infer("layers.1.k_proj.bias") is FragmentType.ATTENTION_K
    assert FragmentType.infer("transformer.h.0.attn.c_attn.weight") is FragmentType.ATTENTION_QKV
    assert FragmentType.infer("layers.0.mlp.0.weight") is FragmentType.FEED_FORWARD
    assert FragmentType.infer("layers.0.norm1.weight") is FragmentType.NORM
    assert FragmentType.infer("embed.weight") is FragmentType.EMBEDDING
    assert FragmentType.infer("down.0.conv.weight") is FragmentType.CONV
    assert FragmentType.infer("head.weight") is FragmentType.GENERIC


def test_long_fragments_are_ranked_on_a_probe_and_stay_exact():
    # Long enough (4 x PROBE_WORDS words) for the probe path: the fine-tune's base must win over
    # an unrelated reference, and plain must win when only the unrelated one is offered.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1 << 17, generator=g) * 0.05
    tuned = (base + 1e-4 * torch.randn(1 << 17, generator=g)).bfloat16().view(torch.uint8).numpy().tobytes()
    unrelated = (torch.randn(1 << 17, generator=g) * 0.05).bfloat16().view(torch.uint8).numpy().tobytes()
    refs = [unrelated, base.bfloat16().view(torch.uint8).numpy().tobytes()]
    enc, i, spec, blob = smallest_encoding(tuned, refs, "BF16")
    assert i == 1 and enc is not Encoding.PLAIN
    assert apply_delta(enc, codec_chain(spec).decode(blob, len(tuned)), refs[1], 2) == tuned
    enc, i, spec, blob = smallest_encoding(tuned, refs[:1], "BF16")
    assert (enc, i) == (Encoding.PLAIN, None) and bytes(codec_chain(spec).decode(blob, len(tuned))) == tuned


# ---- quantized blocks ------------------------------------------------------------------------
def _quantized(qtype: str, blocks: int, seed: int = 0) -> bytes:
    """`blocks` blocks of gguf's own quantizer over a weight-like matrix (rows of 256 values)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    qt = GGMLQuantizationType[qtype]
    values = np.random.default_rng(seed).normal(0, 0.02, (-(-blocks * GGML_QUANT_SIZES[qt][0] // 256), 256)).astype(np.float32)
    values *= np.random.default_rng(seed + 1).uniform(0.2, 2, (len(values), 1)).astype(np.float32)  # rows of other scales
    return quantize(values, qt).tobytes()[: blocks * GGML_QUANT_SIZES[qt][1]]


WRITABLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0", "MXFP4"]  # what gguf's quantizers write


@pytest.mark.parametrize("qtype", WRITABLE)
def test_quantized_fragments_round_trip_through_their_block_planes(qtype):
    """Every type gguf writes, whole fragments, a short last fragment and lengths that end
    inside a block (bytes after the last whole block follow the planes unchanged)."""
    from haagenti.formats.dtypes import dtype

    chain, width = chain_for(qtype), dtype(qtype).itemsize
    assert chain.spec.startswith("blocks:")
    data = _quantized(qtype, 4096)
    for n in (len(data), 37 * width, width, 37 * width + 5, width - 1, 0):
        part = data[:n]
        assert bytes(chain.decode(chain.encode(part), n)) == part, n


@pytest.mark.parametrize("qtype", sorted(BLOCK_FIELDS))
def test_block_fields_cover_each_block_and_round_trip_any_bytes(qtype):
    """The table's fields add up to gguf's block size, and the split is a permutation of any
    bytes, K-quants (which gguf cannot write) included."""
    from haagenti.formats.dtypes import dtype

    width = dtype(qtype).itemsize
    assert sum(block_planes(qtype)) == width
    data = os.urandom(300 * width + 7)
    assert bytes(chain_for(qtype).decode(chain_for(qtype).encode(data), len(data))) == data


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_block_planes_beat_plain_zstd_on_quantized_weights(qtype):
    """Scales stop interleaving with codes: the planes code smaller than the zstd of the blocks
    (quantized fragments before) on weights quantized by gguf."""
    data = _quantized(qtype, 4096)
    assert len(chain_for(qtype).encode(data)) < 0.99 * len(codec_chain("zstd:1").encode(data))


def test_quantized_rows_written_before_block_planes_still_decode():
    data = _quantized("Q8_0", 512)
    assert bytes(codec_chain("zstd:1").decode(Zstd(1).encode(data), len(data))) == data


@pytest.mark.parametrize("spec", ["blocks:0.16", "blocks:2000", "blocks:", "blocks:1.x", "blocks:" + ".".join(["1"] * 65), "zstd:planes:1.0", "zstd:planes:1..2"])
def test_block_plane_specs_out_of_bounds_are_refused(spec):
    with pytest.raises(Exception, match="unknown codec"):
        codec_chain(spec)


def test_damaged_block_plane_blobs_are_refused():
    """A stored blob is untrusted: cut, bit-flipped or claiming more than its record, a
    quantized fragment is refused as damaged (never decoded to other bytes unnoticed)."""
    from haagenti.encode import decode_row
    from haagenti.errors import FragmentError
    from haagenti.hashing import content_hash

    data = _quantized("Q4_1", 1024)
    spec = chain_for("Q4_1").spec
    blob = codec_chain(spec).encode(data)
    row = {"fragment_id": content_hash(data), "encoding": Encoding.PLAIN.value, "raw_size": len(data), "codec": spec, "dtype": "Q4_1", "ref_id": None}
    assert decode_row({**row, "blob": blob}, None, None) == data
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x10
    bomb = Zstd(19, weights=(1, 1)).encode(bytes(1 << 24))
    for bad in (blob[: len(blob) // 2], bytes(flipped), blob[:3], bomb):
        with pytest.raises(FragmentError, match="damaged|failed verification|recorded"):
            decode_row({**row, "blob": bad}, None, None)


# ---- quantized blocks range-coded under models kept in the fragment ----------------------------
RANGE_CODED = sorted(QUANTIZED_FIELDS)


@pytest.mark.parametrize("coder", ["rans", "rans2"])
@pytest.mark.parametrize("qtype", RANGE_CODED)
def test_range_coded_blocks_round_trip_whatever_their_bytes(qtype, coder):
    """gguf's blocks, whole fragments and a short one, lengths that end inside a block, one
    block, none, constant blocks, and random bytes (scales of every sign, NaN and Inf), by
    both coders (format 9's range coder and format 10's table-driven rANS)."""
    from haagenti.formats.dtypes import dtype

    chain, width = codec_chain(f"{coder}:{QUANTIZED_FIELDS[qtype]}"), dtype(qtype).itemsize
    assert sum(int(f[1:]) for f in QUANTIZED_FIELDS[qtype].split(".")) == width
    data = _quantized(qtype, 4096)
    noise = os.urandom(300 * width + 3)
    for part in (data, data[: 37 * width], data[:width], data[: 37 * width + 5], data[: width - 1], b"", data[:width] * 50, noise):
        assert bytes(chain.decode(chain.encode(part), len(part))) == part, len(part)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "MXFP4"])
def test_range_coding_beats_the_planes_on_quantized_weights(qtype):
    """zstd stores these code planes raw (Huffman would save under its 1.6% bar): the range
    coder codes them, and the scales under a finer model, smaller (on these normal weights by
    0.2-1%; on real ones, docs/decisions/0350-quantized-range-coder.md)."""
    data = _quantized(qtype, 4096)
    assert len(codec_chain(f"rans2:{QUANTIZED_FIELDS[qtype]}").encode(data)) < len(chain_for(qtype).encode(data))


@pytest.mark.parametrize("stored", ["format9-rans", "format10-rans2"])
@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_stored_range_coded_rows_still_decode(qtype, stored):
    """Blobs as the release that wrote them (tests/data: format 9's `rans`, constriction; format
    10's `rans2`, 0380) decode to their blocks: a library keeps reading its rows after
    `haagenti upgrade`, and a change to a coder's words is caught here. And the model search
    chooses what it did then: the same blocks encode to the same blob."""
    blocks = {"Q4_1": 1024, "Q8_0": 512}[qtype]
    blob = open(os.path.join(os.path.dirname(__file__), "data", f"{stored}-{qtype}.bin"), "rb").read()
    data = _quantized(qtype, blocks)
    chain = codec_chain(f"{stored.split('-')[1]}:{QUANTIZED_FIELDS[qtype]}")
    assert bytes(chain.decode(blob, len(data))) == data
    assert chain.encode(data) == blob


def test_table_rans_is_within_a_fraction_of_the_range_coder():
    """The table-driven coder's 15-bit frequencies and flushed states cost a little against
    constriction's 24-bit range coder, under 0.5% of the blob on a whole fragment, and it
    never reads constriction."""
    data = _quantized("Q4_1", 4096)
    old, new = (len(codec_chain(f"{c}:{QUANTIZED_FIELDS['Q4_1']}").encode(data)) for c in ("rans", "rans2"))
    assert new < old * 1.005

def test_quantized_fragments_keep_the_smaller_of_the_range_coder_and_the_planes():
    """Under the dense preset plain quantized fragments try both chains (a long float fragment
    takes its dtype's chain only): Q4_1 weights take the range coder, blocks it cannot model
    (random bytes) the planes or raw, whichever is smaller. The default preset never range-codes
    (it restores ~2-3x faster)."""
    data = _quantized("Q4_1", 4096)
    enc, ref, spec, blob = smallest_encoding(data, [], "Q4_1", DENSE)
    assert (enc, ref, spec) == (Encoding.PLAIN, None, "rans2:s2.s2.n16")
    assert len(blob) == min(len(codec_chain(s).encode(data)) for s in (spec, chain_for("Q4_1").spec))
    assert chain_for("Q4_1", DENSE).spec == chain_for("Q4_1").spec
    assert smallest_encoding(data, [], "Q4_1")[2] == chain_for("Q4_1").spec
    tq = _quantized("TQ2_0", 1024)  # no range-coder model: the planes as before
    assert smallest_encoding(tq, [], "TQ2_0", DENSE)[2] == chain_for("TQ2_0").spec


def test_quantized_fragments_with_references_range_code_only_the_leader_and_plain(monkeypatch):
    """With references, the options (plain, XOR and SUB per reference) are ranked by their
    planes; the range coder, ~5x the planes' time, codes the leader and plain only, and the
    smallest of all is kept: a near copy's residual here."""
    from haagenti.codecs.rans import QuantizedBlocks

    data = _quantized("Q4_1", 4096)
    refs = [bytearray(data), bytes(_quantized("Q4_1", 4096, seed=9))]
    refs[0][100:140] = bytes(40)  # a near copy
    refs[0] = bytes(refs[0])
    calls = []
    real = QuantizedBlocks.encode
    monkeypatch.setattr(QuantizedBlocks, "encode", lambda self, body: calls.append(len(body)) or real(self, body))
    enc, ref, spec, blob = smallest_encoding(data, refs, "Q4_1", DENSE)
    assert len(calls) == 2 and (enc, ref) != (Encoding.PLAIN, None)
    planes = [len(chain_for("Q4_1").encode(b)) for b in (data, residual(Encoding.DELTA_XOR, data, refs[0], 20), residual(Encoding.DELTA_SUB, data, refs[0], 20))]
    assert len(blob) <= min(planes)


@pytest.mark.parametrize("spec", ["rans:", "rans:s4.n16", "rans:s2.q16", "rans:n16.s2", "rans:s2.x16", "rans:s2.b0", "rans:s2.b300", "rans:s2.n16:1", "rans:" + ".".join(["b1"] * 17), "rans2:", "rans2:s2.q16", "rans2:s2.n16:1", "rans3:s2.n16"])
def test_range_coder_specs_out_of_bounds_are_refused(spec):
    with pytest.raises(FragmentError, match="unknown codec"):
        codec_chain(spec)


def _with_models(blob: bytes, edit) -> bytes:
    """A range-coded blob whose models (zstd frame after the length) are passed through `edit`."""
    (size,) = struct.unpack_from("<I", blob)
    models = bytearray(zstandard.ZstdDecompressor().decompress(blob[4 : 4 + size]))
    edit(models)
    packed = zstandard.ZstdCompressor().compress(bytes(models))
    return struct.pack("<I", len(packed)) + packed + blob[4 + size :]


@pytest.mark.parametrize("coder", ["rans", "rans2"])
def test_damaged_range_coded_blobs_are_refused(coder):
    """Cut, bit-flipped, models that lie (more blocks than recorded, a shift or class count out
    of bounds, bytes left over) or words that are not whole: refused as damaged, never decoded
    to other bytes unnoticed."""
    from haagenti.encode import decode_row
    from haagenti.hashing import content_hash

    data = _quantized("Q4_1", 1024)
    spec = f"{coder}:" + QUANTIZED_FIELDS["Q4_1"]
    blob = codec_chain(spec).encode(data)
    row = {"fragment_id": content_hash(data), "encoding": Encoding.PLAIN.value, "raw_size": len(data), "codec": spec, "dtype": "Q4_1", "ref_id": None}
    assert decode_row({**row, "blob": blob}, None, None) == data
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x10

    def more_blocks(m: bytearray) -> None:
        m[0:4] = struct.pack("<I", 1 << 20)

    def shift_out_of_bounds(m: bytearray) -> None:
        m[11] = 13  # the first scale's shift: after blocks, the tail's length (no tail), its sign mode, relative flag and least

    lies = [_with_models(blob, edit) for edit in (more_blocks, shift_out_of_bounds, lambda m: m.extend(b"\0"), lambda m: m.__delitem__(slice(20, None)))]
    for bad in (blob[: len(blob) // 2], bytes(flipped), blob[:3], blob[:-1], b"\xff" * 8, *lies):
        with pytest.raises(FragmentError, match="damaged|failed verification"):
            decode_row({**row, "blob": bad}, None, None)


# ---- the table-driven rANS coder of `rans2` (haagenti/codecs/ans.py) ---------------------------
def _ans_round_trip(parts: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    from haagenti.codecs.ans import Decoder, Encoder

    enc = Encoder()
    for symbols, weights in parts:
        enc.encode(symbols, weights)
    blob = enc.finish()
    dec = Decoder(blob)
    for symbols, weights in parts:
        assert np.array_equal(dec.decode(weights, len(symbols)), symbols)
    dec.finish()
    return blob


def test_table_rans_round_trips_edge_models():
    """No parts; parts of 1-5 symbols (the four states partly used); a one-symbol model (it
    takes every slot: coding costs nothing); every symbol the same under a broad model; 4,096
    symbols flat and skewed 1 : 2^28 (more forced to frequency 1 than the most frequent can
    give at once); many parts under other models; symbols never seen weighted 0."""
    rng = np.random.default_rng(3)
    assert len(_ans_round_trip([])) == 16
    flat = np.ones(4096, np.int64)
    skewed = np.ones(4096, np.int64)
    skewed[7] = 1 << 28
    one = np.zeros(256, np.int64)
    one[42] = 5
    cases = [
        [(np.array([3]), np.array([1, 1, 1, 9]))],
        [(np.array([0, 2, 3])[np.arange(k) % 3], np.array([5, 0, 1, 2])) for k in range(1, 6)],
        [(np.full(10_000, 42), one)],
        [(np.full(5000, 0), np.arange(1, 257))],
        [(rng.integers(0, 4096, 20_000), flat), (np.r_[np.full(3000, 7), np.arange(4096)], skewed)],
        [(rng.integers(0, 16, rng.integers(0, 300)), rng.integers(1, 100, 16)) for _ in range(50)],
    ]
    for parts in cases:
        _ans_round_trip(parts)
    assert len(_ans_round_trip(cases[2])) == 16  # no words at all


def test_table_rans_frequencies_sum_to_the_table_and_keep_every_weighted_symbol():
    from haagenti.codecs.ans import PROB_BITS, frequencies

    rng = np.random.default_rng(5)
    skewed = np.ones(4096, np.int64)
    skewed[0] = 1 << 40
    for w in (np.ones(4096, np.int64), skewed, np.array([0, 0, 3]), rng.integers(0, 1 << 28, 256), np.r_[np.zeros(100, np.int64), 1]):
        f = frequencies(w)
        assert f.sum() == 1 << PROB_BITS and ((f > 0) == (w > 0)).all()
    assert (frequencies(np.ones(4096, np.int64)) == 8).all()


def test_table_rans_refuses_streams_that_do_not_end_where_they_began():
    """A word too many or too few, a flipped bit, a state below its bound, an odd length:
    damaged, never symbols silently other than those coded."""
    from haagenti.codecs.ans import DamagedStream, Decoder

    rng = np.random.default_rng(4)
    weights = np.arange(1, 65)
    symbols = rng.integers(0, 64, 5000)
    blob = _ans_round_trip([(symbols, weights)])
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x04
    for bad in (blob + b"\0\0", blob[:-2], bytes(flipped), b"\0" * 16 + blob[16:], blob[:-1], blob[:15]):
        with pytest.raises(DamagedStream):
            dec = Decoder(bad)
            out = dec.decode(weights, len(symbols))
            dec.finish()
            assert np.array_equal(out, symbols)  # a flip that still decodes must give the same symbols


# ---- quantized blocks predicted from their float source ----------------------------------------
LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def _ladder_step(qtype: str, source: np.ndarray) -> bytes:
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import quantize

    return quantize(source.astype(np.float32), GGMLQuantizationType[qtype]).tobytes()


def _encoded(qtype: str, data: bytes, ref: bytes, ref_dtype: str) -> dict:
    from haagenti.encode import PendingFragment, encode_fragment
    from haagenti.fragment import FragmentType
    from haagenti.hashing import content_hash

    return encode_fragment(PendingFragment(content_hash(data), qtype, data, FragmentType.GENERIC, 0), [("r" * 64, ref, ref_dtype, 0)], PLANES)


@pytest.mark.parametrize("qtype", LEGACY)
def test_quantized_blocks_of_a_stored_float_source_are_stored_as_their_prediction(qtype):
    """gguf's quantizer over an F16 tensor (llama-quantize's input): every code and field is
    predicted, so the fragment costs a few bytes per plane, and decodes bit-exact against the
    F16 reference, and against the same values as BF16/F32 (other dtypes, same values)."""
    from haagenti.codecs.predict import LEGACY as TYPES
    from haagenti.codecs.predict import prediction_residual
    from haagenti.encode import decode_row

    source = (np.random.default_rng(3).normal(0, 0.02, (64, 256)) * np.linspace(0.2, 2, 64)[:, None]).astype(np.float16)
    data = _ladder_step(qtype, source)
    assert not any(prediction_residual(data, qtype, source.tobytes(), "F16"))  # 100% of codes and fields exact
    for ref, ref_dtype in ((source.tobytes(), "F16"), (source.astype(np.float32).tobytes(), "F32")):
        row = _encoded(qtype, data, ref, ref_dtype)
        assert row["encoding"] == Encoding.PREDICTED.value and row["ref_dtype"] == ref_dtype and row["depth"] == 1
        assert row["stored_size"] < 0.02 * len(data)  # planes of zeros: their headers
        assert decode_row(row, ref, ref_dtype) == data
    assert len(data) == len(source.reshape(-1)) // 32 * TYPES[qtype].size


@pytest.mark.parametrize("qtype", LEGACY)
def test_prediction_from_another_source_is_exact_and_smaller(qtype):
    """Quantized from F32 master weights, the F16 export as the reference: most codes are still
    predicted (the residual absorbs the rest), and the blocks decode bit-exact."""
    from haagenti.encode import decode_row

    master = np.random.default_rng(4).normal(0, 0.02, (64, 256)).astype(np.float32)
    data, ref = _ladder_step(qtype, master), master.astype(np.float16).tobytes()
    row = _encoded(qtype, data, ref, "F16")
    assert row["encoding"] == Encoding.PREDICTED.value and row["stored_size"] < 0.5 * len(chain_for(qtype).encode(data))
    assert decode_row(row, ref, "F16") == data


def test_a_prediction_that_does_not_pay_is_not_stored():
    """Blocks of other values than the reference's: the residual costs more than the plain
    blocks, so the fragment is stored plain (no reference)."""
    rng = np.random.default_rng(5)
    data = _ladder_step("Q4_1", rng.normal(0, 0.02, (64, 256)))
    row = _encoded("Q4_1", data, rng.normal(0, 1, (64, 256)).astype(np.float16).tobytes(), "F16")
    assert (row["encoding"], row["ref_id"], row["depth"]) == (Encoding.PLAIN.value, None, 0)


def test_predictions_only_from_a_float_reference_of_as_many_values():
    from haagenti.codecs.predict import predictable

    assert predictable("Q8_0", 34 * 4, "F16", 2 * 128) and predictable("Q5_1", 24 * 4, "BF16", 2 * 128) and predictable("Q4_K", 144, "F16", 512)
    for args in (("Q8_0", 34 * 4, "F16", 2 * 127), ("Q8_0", 34 * 4 + 1, "F16", 2 * 128), ("IQ4_XS", 136, "F16", 512), ("Q4_K", 144, "F16", 256),
                 ("Q8_0", 34, "I16", 64), ("F16", 64, "F32", 128), ("Q8_0", 34, "NOPE", 64)):
        assert not predictable(*args), args


@pytest.mark.parametrize("case", ["short-reference", "integer-reference", "unknown-reference", "float-fragment", "flipped-residual", "cut-residual"])
def test_crafted_predicted_rows_are_refused_in_one_line(case):
    """A predicted row is untrusted like any: a reference of the wrong size or kind, a
    fragment dtype that is no block type, residual bytes flipped or cut: one line, never
    other bytes."""
    from haagenti.encode import decode_row
    from haagenti.errors import FragmentError

    source = np.random.default_rng(6).normal(0, 0.02, (16, 256)).astype(np.float16)
    data = _ladder_step("Q5_1", source)
    ref = source.tobytes()
    row = _encoded("Q5_1", data, ref, "F16")
    assert decode_row(row, ref, "F16") == data
    blob = bytearray(row["blob"])
    blob[len(blob) // 2] ^= 0x04
    bad = {
        "short-reference": (row, ref[:-2], "F16"),
        "integer-reference": (row, ref, "I16"),
        "unknown-reference": (row, ref, "F17"),
        "float-fragment": ({**row, "dtype": "F16"}, ref, "F16"),
        "flipped-residual": ({**row, "blob": bytes(blob)}, ref, "F16"),
        "cut-residual": ({**row, "blob": row["blob"][: len(row["blob"]) // 2]}, ref, "F16"),
    }[case]
    with pytest.raises(FragmentError, match="damaged|failed verification") as e:
        decode_row(*bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("qtype", LEGACY + ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_any_blocks_round_trip_against_any_float_values(qtype):
    """The residual absorbs whatever the prediction misses: random block bytes (NaN and Inf
    scales among them) against values holding NaN, Inf, zeros, huge and tiny numbers come back
    exactly, and a NaN field of the source leaves no payload in the residual."""
    from haagenti.codecs.predict import BLOCK_BYTES, LEGACY as TYPES, VALUES_PER_BLOCK
    from haagenti.codecs.predict import apply_prediction, prediction_residual

    rng = np.random.default_rng(8)
    n = 256 * 32 // VALUES_PER_BLOCK[qtype]
    data = rng.integers(0, 256, n * BLOCK_BYTES[qtype], dtype=np.uint8).tobytes()
    x = (rng.normal(0, 1, 256 * 32) * 10.0 ** rng.integers(-8, 8, 256 * 32)).astype(np.float32)
    x[rng.integers(0, len(x), 40)] = np.nan
    x[rng.integers(0, len(x), 40)] = np.inf
    x[rng.integers(0, len(x), 40)] = -np.inf
    x[: 32 * 4] = 0
    with np.errstate(over="ignore"):
        f16 = x.astype(np.float16)
    for ref, ref_dtype in ((x.tobytes(), "F32"), (f16.tobytes(), "F16")):
        res = prediction_residual(data, qtype, ref, ref_dtype)
        assert apply_prediction(res, qtype, ref, ref_dtype) == data
    if qtype not in TYPES:
        return
    nan_block = np.full(32, np.nan, np.float32).tobytes()
    stored = np.frombuffer(data[: TYPES[qtype].size], np.uint8)
    field = np.frombuffer(prediction_residual(stored.tobytes(), qtype, nan_block, "F32")[:2], np.uint16)[0]
    assert field == stored[:2].view(np.uint16)[0] ^ 0x7E00


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_of_a_stored_float_source_are_predicted_from_their_stored_scales(qtype):
    """Real K-quant blocks (tests/data/kquants.npz: ggml's own quantizer, ggml_quantize_chunk
    through ggml-python, over 16 rows of 256 F16 values of the example model; how they were
    made is in docs/decisions/0281-quantized-prediction.md): every code is the one the stored
    scales give the F16 values, so only the scales are stored; the blocks decode bit-exact."""
    from haagenti.codecs.predict import _k_codes, prediction_residual
    from haagenti.encode import decode_row

    z = np.load(os.path.join(os.path.dirname(__file__), "data", "kquants.npz"))
    source, data = z["source"].tobytes(), z[qtype].tobytes()
    residual = np.frombuffer(prediction_residual(data, qtype, source, "F16"), np.uint8).reshape(len(z[qtype]), -1)
    assert not _k_codes(residual, qtype).any()
    row = _encoded(qtype, data, source, "F16")
    assert row["encoding"] == Encoding.PREDICTED.value and row["stored_size"] < 0.3 * len(chain_for(qtype).encode(data))
    assert decode_row(row, source, "F16") == data


# ---- ONNX int8/uint8 weights predicted from their float source ---------------------------------
def _quantize_dynamic(weights: np.ndarray, tmp_path, weight_type: str, per_channel: bool = False) -> tuple[np.ndarray, float, int]:
    """onnxruntime's quantize_dynamic over a one-MatMul model holding `weights`: (codes,
    scale, zero point) as the quantized file stores them (per channel: a scale and zero point
    per column)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rows, cols = weights.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])], [numpy_helper.from_array(weights, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    quantize_dynamic(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType[weight_type], per_channel=per_channel)
    init = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    if per_channel:
        return init["W_quantized"], init["W_scale"], init["W_zero_point"]
    return init["W_quantized"], float(init["W_scale"]), int(init["W_zero_point"])


@pytest.mark.parametrize("weight_type", ["QInt8", "QUInt8"])
def test_onnx_quantized_weights_of_a_stored_float_source_are_stored_as_their_prediction(tmp_path, weight_type):
    """quantize_dynamic's codes against the F32 weights they came from: the encoder finds the
    graph's zero point and a scale as near as its float32 neighbours, every code is predicted, and the fragment costs its header
    and a residual of zeros; against the weights' F16 cast most codes still are. Bit-exact."""
    from haagenti.codecs.predict import prediction_residual
    from haagenti.encode import decode_row

    weights = (np.random.default_rng(9).normal(0, 0.02, (128, 256)) * np.linspace(0.5, 1.5, 256)).astype(np.float32)
    codes, scale, zero = _quantize_dynamic(weights, tmp_path, weight_type)
    dtype_name = "I8" if codes.dtype == np.int8 else "U8"
    data = codes.tobytes()
    residual = prediction_residual(data, dtype_name, weights.tobytes(), "F32")
    assert abs(np.frombuffer(residual[:4], np.float32)[0] / scale - 1) < 1e-5 and residual[4] == zero % 256  # any scale that gives the codes
    assert not any(residual[5:])
    for ref, ref_dtype, most in ((weights.tobytes(), "F32", 0.01), (weights.astype(np.float16).tobytes(), "F16", 0.1)):
        row = _encoded(dtype_name, data, ref, ref_dtype)
        assert row["encoding"] == Encoding.PREDICTED.value and row["ref_dtype"] == ref_dtype and row["depth"] == 1
        assert row["stored_size"] < most * len(data), row["stored_size"]
        assert decode_row(row, ref, ref_dtype) == data


def _per_channel(tmp_path, weight_type: str, seed: int = 14) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """quantize_dynamic(per_channel=True) of a 96x160 MatMul weight whose columns' spreads differ
    8x, laid out as haagenti stores it (W: a column's values consecutive, runs of 96): (codes,
    values, the column scales, zero points)."""
    weights = (np.random.default_rng(seed).normal(0, 0.02, (96, 160)) * np.linspace(0.25, 2, 160)).astype(np.float32)
    codes, scales, zeros = _quantize_dynamic(weights, tmp_path, weight_type, per_channel=True)
    return np.ascontiguousarray(codes.T).ravel(), np.ascontiguousarray(weights.T).ravel(), scales, zeros


@pytest.mark.parametrize("weight_type", ["QInt8", "QUInt8"])
def test_per_channel_onnx_codes_of_a_stored_float_source_are_stored_as_their_prediction(tmp_path, weight_type):
    """Per-channel codes (one scale and zero point per column) against the F32 weights: the
    encoder finds the runs (96 values, the fragment starting at value 0 or mid-run), fits each
    run's pair (the graph's zero points, its scales within 0.2%), predicts every
    code, and stores the pairs and a residual of zeros; from the F16 cast most codes still are.
    Bit-exact either way."""
    from haagenti.codecs.predict import CHANNELS_HEADER, CHANNELS_MARK, prediction_residual
    from haagenti.encode import decode_row

    codes, x, scales, zeros = _per_channel(tmp_path, weight_type)
    dtype_name = "I8" if codes.dtype == np.int8 else "U8"
    for at in (0, 40):  # a fragment from a run's first value, and one from its 41st
        data, ref = codes[at:].tobytes(), x[at:]
        residual = prediction_residual(data, dtype_name, ref.tobytes(), "F32")
        k = len(scales) - at // 96
        assert residual[:4] == CHANNELS_MARK and np.frombuffer(residual[4:12], "<u4").tolist() == [96, at % 96]
        got_scales = np.frombuffer(residual[CHANNELS_HEADER : CHANNELS_HEADER + 4 * k], np.float32)
        assert np.abs(got_scales / scales[at // 96 :] - 1).max() < 2e-3  # any scale that gives a run's 96 codes
        assert residual[CHANNELS_HEADER + 4 * k : CHANNELS_HEADER + 5 * k] == zeros[at // 96 :].tobytes()
        assert not any(residual[CHANNELS_HEADER + 5 * k :])
        for values, ref_dtype, most in ((ref, "F32", 0.07), (ref.astype(np.float16), "F16", 0.15)):
            row = _encoded(dtype_name, data, values.tobytes(), ref_dtype)
            assert row["encoding"] == Encoding.PREDICTED.value and row["stored_size"] < most * len(data), row["stored_size"]
            assert decode_row(row, values.tobytes(), ref_dtype) == data


@pytest.mark.parametrize("case", ["run-below-minimum", "start-past-run", "header-cut", "one-run-more", "scale-flipped", "zero-point-flipped"])
def test_crafted_per_channel_predicted_rows_are_refused_in_one_line(tmp_path, case):
    """A per-channel row whose run length, start or run count does not fit its codes, or whose
    header is cut: damaged, one line; a flipped scale or zero point fails verification."""
    from haagenti.codecs.predict import CHANNELS_HEADER
    from haagenti.encode import decode_row
    from haagenti.errors import FragmentError

    codes, x, scales, _ = _per_channel(tmp_path, "QUInt8")
    data, ref = codes.tobytes(), x.tobytes()
    row = _encoded("U8", data, ref, "F32")
    residual = bytearray(codec_chain(row["codec"]).decode(row["blob"], len(data) * 2))
    k = len(scales)
    if case == "run-below-minimum":
        residual[4:8] = np.array([8], "<u4").tobytes()
    elif case == "start-past-run":
        residual[8:12] = np.array([96], "<u4").tobytes()
    elif case == "header-cut":
        residual = residual[:10]
    elif case == "one-run-more":
        residual[CHANNELS_HEADER + 4 * k : CHANNELS_HEADER + 4 * k] = b"\0" * 5
    else:
        residual[CHANNELS_HEADER + (2 if case == "scale-flipped" else 4 * k + 3)] ^= 0x10
    with pytest.raises(FragmentError, match="damaged|failed verification") as e:
        decode_row({**row, "codec": "raw", "blob": bytes(residual)}, ref, "F32")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype_name", ["I8", "U8"])
def test_any_int8_codes_round_trip_against_any_float_values(dtype_name):
    """Random codes against values holding NaN, Inf, zeros, huge and tiny numbers, and codes
    against constant values: the residual absorbs what the prediction misses."""
    from haagenti.codecs.predict import apply_prediction, prediction_residual

    rng = np.random.default_rng(10)
    data = rng.integers(0, 256, 8192, dtype=np.uint8).tobytes()
    x = (rng.normal(0, 1, 8192) * 10.0 ** rng.integers(-8, 8, 8192)).astype(np.float32)
    x[rng.integers(0, len(x), 40)] = np.nan
    x[rng.integers(0, len(x), 40)] = np.inf
    for values in (x, np.zeros(8192, np.float32), np.full(8192, np.nan, np.float32)):
        with np.errstate(over="ignore"):
            for ref, ref_dtype in ((values.tobytes(), "F32"), (values.astype(np.float16).tobytes(), "F16")):
                assert apply_prediction(prediction_residual(data, dtype_name, ref, ref_dtype), dtype_name, ref, ref_dtype) == data


def test_int8_prediction_that_does_not_pay_is_not_stored(tmp_path):
    rng = np.random.default_rng(11)
    codes, _, _ = _quantize_dynamic(rng.normal(0, 0.02, (64, 128)).astype(np.float32), tmp_path, "QInt8")
    row = _encoded("I8", codes.tobytes(), rng.normal(0, 1, (64, 128)).astype(np.float32).tobytes(), "F32")
    assert (row["encoding"], row["ref_id"], row["depth"]) == (Encoding.PLAIN.value, None, 0)


def test_int8_predictions_only_from_a_float_reference_of_as_many_values():
    from haagenti.codecs.predict import predictable

    assert predictable("I8", 128, "F32", 512) and predictable("U8", 128, "F16", 256) and predictable("U8", 128, "BF16", 256)
    for args in (("I8", 128, "F32", 508), ("U8", 128, "I16", 256), ("I16", 128, "F32", 256), ("U8", 128, "U8", 128)):
        assert not predictable(*args), args


@pytest.mark.parametrize("case", ["flipped-scale", "flipped-residual", "cut-residual", "long-residual", "short-reference", "integer-reference"])
def test_crafted_int8_predicted_rows_are_refused_in_one_line(tmp_path, case):
    from haagenti.encode import decode_row
    from haagenti.errors import FragmentError

    weights = np.random.default_rng(12).normal(0, 0.02, (64, 128)).astype(np.float32)
    codes, _, _ = _quantize_dynamic(weights, tmp_path, "QUInt8")
    data, ref = codes.tobytes(), weights.tobytes()
    row = _encoded("U8", data, ref, "F32")
    assert row["encoding"] == Encoding.PREDICTED.value and decode_row(row, ref, "F32") == data
    residual = codec_chain(row["codec"]).decode(row["blob"], len(data) + 5)
    flipped = bytearray(residual)
    flipped[1 if case == "flipped-scale" else 100] ^= 0x10
    recoded = lambda b: {**row, "codec": "raw", "blob": bytes(b)}  # noqa: E731
    bad = {
        "flipped-scale": (recoded(flipped), ref, "F32"),
        "flipped-residual": (recoded(flipped), ref, "F32"),
        "cut-residual": (recoded(residual[:-1]), ref, "F32"),
        "long-residual": (recoded(bytes(residual) + b"\0"), ref, "F32"),
        "short-reference": (row, ref[:-4], "F32"),
        "integer-reference": (row, ref, "I32"),
    }[case]
    with pytest.raises(FragmentError, match="damaged|failed verification") as e:
        decode_row(*bad)
    assert "\n" not in str(e.value)
