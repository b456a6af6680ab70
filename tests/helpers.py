"""Small helpers shared by tests."""
from __future__ import annotations

import hashlib

import pyarrow.parquet as pq


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def table_versions(lib) -> dict[str, int]:
    return lib.store.versions()



def spy_fetched(lib, monkeypatch) -> set[str]:
    """The ids of the fragments the library reads from its store from now on (filled as it reads)."""
    seen: set[str] = set()
    real = lib.store.read_fragments

    def spy(ids, *a, **k):
        t = real(ids, *a, **k)
        seen.update(t["fragment_id"].to_pylist())
        return t

    monkeypatch.setattr(lib.store, "read_fragments", spy)
    return seen


def verbatim_ids(lib, model_id: str) -> set[str]:
    """The ids of the pieces of the model's files' verbatim bytes (every read of its record fetches them)."""
    from haagenti.manifest import read_header_field

    return {i for f in lib.model(model_id)["files"] for i in read_header_field(f["header"], model_id)[1]}


def library_with_one_model(path: str):
    """A library holding one small safetensors model, "good" (bad-input tests check it is untouched)."""
    import torch
    from safetensors.torch import save_file

    from haagenti.library import FragmentLibrary

    lib = FragmentLibrary.open(f"{path}/lib")
    save_file({"w": torch.randn(64, 64)}, f"{path}/good.safetensors")
    lib.ingest([f"{path}/good.safetensors"], "good")
    return lib


def restore_counting_reads(lib, model_id: str, out: str, monkeypatch) -> tuple[set[str], dict[str, int]]:
    """Restore a model; returns the fragment ids it fetched and the Parquet rows it read from
    each table (by row groups: the table of the data file opened last)."""
    from haagenti.store.files import DataFiles

    rows_read: dict[str, int] = {}
    opened = [""]
    seen = spy_fetched(lib, monkeypatch)

    def spy_open(self, path):
        opened[0] = path.rstrip("/").split("/")[-2]
        return real_open(self, path)

    def count_rows(self, *a, **k):
        t = real_groups(self, *a, **k)
        rows_read[opened[0]] = rows_read.get(opened[0], 0) + t.num_rows
        return t

    real_open, real_groups = DataFiles.open, pq.ParquetFile.read_row_groups
    monkeypatch.setattr(DataFiles, "open", spy_open)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", count_rows)
    lib.restore(model_id, out)
    monkeypatch.undo()
    return seen, rows_read


def cli(*args: str):
    """The `haagenti` command line in this process (typer's CliRunner): (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from haagenti.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception  # a traceback the user would have seen
    return r.exit_code, r.stdout, r.stderr


def tree_digest(root) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` ({} when it does not exist)."""
    import os

    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = sha256(p)
    return out


def model_file(path, seed=0, n=3, scale=0.0, base_seed=None):
    """A small bf16 model file; with `base_seed`, the base model's weights plus `scale` noise."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(base_seed if base_seed is not None else seed)
    state = {f"layers.{i}.mlp.weight": torch.randn(128, 512, generator=g) for i in range(n)}
    if scale:
        noise = torch.Generator().manual_seed(seed + 100)
        state = {k: v + scale * torch.randn(v.shape, generator=noise) for k, v in state.items()}
    save_file({k: v.bfloat16() for k, v in state.items()}, str(path))
    return str(path)


def reseal(lib, model_id: str) -> None:
    """Rewrite a model's record digest to match its (tampered) record: a tamperer who knows the
    scheme, so that the checks behind the digest (layouts, fragment ids) are what must catch it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from haagenti.manifest import ModelManifest
    from haagenti.records import record_digest

    t = lib.store.read("models", equals=("model_id", model_id))
    [row] = t.to_pylist()
    rows = lib.store.read("manifests", equals=("model_id", model_id))
    m = ModelManifest.from_rows(lib.with_verbatim(row), rows.filter(pc.equal(rows["ingest_id"], row["ingest_id"])))
    row["record_digest"] = record_digest(m, row["ingest_id"], row["n_tensors"], row["lossy"])
    lib.store.delete("models", f"model_id = '{model_id}'")
    lib.store.append("models", pa.Table.from_pylist([row], schema=t.schema))
