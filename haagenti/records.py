"""Records read from a library are untrusted input: anyone who can write to a shared bucket
can write them. A manifest is checked whole before a restore writes a byte: file names stay
inside the output folder, every count, offset and length agrees with the file's own header."""
from __future__ import annotations

import json
import math
import re

from haagenti.errors import DamagedError, FormatError, FragmentError
from haagenti.formats.dtypes import dtype as lookup_dtype
from haagenti.formats.registry import CONTAINERS, container, formats_named
from haagenti.formats.source import validate_file_name
from haagenti.hashing import content_hash, model_hash, record_hasher
from haagenti.manifest import FileRecord, ModelManifest, TensorRef

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
        if not isinstance(f.format, str) or f.format not in CONTAINERS or not isinstance(f.size, int) or f.size < 0 or not isinstance(f.header, bytes):
            raise DamagedError(f"{where}: file {f.name!r} has an invalid record (format {f.format!r}, size {f.size!r})")
        if f.format not in formats_named(f.name):  # ingest chose it by the name: a restore must not write another kind of file
            raise DamagedError(f"{where}: file {f.name!r} is recorded as {f.format}, which ingest never makes of a file of that name")
        container(f.format).check_file(f, where)
    if m.content_hash != model_hash([f.identity for f in m.files]):
        raise DamagedError(f"{where}: its recorded content hash is not the hash of its files' hashes")
    named: list[set[str]] = [set() for _ in m.files]
    for t in m.tensors:
        tw = f"{where}, tensor {t.name!r}"
        if not isinstance(t.file_index, int) or not 0 <= t.file_index < len(m.files) or not container(m.files[t.file_index].format).holds_tensors:
            raise DamagedError(f"{tw}: recorded file index {t.file_index!r} names no model file")
        try:
            d = lookup_dtype(t.dtype)
        except FormatError as e:
            raise DamagedError(f"{tw}: {e}") from None
        if not all(isinstance(s, int) and s >= 0 for s in t.shape):
            raise DamagedError(f"{tw}: invalid recorded shape {t.shape!r}")
        if t.name in named[t.file_index]:
            raise DamagedError(f"{tw}: recorded twice")
        named[t.file_index].add(t.name)
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
    for f, tensors in zip(m.files, m.file_tensors()):
        fmt = container(f.format)
        layout = [r.source_fragment_id for t in tensors for r in t.fragments]  # the original's fragments (lossy refs too)
        if fmt.byte_exact and _tree(f, tensors, layout) != f.layout:  # every reader, not only a restore, places by these records
            raise FragmentError(f"{where}: {f.name} does not match its recorded layout (fragments missing or out of order)")
        fmt.check_record(f, tensors, where)
    return m


def _tree(f: FileRecord, tensors: list[TensorRef], layout: list[str]) -> str | None:
    """The tree of a file's record with these fragment ids; None where its gaps cannot be read
    (check_record then says what is damaged)."""
    try:
        return f.tree([len(t.fragments) for t in tensors], layout)
    except FormatError:
        return None
