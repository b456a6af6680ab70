"""Records read from a library are untrusted input: anyone who can write to a shared bucket
can write them. A manifest is checked whole before a restore writes a byte: file names stay
inside the output folder, every count, offset and length agrees with the file's own header."""
from __future__ import annotations

import io
import json
import math
import re

from haagenti.errors import DamagedError, FormatError, FragmentError
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.formats.safetensors import file_prefix, parse_header
from haagenti.formats.source import GGUF_EXT, ONNX_EXT, SAFETENSORS_EXT, TORCH_EXT, validate_file_name
from haagenti.formats.splice import SPLICED_FORMATS, Splice
from haagenti.hashing import content_hash, file_layout, model_hash, record_hasher
from haagenti.manifest import ModelManifest

FORMATS = ("safetensors", "torch", "verbatim", *SPLICED_FORMATS)
_ID = re.compile(r"[0-9a-f]{64}")


class LossyRestoreWarning(UserWarning):
    """A restored model is not byte-identical to its original: it was stored with lossy sharing."""


def lossy_summary(m: ModelManifest) -> str:
    """One line: which tensors of a lossy model differ from the original, and by how much."""
    lossy = m.lossy_tensors()
    names = ", ".join(list(lossy)[:3]) + (f" and {len(lossy) - 3} more" if len(lossy) > 3 else "")
    return (
        f"model {m.model_id!r} was stored lossy: {len(lossy)} tensor(s) ({names}) differ from the original "
        f"by at most {max(e['rel_l2_error'] for e in lossy.values()):.3g} relative L2 "
        f"(max abs error {max(e['max_abs_error'] for e in lossy.values()):.3g}); the files are not byte-identical"
    )


def check_file_name(name: object, where: str) -> str:
    """A restored file's name: a relative path of plain components that stays inside the
    output folder (formats.source.validate_file_name: the rule ingest applies)."""
    try:
        return validate_file_name(name, where)
    except FormatError:
        raise DamagedError(f"{where}: recorded file name {name!r} is not a plain file name or relative path inside the model's folder; refusing to restore") from None


def record_digest(m: ModelManifest, ingest_id: str, n_tensors: int, lossy: bool) -> str:
    """The digest of a model's record: its models row's trusted fields (id, publishing ingest,
    content hash, size, tensor count, lossy flag, every file's name, format, size, hash,
    header and layout) and every manifest row (tensor names, dtypes, shapes, files, fragment
    ids, offsets, counts, sources, errors), in order. Written in the models row at publication
    (the same commit) and checked before a reader trusts a name: fragments are verified by
    their ids and files by their layouts, and this verifies what names and places them.
    The family is left out: it is a label a later run may change (set_family)."""
    h = record_hasher()

    def put(value: object) -> None:
        data = json.dumps(value, separators=(",", ":")).encode()
        h.update(len(data).to_bytes(8, "little") + data)

    put([m.model_id, ingest_id, m.content_hash, int(m.raw_bytes), int(n_tensors), bool(lossy), len(m.files)])
    for f in m.files:
        put([f.name, f.format, int(f.size), f.blake3, content_hash(f.header), f.layout])
    for t in m.tensors:
        put([t.name, t.dtype, [int(s) for s in t.shape], int(t.file_index), t.fragment_type.value, [
            [r.fragment_id, int(r.elem_offset), int(r.elem_count), r.source_fragment_id, float(r.max_abs_error), float(r.rel_l2_error)]
            for r in t.fragments
        ]])
    return h.hexdigest()


def trusted_manifest(model: dict, rows) -> ModelManifest:
    """A model's manifest built from its models row and manifest rows, checked whole (each
    field as a restore needs it), then against the row's record digest."""
    where = f"model {model.get('model_id')!r}"
    try:
        m = ModelManifest.from_rows(model, rows)
        digest = record_digest(m, model["ingest_id"], model["n_tensors"], model["lossy"])
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a field of the wrong kind (a null shape, an unknown type)
        raise DamagedError(f"{where}: unreadable manifest record ({type(e).__name__}: {e})") from None
    check_manifest(m)
    if digest != model.get("record_digest"):
        raise DamagedError(f"{where}: its record does not match its digest (its files, names or fragment records were changed after publication)")
    return m


def check_manifest(m: ModelManifest) -> ModelManifest:
    """Raise DamagedError naming the first record of `m` that cannot be trusted."""
    where = f"model {m.model_id!r}"
    seen: set[str] = set()
    for f in m.files:
        check_file_name(f.name, where)
        if f.name.casefold() in seen:
            raise DamagedError(f"{where}: file name {f.name!r} is recorded twice")
        seen.add(f.name.casefold())
        if f.format not in FORMATS or not isinstance(f.size, int) or f.size < 0 or not isinstance(f.header, bytes):
            raise DamagedError(f"{where}: file {f.name!r} has an invalid record (format {f.format!r}, size {f.size!r})")
        if f.format not in _formats_named(f.name):  # ingest chose it by the name: a restore must not write another kind of file
            raise DamagedError(f"{where}: file {f.name!r} is recorded as {f.format}, which ingest never makes of a file of that name")
        if f.format == "verbatim" and len(f.header) != f.size:
            raise DamagedError(f"{where}: side file {f.name!r} holds {len(f.header)} bytes, its record says {f.size}")
    if m.content_hash != model_hash([f.blake3 for f in m.files]):
        raise DamagedError(f"{where}: its recorded content hash is not the hash of its files' hashes")
    per_file: list[dict[str, tuple[str, tuple[int, ...]]]] = [{} for _ in m.files]
    for t in m.tensors:
        tw = f"{where}, tensor {t.name!r}"
        if not isinstance(t.file_index, int) or not 0 <= t.file_index < len(m.files) or m.files[t.file_index].format == "verbatim":
            raise DamagedError(f"{tw}: recorded file index {t.file_index!r} names no model file")
        try:
            d = lookup_dtype(t.dtype)
        except FormatError as e:
            raise DamagedError(f"{tw}: {e}") from None
        if not all(isinstance(s, int) and s >= 0 for s in t.shape):
            raise DamagedError(f"{tw}: invalid recorded shape {t.shape!r}")
        if t.name in per_file[t.file_index]:
            raise DamagedError(f"{tw}: recorded twice")
        per_file[t.file_index][t.name] = (d.name, tuple(t.shape))
        if math.prod(t.shape) % d.block:
            raise DamagedError(f"{tw}: shape {list(t.shape)} is not whole blocks of {d.name}")
        offset = 0
        for r in t.fragments:
            if not (_ID.fullmatch(str(r.fragment_id)) and _ID.fullmatch(str(r.source_fragment_id))):
                raise DamagedError(f"{tw}: invalid fragment id in its record")
            if r.elem_offset != offset or not isinstance(r.elem_count, int) or r.elem_count <= 0:
                raise DamagedError(f"{tw}: fragment at element {r.elem_offset} (count {r.elem_count}) does not follow element {offset}")
            offset += r.elem_count
        if offset != math.prod(t.shape) // d.block:  # a quantized type's element is a block
            raise DamagedError(f"{tw}: fragments cover {offset} elements, shape {list(t.shape)} has {math.prod(t.shape) // d.block}")
    layouts: list[list[str]] = [[] for _ in m.files]
    for t in m.tensors:
        layouts[t.file_index].extend(r.source_fragment_id for r in t.fragments)  # the original's fragments (lossy refs too)
    for i, f in enumerate(m.files):
        if f.format != "torch" and file_layout(f.inline, layouts[i]) != f.layout:  # every reader, not only a restore, places by these records
            raise FragmentError(f"{where}: {f.name} does not match its recorded layout (fragments missing or out of order)")
        if f.format in SPLICED_FORMATS:
            _check_splice(m, i, where)
        if f.format != "safetensors":
            continue
        try:  # the header decides where each tensor's bytes go: it must describe the recorded tensors
            h = parse_header(io.BytesIO(file_prefix(f.header)), f.size, f"{where}, file {f.name!r}")
        except FormatError as e:
            raise DamagedError(f"recorded header: {e}") from None
        described = {e.name: (e.dtype.name, e.shape) for e in h.tensors}
        if described != per_file[i]:
            raise DamagedError(f"{where}, file {f.name!r}: its recorded header and tensor records disagree")
    return m


def _formats_named(name: str) -> tuple[str, ...]:
    """The formats ingest (formats.source.open_model) can record for a file of this name."""
    low = name.lower()
    for ext, fmt in ((SAFETENSORS_EXT, "safetensors"), (GGUF_EXT, "gguf"), (ONNX_EXT, "onnx")):
        if low.endswith(ext):
            return (fmt,)
    return ("onnx_data", "verbatim", *(("torch",) if low.endswith(TORCH_EXT) else ()))


def _check_splice(m: ModelManifest, i: int, where: str) -> None:
    """A spliced file's gaps and its tensors add up to its size, and each transposed tensor is
    the matrix its record says (the gaps decide where each tensor's bytes go)."""
    f = m.files[i]
    fw = f"{where}, file {f.name!r}"
    try:
        splice = Splice.unpack(f.header, fw)
    except FormatError as e:
        raise DamagedError(str(e)) from None
    tensors = [t for t in m.tensors if t.file_index == i]
    sizes = [math.prod(t.shape) // lookup_dtype(t.dtype).block * lookup_dtype(t.dtype).itemsize for t in tensors]
    if len(splice.gaps) > len(tensors) + 1 or sum(map(len, splice.gaps)) + sum(sizes) != f.size:
        raise DamagedError(f"{fw}: its recorded gaps and tensors do not add up to its {f.size} bytes")
    for k, (rows, cols, itemsize) in splice.transposed.items():
        t = tensors[k] if 0 <= k < len(tensors) else None
        if t is None or len(t.shape) != 2 or (cols, rows) != tuple(t.shape) or itemsize != lookup_dtype(t.dtype).itemsize:
            raise DamagedError(f"{fw}: a recorded transposed tensor does not match its tensor record")
