"""GGUF and ONNX readers are as strict as the safetensors one: a lying file gets one clear line
and the library is left as it was."""
import struct

import numpy as np
import pytest

from haagenti.errors import FormatError
from haagenti.formats import gguf_file, onnx_file
from tests.helpers import library_with_one_model


@pytest.fixture
def lib(tmp_path):
    return library_with_one_model(str(tmp_path))


def refused(lib, paths, message: str) -> None:
    before = lib.store.versions()
    with pytest.raises(FormatError, match=message) as e:
        lib.ingest([str(p) for p in paths], "bad")
    assert "\n" not in str(e.value)
    assert lib.store.versions() == before
    assert [m["model_id"] for m in lib.models()] == ["good"]


# ---- GGUF: a small writer of raw files, so each field can lie -------------------------------
def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_bytes(tensors, data: bytes, kv=b"", n_kv=0, alignment=32, version=3, magic=b"GGUF") -> bytes:
    """tensors: (name, dims in GGUF order, ggml type code, offset)."""
    head = magic + struct.pack("<IQQ", version, len(tensors), n_kv) + kv
    for name, dims, code, offset in tensors:
        head += _s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", code, offset)
    head += b"\0" * (-len(head) % alignment)
    return head + data


F32, Q8_0 = 0, 8
GOOD_TENSORS = [("a", [8, 4], F32, 0), ("b", [32], F32, 128)]
GOOD_DATA = np.arange(64, dtype=np.float32).tobytes()


def test_the_raw_writer_makes_files_gguf_reads(tmp_path, lib):
    import gguf

    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_bytes(GOOD_TENSORS, GOOD_DATA))
    r = gguf.GGUFReader(str(path))
    assert [t.name for t in r.tensors] == ["a", "b"]
    lib.ingest([str(path)], "ok")
    lib.restore("ok", str(tmp_path / "out"), rehash=True)
    assert (tmp_path / "out" / "ok.gguf").read_bytes() == path.read_bytes()


BAD_GGUF = {
    "not-gguf": (lambda: b"GGML" + b"\0" * 60, "no GGUF magic"),
    "tiny": (lambda: b"GGUF", "truncated GGUF file"),
    "big-endian": (lambda: gguf_bytes(GOOD_TENSORS, GOOD_DATA, version=3 << 24), "big-endian"),
    "truncated-data": (lambda: gguf_bytes(GOOD_TENSORS, GOOD_DATA)[:-40], "runs past the end of the file"),
    "truncated-header": (lambda: gguf_bytes(GOOD_TENSORS, GOOD_DATA)[:40], "truncated GGUF header|runs past the end|more than the file can hold"),
    "lying-offset": (lambda: gguf_bytes([("a", [8, 4], F32, 0), ("b", [32], F32, 1 << 20)], GOOD_DATA), "runs past the end of the file"),
    "misaligned": (lambda: gguf_bytes([("a", [8, 4], F32, 0), ("b", [32], F32, 130)], GOOD_DATA + b"\0" * 2), "not a multiple of the alignment"),
    "overlap": (lambda: gguf_bytes([("a", [8, 4], F32, 0), ("b", [32], F32, 64)], GOOD_DATA), "overlaps"),
    "unaccounted": (lambda: gguf_bytes(GOOD_TENSORS, GOOD_DATA + b"\x07" * 64), "unaccounted bytes after the last tensor"),
    "unknown-type": (lambda: gguf_bytes([("a", [8, 4], 999, 0), ("b", [32], F32, 128)], GOOD_DATA), "unknown GGML type 999"),
    "partial-block": (lambda: gguf_bytes([("a", [16, 2], Q8_0, 0)], b"\0" * 64), "not a multiple of Q8_0's block of 32"),
    "five-dims": (lambda: gguf_bytes([("a", [1, 1, 1, 1, 1], F32, 0)], b"\0" * 32), "5 dimensions"),
    "duplicate": (lambda: gguf_bytes([("a", [8, 4], F32, 0), ("a", [32], F32, 128)], GOOD_DATA), "appears twice"),
    "huge-string": (lambda: gguf_bytes(GOOD_TENSORS, GOOD_DATA, kv=struct.pack("<Q", 1 << 40) + b"k", n_kv=1), "runs past the end of the file"),
    "huge-array": (lambda: gguf_bytes(GOOD_TENSORS, GOOD_DATA, kv=_s("k") + struct.pack("<IIQ", 9, 4, 1 << 50), n_kv=1), "array of .* items runs past"),
    "huge-counts": (lambda: gguf_bytes([], b"", n_kv=1 << 40), "more than the file can hold"),
    "bad-alignment": (lambda: gguf_bytes(GOOD_TENSORS, GOOD_DATA, kv=_s("general.alignment") + struct.pack("<II", 4, 48), n_kv=1), "power-of-two"),
    "bad-value-type": (lambda: gguf_bytes(GOOD_TENSORS, GOOD_DATA, kv=_s("k") + struct.pack("<I", 77), n_kv=1), "unknown GGUF metadata value type 77"),
}


def test_oversize_gguf_metadata_is_refused(tmp_path, lib, monkeypatch):
    monkeypatch.setattr(gguf_file, "MAX_HEADER_BYTES", 200)
    path = tmp_path / "meta.gguf"
    path.write_bytes(gguf_bytes(GOOD_TENSORS, GOOD_DATA, kv=_s("general.description") + struct.pack("<I", 8) + _s("x" * 300), n_kv=1))
    refused(lib, [path], "metadata exceeds the 200-byte limit")


# ---- ONNX ----------------------------------------------------------------------------------
def onnx_model(tensors: dict[str, np.ndarray]):
    import onnx
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(a, name) for name, a in tensors.items()]
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], inits)
    return helper.make_model(graph)


GOOD_ONNX = {"w": np.arange(32, dtype=np.float32).reshape(8, 4), "b": np.ones(4, np.float32)}


def test_small_onnx_round_trips_with_its_matmul_weight_transposed(tmp_path, lib):
    path = tmp_path / "ok.onnx"
    path.write_bytes(onnx_model(GOOD_ONNX).SerializeToString())
    lib.ingest([str(path)], "ok")
    t = lib.manifest("ok").tensors_by_name()["w"]
    assert t.shape == (4, 8)  # stored as W, the file holds W^T
    raw = lib.fetch_raw([t.fragments[0].fragment_id])[t.fragments[0].fragment_id]
    assert raw == GOOD_ONNX["w"].T.tobytes()
    lib.restore("ok", str(tmp_path / "out"), rehash=True)
    assert (tmp_path / "out" / "ok.onnx").read_bytes() == path.read_bytes()


def _with(mutate):
    def make():
        m = onnx_model(GOOD_ONNX)
        mutate(m)
        return m.SerializeToString()
    return make


def _external(location: str, offset: int = 0, length: int = 128):
    def mutate(m):
        import onnx

        w = m.graph.initializer[0]
        w.ClearField("raw_data")
        w.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
            e = w.external_data.add()
            e.key, e.value = k, v
    return mutate


BAD_ONNX = {
    "truncated": (lambda: onnx_model(GOOD_ONNX).SerializeToString()[:-30], "not a valid ONNX protobuf|malformed protobuf|an ONNX model"),
    "garbage": (lambda: b"\xff" * 64, "not a valid ONNX protobuf"),
    "lying-dims": (_with(lambda m: m.graph.initializer[1].dims.__setitem__(0, 5)), "raw_data holds 16 bytes, dims \\[5\\] of F32 need 20"),
    "unknown-type": (_with(lambda m: setattr(m.graph.initializer[1], "data_type", 999)), "unknown tensor type 999"),
    "external-traversal": (_with(_external("../../etc/passwd")), "leaves the model's folder"),
    "external-absolute": (_with(_external("/etc/passwd")), "not a relative path"),
    "external-missing": (_with(_external("weights.bin")), "not among the model's files"),
    "external-lying-length": (_with(_external("w.data", length=100)), "external data of 100 bytes"),
}


BAD = {**{f"{k}.gguf": v for k, v in BAD_GGUF.items()}, **{f"{k}.onnx": v for k, v in BAD_ONNX.items()}}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_is_refused_and_library_unchanged(tmp_path, lib, name):
    make, message = BAD[name]
    path = tmp_path / name
    path.write_bytes(make())
    refused(lib, [path], message)


def test_external_data_past_its_file_is_refused(tmp_path, lib):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(_with(_external("w.data", offset=64))())
    (folder / "w.data").write_bytes(GOOD_ONNX["w"].tobytes())  # 128 bytes: [64, 192) runs past
    refused(lib, [folder], "runs past the end of the file")


def test_oversize_onnx_is_refused(tmp_path, lib, monkeypatch):
    monkeypatch.setattr(onnx_file, "MAX_ONNX_BYTES", 100)
    path = tmp_path / "big.onnx"
    path.write_bytes(onnx_model(GOOD_ONNX).SerializeToString())
    refused(lib, [path], "exceed protobuf's 2 GiB limit")
