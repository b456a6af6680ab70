"""Project-shape checks: the library never imports Ray, and its tables read without haagenti."""
import subprocess
import sys

from haagenti.config import LibraryConfig
from haagenti.library import FragmentLibrary


def test_library_package_does_not_import_ray():
    code = (
        "import sys, haagenti.prelude, haagenti.cli, haagenti.adaptive, haagenti.adaptive.evaluate, haagenti.adaptive.tiers, haagenti.examples;"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tables_read_with_polars_duckdb_and_pyarrow(tmp_path, family):
    import duckdb
    import polars as pl
    from deltalake import DeltaTable

    url = str(tmp_path / "lib")
    lib = FragmentLibrary.open(url, LibraryConfig(fragment_size=64 * 1024))
    for m in family[:2]:
        lib.ingest([m.file], m.model_id, m.family)
    models = pl.read_delta(f"{url}/models")
    assert sorted(models["model_id"].to_list()) == sorted(m.model_id for m in family[:2])
    manifests = DeltaTable(f"{url}/manifests").to_pyarrow_table()
    per_model = duckdb.sql("select model_id, count(distinct fragment_id) as n from manifests group by model_id order by model_id").fetchall()
    assert [r[0] for r in per_model] == sorted(m.model_id for m in family[:2]) and all(r[1] > 0 for r in per_model)
    frags = DeltaTable(f"{url}/fragments").to_pyarrow_table(columns=["fragment_id", "encoding", "stored_size"])
    assert set(frags["encoding"].to_pylist()) <= {"plain", "delta_xor", "delta_sub"}
