"""Run reports next to the library: report.json, report.txt and report.html (with plots of
reduction per model and family and a model-by-model similarity map)."""
from __future__ import annotations

import base64
import io
import json
import posixpath
from dataclasses import asdict

from haagenti.fsio import filesystem_for
from haagenti.library import FragmentLibrary
from haagenti.maintenance import model_relations
from pipelines.dedup import RunReport


def write_report(lib: FragmentLibrary, run: RunReport, folder: str = "reports") -> dict[str, str]:
    stats = lib.stats()
    models = [m.model_id for m in stats.per_model]
    rel = model_relations(lib)
    doc = {
        "run": asdict(run) | {"summary": run.summary()},
        "library": {
            "models": stats.models, "fragments": stats.fragments, "raw_bytes": stats.raw_bytes, "stored_bytes": stats.stored_bytes,
            "reduction": stats.reduction, "delta_fragments": stats.delta_fragments, "shared_fragments": stats.shared_fragments,
        },
        "per_model": [asdict(m) | {"reduction": m.reduction} for m in stats.per_model],
        "per_family": stats.per_family,
        "similarity": {a: {b: rel.get((a, b), 0.0) for b in models if b != a} for a in models},
    }
    lines = [run.summary(), f"library: {stats.models} models, {stats.raw_bytes:,} B raw -> {stats.stored_bytes:,} B ({stats.reduction:.1%} saved)"]
    lines += [f"  {m.model_id:28s} {m.family or '-':12s} {m.reduction:6.1%}" for m in stats.per_model]
    lines += [f"  family {f}: {r:.1%}" for f, r in stats.per_family.items()]
    lines += [f"  inferred family of {m}: {f or 'none (shares too little with any model)'}" for m, f in run.inferred_families.items()]
    text = "\n".join(lines) + "\n"
    html = _html(text, models, stats, rel)
    fs, root = filesystem_for(lib.store.url)
    base = posixpath.join(root, folder)
    fs.makedirs(base, exist_ok=True)
    out = {}
    for name, body in (("report.json", json.dumps(doc, indent=2, default=str)), ("report.txt", text), ("report.html", html)):
        with fs.open(posixpath.join(base, name), "w") as f:
            f.write(body)
        out[name] = posixpath.join(lib.store.url, folder, name)
    return out


def _html(text: str, models: list[str], stats, rel) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(13, max(4, 0.45 * len(models) + 1.5)))
    axes[0].barh(models, [m.reduction * 100 for m in stats.per_model], color=["C0" if m.family else "C3" for m in stats.per_model])
    axes[0].invert_yaxis()
    axes[0].set_xlabel("reduction of the bytes each model added (%)")
    axes[0].set_title("per model (red: no family)")
    grid = np.array([[1.0 if a == b else max(rel.get((a, b), 0.0), rel.get((b, a), 0.0)) for b in models] for a in models])
    im = axes[1].imshow(grid, vmin=0, vmax=1, cmap="viridis")
    axes[1].set_xticks(range(len(models)), models, rotation=60, ha="right", fontsize=8)
    axes[1].set_yticks(range(len(models)), models, fontsize=8)
    axes[1].set_title("share of fragments shared or delta-referenced")
    fig.colorbar(im, ax=axes[1])
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    img = base64.b64encode(buf.getvalue()).decode()
    fam = "".join(f"<li>{f}: {r:.1%}</li>" for f, r in stats.per_family.items())
    return (
        "<!doctype html><meta charset='utf-8'><title>haagenti run report</title>"
        f"<h1>haagenti run report</h1><pre>{text}</pre><h2>Families</h2><ul>{fam}</ul>"
        f"<img alt='reduction per model and similarity map' src='data:image/png;base64,{img}'>"
    )
