import os

import numpy as np
import pytest
import torch

from haagenti.codecs import ByteGroup, Zstd, apply_delta, cast_reference, chain_for, codec_chain, smallest_encoding
from haagenti.codecs.delta import residual
from haagenti.fragment import Encoding, FragmentType


@pytest.mark.parametrize("width", [2, 4, 8])
def test_byte_group_round_trip_and_layout(width):
    data = os.urandom(width * 1000)
    enc = ByteGroup(width).encode(data)
    assert ByteGroup(width).decode(enc) == data
    assert enc[:1000] == data[0::width]  # plane 0 holds every word's first byte


def test_zstd_streams_store_incompressible_parts_raw():
    noise, zeros = os.urandom(1 << 18), bytes(1 << 18)
    z = Zstd(3, streams=2)
    enc = z.encode(noise + zeros)
    assert z.decode(enc) == noise + zeros
    assert len(enc) < len(noise) + 1000  # the zero stream compressed, the noise kept raw


@pytest.mark.parametrize("level,spec", [(None, "bytegroup:2+zstd:planes:2"), (3, "bytegroup:2+zstd:3:2")])
def test_chain_spec_round_trips(level, spec):
    chain = chain_for(2, True) if level is None else chain_for(2, True, level)
    assert chain.spec == spec
    data = torch.randn(5000).bfloat16().view(torch.uint8).numpy().tobytes()
    assert codec_chain(chain.spec).decode(chain.encode(data)) == data
    with pytest.raises(Exception, match="unknown codec"):
        codec_chain("lz4:1")


def test_byte_grouping_beats_plain_zstd_on_bf16():
    data = (torch.randn(1 << 17) * 0.02).bfloat16().view(torch.uint8).numpy().tobytes()
    assert len(chain_for(2, True).encode(data)) < len(codec_chain("zstd:3").encode(data))


def test_planes_preset_is_no_larger_than_level_1_on_exponent_planes():
    data = (torch.randn(1 << 17, generator=torch.Generator().manual_seed(1)) * 0.02).bfloat16().view(torch.uint8).numpy().tobytes()
    assert len(chain_for(2, True).encode(data)) <= len(chain_for(2, True, 1).encode(data))


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
    res = codec_chain(spec).decode(blob)
    assert apply_delta(enc, res, ref, tuned.to(dtype).element_size()) == raw
    assert len(blob) < len(chain_for(tuned.to(dtype).element_size(), True).encode(raw))
    for e in (Encoding.DELTA_XOR, Encoding.DELTA_SUB):
        assert apply_delta(e, residual(e, raw, ref, 2 if name != "F32" else 4), ref, 2 if name != "F32" else 4) == raw


def test_cast_reference_matches_torch_cast():
    base = torch.randn(1000).bfloat16()
    out = cast_reference(base.view(torch.uint8).numpy().tobytes(), "BF16", "F16")
    assert out == base.to(torch.float16).view(torch.uint8).numpy().tobytes()


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
    assert apply_delta(enc, codec_chain(spec).decode(blob), refs[1], 2) == tuned
    enc, i, spec, blob = smallest_encoding(tuned, refs[:1], "BF16")
    assert (enc, i) == (Encoding.PLAIN, None) and bytes(codec_chain(spec).decode(blob)) == tuned
