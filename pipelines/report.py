"""Run reports next to the library, for the catalog's owner and for downstream use:
report.html (one self-contained page: the run, a per-model table, the families, plots),
report.txt, report.json and report.parquet (the per-model table as a dataset)."""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
import posixpath
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq

from haagenti.config import LibraryStats
from haagenti.fsio import filesystem_for
from haagenti.library import FragmentLibrary
from haagenti.maintenance import model_relations
from pipelines.dedup import RunReport

HEATMAP = ("Each cell is the share of the row model's fragments that the column model also holds, "
           "identical or as the reference of a delta (1 on the diagonal); bright blocks are families, "
           "a dark row is a model that shares little with any other.")
PER_MODEL = pa.schema([
    ("model_id", pa.string()), ("family", pa.string()), ("raw_bytes", pa.int64()), ("stored_bytes_added", pa.int64()),
    ("disk_bytes_added", pa.int64()), ("reduction", pa.float64()), ("fragments", pa.int64()), ("closest_model", pa.string()), ("closest_share", pa.float64()),
    ("lossy", pa.bool_()), ("lossy_fragments", pa.int64()), ("library", pa.string()), ("report_time", pa.string()),
])


def write_report(lib: FragmentLibrary, run: RunReport, folder: str = "reports") -> dict[str, str]:
    """Write the run's report files into the library's `folder`; returns where each is."""
    stats = lib.stats()
    rel = model_relations(lib)
    when = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    rows = per_model_rows(lib, stats, rel, when, shown(lib.store.url))
    families = family_rows(stats)
    doc = {
        "time": when,
        "library": shown(lib.store.url),
        "run": asdict(run) | {"summary": run.summary()},
        "totals": {
            "models": stats.models, "fragments": stats.fragments, "raw_bytes": stats.raw_bytes, "stored_bytes": stats.stored_bytes,
            "disk_bytes": stats.disk_bytes, "reduction": stats.reduction, "delta_fragments": stats.delta_fragments, "shared_fragments": stats.shared_fragments,
        },
        "per_model": rows,
        "families": families,
        "similarity": {a["model_id"]: {b["model_id"]: rel.get((a["model_id"], b["model_id"]), 0.0) for b in rows if b is not a} for a in rows},
        "similarity_means": HEATMAP,
    }
    text = _text(doc)
    page = _html(doc, _plots(rows, rel))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=PER_MODEL), buf)
    fs, base = report_folder(lib.store.url, folder)
    fs.makedirs(base, exist_ok=True)
    out = {}
    for name, body in (("report.json", json.dumps(doc, indent=2, default=str).encode()), ("report.txt", text.encode()),
                       ("report.html", page.encode()), ("report.parquet", buf.getvalue())):
        with fs.open(posixpath.join(base, name), "wb") as f:
            f.write(body)
        out[name] = report_path(lib.store.url, name, folder)
    return out


def report_folder(library_url: str, folder: str = "reports"):
    """(filesystem, path) of the library's report folder."""
    fs, root = filesystem_for(library_url)
    return fs, posixpath.join(root, folder)


def shown(url: str) -> str:
    """A library or file as a user opens it: an absolute path when local, else its URL."""
    fs, path = filesystem_for(url)
    return path if "file" in fs.protocol else url


def report_path(library_url: str, name: str, folder: str = "reports") -> str:
    return posixpath.join(shown(library_url), folder, name)


def per_model_rows(lib: FragmentLibrary, stats: LibraryStats, rel: dict[tuple[str, str], float], when: str, library: str) -> list[dict]:
    """One row per model, in ingest order: its bytes, what it added to the library (the blobs of
    the fragments it was first to reference, and on disk those plus what its record keeps
    verbatim), and the model it shares most with."""
    lossy = {m["model_id"]: bool(m["lossy"]) for m in lib.models()}
    rows = []
    for m in stats.per_model:
        shares = {b: s for (a, b), s in rel.items() if a == m.model_id and s > 0}
        closest = max(shares, key=shares.get) if shares else None
        rows.append({
            "model_id": m.model_id, "family": m.family, "raw_bytes": m.raw_bytes, "stored_bytes_added": m.new_stored_bytes,
            "disk_bytes_added": m.disk_bytes, "reduction": m.reduction, "fragments": m.fragments, "closest_model": closest,
            "closest_share": shares[closest] if closest else 0.0, "lossy": lossy.get(m.model_id, False),
            "lossy_fragments": m.lossy_fragments, "library": library, "report_time": when,
        })
    return rows


def family_rows(stats: LibraryStats) -> list[dict]:
    """Each family's models and totals (models without a family: under None)."""
    out: dict[str | None, dict] = {}
    for m in stats.per_model:
        f = out.setdefault(m.family, {"family": m.family, "models": 0, "raw_bytes": 0, "stored_bytes_added": 0, "disk_bytes_added": 0})
        f["models"] += 1
        f["raw_bytes"] += m.raw_bytes
        f["stored_bytes_added"] += m.new_stored_bytes
        f["disk_bytes_added"] += m.disk_bytes
    for f in out.values():
        f["reduction"] = 1 - f["disk_bytes_added"] / f["raw_bytes"] if f["raw_bytes"] else 0.0
    return sorted(out.values(), key=lambda f: (f["family"] is None, f["family"] or ""))


def _text(doc: dict) -> str:
    t = doc["totals"]
    lines = [f"haagenti run report, {doc['time']}", f"library: {doc['library']}", f"run: {doc['run']['summary']}",
             f"library: {t['models']} models, {t['raw_bytes']:,} B raw -> {t['disk_bytes']:,} B on disk ({t['reduction']:.1%} saved)", ""]
    lines.append(f"  {'model':30s} {'family':12s} {'raw B':>14s} {'on disk B':>14s} {'reduction':>9s}  closest (share)  lossy")
    for r in doc["per_model"]:
        closest = _closest(r)
        lines.append(f"  {r['model_id']:30s} {r['family'] or '-':12s} {r['raw_bytes']:>14,} {r['disk_bytes_added']:>14,} "
                     f"{r['reduction']:>9.1%}  {closest}  {'yes' if r['lossy'] else 'no'}")
    lines.append("")
    for f in doc["families"]:
        lines.append(f"  family {f['family'] or '(none)'}: {f['models']} models, {f['raw_bytes']:,} B raw -> "
                     f"{f['disk_bytes_added']:,} B added on disk ({f['reduction']:.1%} saved)")
    lines += [f"  inferred family of {m}: {f or 'none (shares too little with any model)'}" for m, f in doc["run"]["inferred_families"].items()]
    return "\n".join(lines) + "\n"


def _closest(row: dict) -> str:
    return f"{row['closest_model']} ({row['closest_share']:.0%})" if row["closest_model"] else "-"


def _plots(rows: list[dict], rel: dict[tuple[str, str], float]) -> str:
    """The bar chart of reduction per model and the similarity map, as one base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = [r["model_id"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, max(4, 0.45 * len(models) + 1.5)))
    axes[0].barh(models, [r["reduction"] * 100 for r in rows], color=["C0" if r["family"] else "C3" for r in rows])
    axes[0].invert_yaxis()
    axes[0].set_xlabel("reduction of the bytes each model added (%)")
    axes[0].set_title("per model (red: no family)")
    grid = np.array([[1.0 if a == b else rel.get((a, b), 0.0) for b in models] for a in models])
    im = axes[1].imshow(grid, vmin=0, vmax=1, cmap="viridis")
    axes[1].set_xticks(range(len(models)), models, rotation=60, ha="right", fontsize=8)
    axes[1].set_yticks(range(len(models)), models, fontsize=8)
    axes[1].set_title("share of the row model's fragments held by the column model")
    fig.colorbar(im, ax=axes[1])
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


_STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}dt{font-weight:600;float:left;width:9em}
dd{margin:0 0 .2em 9em}img{max-width:100%}p.note{color:#555}"""


def _html(doc: dict, png: str) -> str:
    e = html.escape
    t = doc["totals"]
    model_rows = "".join(
        f"<tr><td>{e(r['model_id'])}</td><td>{e(r['family'] or '-')}</td><td class=n>{r['raw_bytes']:,}</td>"
        f"<td class=n>{r['disk_bytes_added']:,}</td><td class=n>{r['reduction']:.1%}</td><td class=n>{r['fragments']:,}</td>"
        f"<td>{e(_closest(r))}</td>"
        f"<td>{'yes' if r['lossy'] else 'no'}</td></tr>"
        for r in doc["per_model"]
    )
    family_rows_html = "".join(
        f"<tr><td>{e(f['family'] or '(none)')}</td><td class=n>{f['models']}</td><td class=n>{f['raw_bytes']:,}</td>"
        f"<td class=n>{f['disk_bytes_added']:,}</td><td class=n>{f['reduction']:.1%}</td></tr>"
        for f in doc["families"]
    )
    return (
        "<!doctype html><html lang=en><meta charset=utf-8><title>haagenti run report</title>"
        f"<style>{_STYLE}</style><h1>haagenti run report</h1>"
        f"<dl><dt>date</dt><dd>{e(doc['time'])}</dd><dt>library</dt><dd>{e(doc['library'])}</dd>"
        f"<dt>run</dt><dd>{doc['run']['seconds']:.1f} s: {e(doc['run']['summary'])}</dd>"
        f"<dt>library now</dt><dd>{t['models']} models, {t['raw_bytes']:,} B raw, {t['disk_bytes']:,} B on disk "
        f"({t['reduction']:.1%} saved)</dd></dl>"
        "<h2>Models</h2><p class=note>Added on disk: the fragments the model was the first (in ingest order) to "
        "reference, plus what its record keeps verbatim (headers, gaps, side files); reduction: 1 - that / raw. "
        "Closest: the model holding the largest share of its fragments.</p>"
        "<table id=per-model><thead><tr><th>model</th><th>family</th><th class=n>raw B</th><th class=n>added on disk B</th>"
        "<th class=n>reduction</th><th class=n>fragments</th><th>closest (share)</th><th>lossy</th></tr></thead>"
        f"<tbody>{model_rows}</tbody></table>"
        "<h2>Families</h2><table id=families><thead><tr><th>family</th><th class=n>models</th><th class=n>raw B</th>"
        f"<th class=n>added on disk B</th><th class=n>reduction</th></tr></thead><tbody>{family_rows_html}</tbody></table>"
        f"<h2>Plots</h2><p class=note>Left: reduction per model. Right: {e(HEATMAP)}</p>"
        f"<img alt='reduction per model and the model-by-model similarity map' src='data:image/png;base64,{png}'>"
        "<p class=note>The same per-model numbers: report.parquet and report.json beside this file.</p></html>"
    )
