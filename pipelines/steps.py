"""The pipeline's scan and cut steps: a catalog entry's content hash, and its fragment
occurrences as byte ranges (haagenti.ingest_steps.OCCURRENCE_SCHEMA, `data` null: the sign and
encode steps read the bytes where they run)."""
from __future__ import annotations

import pyarrow as pa

from haagenti.config import LibraryConfig
from haagenti.errors import FormatError
from haagenti.formats import container, open_model
from haagenti.hashing import model_hash
from haagenti.ingest import ModelCut, ModelInput, file_hashes, occurrence_table
from haagenti.manifest import ModelManifest
from pipelines.stamps import file_stamps


def scan_model(row: dict, fragment_elements: int) -> dict:
    """Content hash and file records of one catalog entry (reads its files once, cut as an
    ingest cuts them with `fragment_elements`: a file's hash is its tree over its fragment ids),
    and the files' stamps (pipelines.stamps). A row may carry `known`, the stamps of the model's
    files when last hashed, and `stored_hash`, its content hash in the library: when every file's
    stamp is as known and the known digests give that hash, the model is unchanged and none of
    its bytes are read (`file_records` None). Any other model is hashed whole, as the cut that
    follows reads every byte of it anyway."""
    stamps = file_stamps(list(row["files"]))
    known = row.get("known") or {}
    digests = [known[url][1] if stamp is not None and known.get(url, ("",))[0] == stamp else "" for url, stamp in stamps.items()]
    if row.get("stored_hash") and all(digests) and model_hash(digests) == row["stored_hash"]:
        return dict(row, content_hash=row["stored_hash"], file_records=None, stamps=_kept(stamps, digests))
    src = open_model(list(row["files"]))
    whole = next((f for f in src.files if not container(f.format).byte_exact), None)
    if whole is not None:  # its tensors are read whole, not as byte ranges of the file
        raise FormatError(f"model {row['model_id']!r}: the pipeline reads model files by byte range and {whole.name} is {container(whole.format).description}; ingest it with `haagenti ingest`")
    with src:
        records = [{"name": f.name, "format": f.format, "size": f.size, "file_hash": digest, "header": f.header, "url": f.url}
                   for f, digest in zip(src.files, file_hashes(src, fragment_elements))]
    content_hash = model_hash([r["file_hash"] for r in records])
    hashed = {r["url"]: r["file_hash"] for r in records}
    return dict(row, content_hash=content_hash, raw_bytes=src.raw_bytes, file_records=records,
                stamps=_kept(stamps, [hashed.get(url, "") for url in stamps]))


def _kept(stamps: dict[str, str | None], digests: list[str]) -> dict[str, tuple[str, str]]:
    """The stamps worth keeping: url -> (stamp, digest) of each stamped, hashed file."""
    return {url: (stamp, d) for (url, stamp), d in zip(stamps.items(), digests) if stamp is not None and d}


class FragmentModel:
    """One scanned model cut (haagenti.ingest.ModelCut): its manifest and one row per fragment
    occurrence (id, byte range). The bytes cut must be those the scan hashed."""

    def __init__(self, config: LibraryConfig):
        self.config = config

    def __call__(self, row: dict) -> tuple[ModelManifest, pa.Table]:
        with open_model(list(row["files"])) as src:  # as scanned: a folder's files keep their relative names
            cut = ModelCut(ModelInput(list(row["files"]), row["model_id"], row["family"]), src, self.config.fragment_elements, self.config.file_blake3)
            table = occurrence_table(row["rank"], cut, carry=False)
            manifest = cut.manifest([r["file_hash"] for r in row["file_records"]])
        return manifest, table
