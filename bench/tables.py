"""The library's tables as digests, for refactors that must not change what is stored: the
bench families ingested by both paths (library and pipeline) and in several orders, each
table's rows hashed in a canonical order.

    python bench/tables.py > before.json           # on the commit before
    python bench/tables.py --check before.json     # after: exit 1 on any difference

Columns that differ between two runs of the same code are left out: the writer's ingest id,
the digest that covers it, Delta data-file names (`ids.data_file`) and where the files were
read from (`models.source_uris`: temporary folders).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile

import pyarrow as pa
from common import example_family, master_export

from haagenti import exports as ex
from haagenti.config import LibraryConfig
from haagenti.examples import FamilyMember
from haagenti.library import FragmentLibrary, ModelInput
from haagenti.store import LibraryStore
from haagenti.store.schema import SCHEMAS
from pipelines.dedup import run_dedup
from pipelines.executors import LocalExecutor

PER_RUN = {"ingest_id", "record_digest", "data_file", "source_uris"}


def table_digests(root: str) -> dict[str, str]:
    store = LibraryStore(root)
    out = {}
    for name in store.present():
        cols = [c for c in SCHEMAS[name].names if c not in PER_RUN]
        t = store.read(name, columns=cols)
        sortable = [c for c in cols if not pa.types.is_nested(t.schema.field(c).type)]
        t = t.sort_by([(c, "ascending") for c in sortable])
        h = hashlib.blake2b(digest_size=16)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, t.schema) as w:
            w.write_table(t.combine_chunks())
        h.update(sink.getvalue().to_pybytes())
        out[name] = f"{t.num_rows}:{h.hexdigest()}"
    return out


def runs(members, catalog: str):
    """(label, build(root)) for every path and order measured (the pipeline's where the
    members have a catalog file)."""
    def together(ms):
        return lambda root: FragmentLibrary.open(root, LibraryConfig()).ingest_many([ModelInput([m.file], m.model_id, m.family) for m in ms])

    def one_by_one(ms):
        def build(root):
            for m in ms:
                FragmentLibrary.open(root, LibraryConfig()).ingest_many([ModelInput([m.file], m.model_id, m.family)])
        return build

    yield "library, catalog order", together(members)
    yield "library, reversed, one by one", one_by_one(list(reversed(members)))
    if catalog is not None:
        yield "pipeline", lambda root: run_dedup(catalog, root, LocalExecutor(), LibraryConfig())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", help="a JSON file written by an earlier run: exit 1 on any difference")
    args = ap.parse_args()
    members = example_family("family")
    catalog = members[0].file.rsplit("/", 1)[0] + "/catalog.yaml"
    exports_dir = tempfile.mkdtemp(prefix="haagenti-tables-exports-")
    try:
        return report(args, {"family": (members, catalog), "master export": (master_export(members), None),
                             "containers": (containers(members[0], exports_dir), None)})
    finally:
        shutil.rmtree(exports_dir, ignore_errors=True)


def without_stack_traces(path: str) -> None:
    """torch.onnx writes each node's Python stack trace (this checkout's and its venv's paths)
    into the node's metadata: emptied, so that any two checkouts export the same bytes."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.stack_trace":
                prop.value = ""
    onnx.save(model, path)


def containers(base, out_dir: str) -> list[FamilyMember]:
    """The family's base and its exports by the field's writers (GGUF F16 and Q8_0, ONNX, a
    sharded HF folder, a diffusers folder): every container format on the data's path."""
    paths = ex.export_all(base.file, out_dir)
    for p in paths:
        if p.endswith(".onnx"):
            without_stack_traces(p)
    return [base] + [FamilyMember(f"export-{i}", p, base.family, "") for i, p in enumerate(paths)]


def report(args, families) -> int:
    result: dict[str, dict[str, str]] = {}
    for fam, (ms, cat) in families.items():
        for label, build in runs(ms, cat):
            root = tempfile.mkdtemp(prefix="haagenti-tables-")
            try:
                build(root)
                result[f"{fam} / {label}"] = table_digests(root)
            finally:
                shutil.rmtree(root, ignore_errors=True)
    if not args.check:
        json.dump(result, sys.stdout, indent=1)
        print()
        return 0
    with open(args.check) as f:
        before = json.load(f)
    differ = [(run, t) for run in before.keys() | result.keys() for t in before.get(run, {}).keys() | result.get(run, {}).keys()
              if before.get(run, {}).get(t) != result.get(run, {}).get(t)]
    for run, t in sorted(differ):
        print(f"differs: {run}: {t}: {before.get(run, {}).get(t)} -> {result.get(run, {}).get(t)}")
    print("tables identical" if not differ else f"{len(differ)} table(s) differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
