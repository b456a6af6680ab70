import io
import json
import pickle
import struct

import pytest
import torch

from haagenti.errors import FormatError, ModelIdError, UnsafeFileError
from haagenti.formats import open_model
from haagenti.manifest import validate_model_id
from tests.helpers import library_with_one_model


def _raw_safetensors(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if header_len is None else header_len) + h + data


@pytest.fixture
def lib(tmp_path):
    return library_with_one_model(str(tmp_path))


BAD_FILES = {
    "truncated.safetensors": (lambda: _raw_safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "past the end|outside|not described"),
    "tiny.safetensors": (lambda: b"\x01\x02", "truncated"),
    "huge-header.safetensors": (lambda: _raw_safetensors({}, b"", header_len=1 << 40), "exceeds"),
    "lying-length.safetensors": (lambda: _raw_safetensors({}, b"", header_len=10_000), "past the end"),
    "out-of-range.safetensors": (lambda: _raw_safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}, b"\0" * 16), "outside the data section"),
    "overlap.safetensors": (
        lambda: _raw_safetensors(
            {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
            b"\0" * 24,
        ),
        "overlaps",
    ),
    "wrong-size.safetensors": (lambda: _raw_safetensors({"w": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, b"\0" * 16), "needs 20"),
    "unknown-dtype.safetensors": (lambda: _raw_safetensors({"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"\0" * 2), "unsupported dtype"),
    "not-json.safetensors": (lambda: struct.pack("<Q", 4) + b"{{{{", "not valid JSON"),
    "trailing.safetensors": (lambda: _raw_safetensors({"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 5), "not described"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_safetensors_is_refused_and_library_unchanged(tmp_path, lib, name):
    make, message = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(make())
    before = lib.store.versions()
    with pytest.raises(FormatError, match=message):
        lib.ingest([str(path)], "bad")
    assert lib.store.versions() == before
    assert [m["model_id"] for m in lib.models()] == ["good"]
    assert lib.verify().ok


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_payload_is_refused_without_running_it(tmp_path, lib, capsys):
    pt = tmp_path / "evil.pt"
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2), "x": Payload()}, buf)
    pt.write_bytes(buf.getvalue())
    with pytest.raises(UnsafeFileError, match="weights_only"):
        lib.ingest([str(pt)], "evil")
    assert "pwned" not in capsys.readouterr().out
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UnsafeFileError, match="pickle"):
        lib.ingest([str(raw)], "evil2")
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(pickle.dumps({"w": Payload()}, protocol=2))
    with pytest.raises(UnsafeFileError):
        lib.ingest([str(legacy)], "evil3")
    assert [m["model_id"] for m in lib.models()] == ["good"]


@pytest.mark.parametrize("bad", ["../x", "a/../../b", "/abs", "a\\b", ".hidden", "", "a//b", "a/b/c", "x" * 200, "a b", "..", "a/.."])
def test_traversal_ids_refused(tmp_path, lib, bad):
    with pytest.raises(ModelIdError):
        validate_model_id(bad)
    with pytest.raises(ModelIdError):
        lib.ingest([str(tmp_path / "good.safetensors")], bad)
    assert [m["model_id"] for m in lib.models()] == ["good"]


def test_good_ids_accepted():
    for ok in ["base", "org/model-v1.5", "A_b.c-d"]:
        assert validate_model_id(ok) == ok


def test_unknown_file_type_and_missing_file(tmp_path):
    (tmp_path / "weights.xyz").write_bytes(b"abc")
    with pytest.raises(FormatError, match="unknown model file type"):
        open_model([str(tmp_path / "weights.xyz")])
    with pytest.raises(FormatError, match="no such file"):
        open_model([str(tmp_path / "absent.safetensors")])


def test_memory_url_models_are_read_through_fsspec(tmp_path):
    import fsspec
    from safetensors.torch import save

    data = save({"w": torch.arange(10, dtype=torch.int32)})
    with fsspec.open("memory://models/m.safetensors", "wb") as f:
        f.write(data)
    src = open_model(["memory://models/m.safetensors"])
    assert [t.name for t in src.tensors] == ["w"]
    assert src.read(src.tensors[0], 0, 40) == torch.arange(10, dtype=torch.int32).numpy().tobytes()


@pytest.mark.parametrize("name", ["BF16", "F16", "F8_E5M2", "F8_E4M3"])
def test_has_nonfinite_on_every_bit_pattern(name):
    """Each pattern beside the largest finite values of both signs: NaN/Inf found exactly where
    torch sees one, whatever the sign (the check reads words as signed and as unsigned)."""
    import numpy as np

    from haagenti.formats.dtypes import dtype, has_nonfinite

    d = dtype(name)
    word = {1: np.uint8, 2: np.uint16}[d.itemsize]
    patterns = np.arange(1 << (8 * d.itemsize), dtype=word)
    finite = torch.isfinite(torch.from_numpy(patterns.view(np.int16 if d.itemsize == 2 else np.int8)).view(d.torch_dtype).float()).numpy()
    top = patterns[finite].view(np.int8 if d.itemsize == 1 else np.int16)
    largest = [word(top.max()), word(top.min())]  # the largest finite magnitudes, + and -
    for p, ok in zip(patterns, finite):
        assert has_nonfinite(np.array([*largest, p], word).tobytes(), d) == (not ok), hex(p)


def test_has_nonfinite_wide_floats():
    import numpy as np

    from haagenti.formats.dtypes import dtype, has_nonfinite

    for name, t in (("F32", np.float32), ("F64", np.float64), ("C64", np.complex64)):
        x = np.array([1.5, -3.0e30 if t is not np.float64 else -1e300, 0.0, -0.0], t)
        assert not has_nonfinite(x.tobytes(), dtype(name))
        for bad in (np.nan, -np.nan, np.inf, -np.inf):
            y = x.copy()
            y[2] = bad
            assert has_nonfinite(y.tobytes(), dtype(name)), (name, bad)
        assert has_nonfinite(np.array([1.0, np.nan], t)[::-1].tobytes(), dtype(name))
