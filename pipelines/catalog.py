"""Model catalogs: YAML or Parquet, read through fsspec.

YAML:
    models:
      - id: org/base            # model id (validated)
        family: sdxl            # optional; inferred from the similarity index when missing
        files: [s3://bucket/base/model.safetensors]   # files or HF-style folders
        revision: main          # optional, recorded only
Parquet: columns id, family, files (list<string>), revision.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow.parquet as pq
import yaml

from haagenti.errors import HaagentiError
from haagenti.fsio import filesystem_for
from haagenti.manifest import validate_model_id


class CatalogError(HaagentiError):
    """The catalog is malformed."""


@dataclass(frozen=True)
class CatalogEntry:
    model_id: str
    files: tuple[str, ...]
    family: str | None = None
    revision: str | None = None
    rank: int = 0  # position in the catalog: the order that decides which fragment is a reference

    def as_row(self) -> dict:
        return {"model_id": self.model_id, "files": list(self.files), "family": self.family, "revision": self.revision, "rank": self.rank}


@dataclass
class Catalog:
    entries: list[CatalogEntry] = field(default_factory=list)


def read_catalog(url: str) -> Catalog:
    fs, path = filesystem_for(url)
    if not fs.exists(path):
        raise CatalogError(f"{url}: catalog not found")
    if path.endswith(".parquet"):
        with fs.open(path, "rb") as f:
            records = pq.read_table(f).to_pylist()
    else:
        with fs.open(path, "r") as f:
            try:
                doc = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise CatalogError(f"{url}: not valid YAML ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
            raise CatalogError(f"{url}: expected a mapping with a 'models' list")
        records = doc["models"]
    entries, seen = [], set()
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "id" not in r or not r.get("files"):
            raise CatalogError(f"{url}: entry {i} needs 'id' and 'files'")
        mid = validate_model_id(str(r["id"]))
        if mid in seen:
            raise CatalogError(f"{url}: model id {mid!r} appears twice")
        seen.add(mid)
        files = r["files"] if isinstance(r["files"], list) else [r["files"]]
        entries.append(CatalogEntry(mid, tuple(str(f) for f in files), r.get("family"), r.get("revision"), i))
    return Catalog(entries)
