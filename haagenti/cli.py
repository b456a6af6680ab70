"""The `haagenti` command line (typer). Errors print one line and exit 1."""
from __future__ import annotations

import contextlib
import importlib.abc
import json
import os
import sys
import warnings
from dataclasses import asdict
from typing import Optional

import pyarrow as pa
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TransferSpeedColumn
from rich.measure import Measurement
from rich.table import Table

from haagenti.codecs import DENSE, PLANES
from haagenti.config import LibraryConfig
from haagenti.errors import HaagentiError, MissingExtraError, UnknownModelError
from haagenti.formats.registry import CONTAINERS
from haagenti.library import FragmentLibrary, ModelInput
from haagenti.manifest import validate_model_id
from haagenti.records import LossyRestoreWarning

# Plain help (rich_markup_mode=None): typer's rich panels label every flag with its type
# (`--each <bool>`); click's own help prints flags as flags.
HELP = {"rich_markup_mode": None}
app = typer.Typer(help="Deduplicate model catalogs into a fragment library and restore them bit-exact.", no_args_is_help=True, **HELP)
examples_app = typer.Typer(help="Example model families, made by training.", no_args_is_help=True, **HELP)
app.add_typer(examples_app, name="examples")
schedule_app = typer.Typer(help="Adaptive precision schedules for diffusion sampling.", **HELP)
app.add_typer(schedule_app, name="schedule")
tier_app = typer.Typer(help="Precision tiers (int8, int6, int5, int4) of stored models.", no_args_is_help=True, **HELP)
app.add_typer(tier_app, name="tier")
console = Console(stderr=True)
out = Console()


def _fail(e: Exception, library: str | None = None) -> None:
    hint = f"; `haagenti list {library}` lists the models it holds" if isinstance(e, UnknownModelError) and library else ""
    console.print(f"[red]error:[/red] {escape(str(e))}{escape(hint)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _config(fragment_size: Optional[int], lossy_threshold: Optional[float], similarity: bool = True, index: Optional[str] = None,
            file_blake3: bool = False, dense_quantized: bool = False) -> LibraryConfig:
    return LibraryConfig(fragment_size=fragment_size, lossy_threshold=lossy_threshold, similarity=similarity, index=index, file_blake3=file_blake3,
                         zstd_level=DENSE if dense_quantized else PLANES)


FILE_BLAKE3_HELP = ("also record each file's plain BLAKE3 (`b3sum`'s), computed as the file is cut, to compare with published "
                    "checksums; verify and restore --rehash then check it too. A file is identified by a tree over its fragment ids either way")
DENSE_HELP = ("also range-code quantized GGUF blocks (Q8_0, Q4_0/1, Q5_0/1, MXFP4) where that is smaller: 1-1.6 points more "
              "saved on such files, for ~2-3x the ingest and restore time")
INDEX_HELP = "index layout of a new library: bands (default) or two-level; an existing library keeps its own"


FORMATS = ", ".join(f"{f.description.split(' ', 1)[1]}s ({' '.join(f.extensions)})" for f in CONTAINERS.values() if f.holds_tensors and f.extensions) + \
    ", their external data, and Hugging Face or diffusers folders of them"  # the registered container formats


@app.command(help=f"""Add one model (all its files) to LIBRARY, or with --each one model per file.

Reads {FORMATS}. Several weight files that are not shards of one file, or a folder that is no
Hugging Face or diffusers folder, become one model only with --model-id. The same files again
under a stored id are a no-op ("nothing to do"); other files under it need --replace.""")
def ingest(
    library: str,
    files: list[str] = typer.Argument(..., help="model files or folders (any fsspec URL)"),
    model_id: Optional[str] = typer.Option(None, "--model-id", help="the model's id (default: the first file's name without its extension)"),
    family: Optional[str] = typer.Option(None, "--family", help="the family the model belongs to (stats and reports total per family)"),
    each: bool = typer.Option(False, "--each", help="each FILE is its own model (id = its name without the extension), all added in one set of commits"),
    replace: bool = typer.Option(False, "--replace", help="replace a model stored under the same id with other bytes"),
    fragment_size: Optional[int] = typer.Option(None, help="bytes per fragment of a 16-bit tensor, for a new library (default 262144); an existing library keeps its own"),
    lossy_threshold: Optional[float] = typer.Option(None, "--lossy-threshold", help="opt in to lossy sharing up to this relative L2 error"),
    no_similarity: bool = typer.Option(False, "--no-similarity", help="exact dedup only (no deltas)"),
    threads: int = typer.Option(0, "--threads", min=0, help="threads reading, hashing, signing and encoding (0: every core)"),
    index: Optional[str] = typer.Option(None, "--index", help=INDEX_HELP),
    file_blake3: bool = typer.Option(False, "--file-blake3", help=FILE_BLAKE3_HELP),
    dense_quantized: bool = typer.Option(False, "--dense-quantized", help=DENSE_HELP),
) -> None:
    from haagenti.formats import open_model
    from haagenti.formats.source import grouping_doubt

    before: set[str] | None = None  # ingests published before this one (None: no library opened yet)
    try:
        if each and model_id:
            raise ValueError("--model-id names one model; with --each ids come from the file names")
        groups = [[f] for f in files] if each else [files]
        models = [ModelInput(g, model_id or _stem(g[0]), family) for g in groups]
        for m in models if model_id is None else []:
            doubt = grouping_doubt(m.urls)
            if doubt:
                raise ValueError(f"{doubt} would become one model {m.model_id!r}; give --model-id {m.model_id} to store them as one model"
                                 + ("" if each else ", or --each for one model per file"))
        total = sum(open_model(m.urls).raw_bytes for m in models)  # every file is checked before a library is made
        lib = FragmentLibrary.open(library, _config(fragment_size, lossy_threshold, not no_similarity, index, file_blake3, dense_quantized))
        before = {m["ingest_id"] for m in lib.models()}
        disk_before = sum(lib.store.disk_bytes().values())
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console, transient=True) as bar:
            label = models[0].model_id if len(models) == 1 else f"{len(models)} models"
            task = bar.add_task(f"ingest {label}", total=total)
            reports = lib.ingest_many(models, progress=lambda n: bar.advance(task, n), threads=threads, replace=replace)
        for r in reports:
            if r.unchanged:
                out.print(f"nothing to do: {r.model_id} is in the library with the same bytes", highlight=False)
                continue
            out.print(
                f"ingested {r.model_id}: {r.fragments} fragments ({r.exact} exact, {r.delta} delta, {r.plain} plain, {r.lossy} lossy), "
                f"{r.raw_bytes:,} B -> {r.stored_bytes:,} B new ({r.reduction:.1%} saved) in {r.seconds:.2f}s", highlight=False, markup=False, soft_wrap=True
            )
            if r.nonfinite_tensors:
                console.print(f"[yellow]warning:[/yellow] {r.model_id}: NaN/Inf values stored bit-exact in {len(r.nonfinite_tensors)} tensor(s): {', '.join(r.nonfinite_tensors[:5])}")
        raw = sum(r.raw_bytes for r in reports if not r.unchanged)
        if raw:
            added = sum(lib.store.disk_bytes().values()) - disk_before
            out.print(f"the library grew by {added:,} B on disk ({1 - added / raw:.1%} saved on {raw:,} B)", highlight=False)
    except KeyboardInterrupt:
        console.print(_interrupted(library, before), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(130)
    except (HaagentiError, ValueError, OSError) as e:
        _fail(e)


def _interrupted(library: str, before: set[str] | None) -> str:
    """What an ingest stopped by Ctrl-C left: what it published (nothing, unless the stop came
    after its last commit) and the bytes of fragments no model references, which gc frees."""
    if before is None:  # stopped while checking the files, before the library was read
        return "interrupted; nothing was published"
    try:
        lib = FragmentLibrary.open(library, create=False)
        published = [m["model_id"] for m in lib.models() if m["ingest_id"] not in before]
        left = lib.stats().unreferenced_bytes
    except (HaagentiError, OSError) as e:
        return f"interrupted; the library could not be read afterwards: {e}"
    said = f"interrupted after publishing {', '.join(published)}" if published else "interrupted; nothing was published"
    return said + (f"; `haagenti gc {library}` frees {left:,} B" if left else "")


def _stem(url: str) -> str:
    """A model id from a file or folder name: only a known model-file extension is cut
    (`v0.1-alex.safetensors` -> `v0.1-alex`, `model-int8.onnx` -> `model-int8`)."""
    from haagenti.formats.source import strip_model_ext

    return strip_model_ext(url.rstrip("/").rsplit("/", 1)[-1])


@contextlib.contextmanager
def _stages(label: str, stages: tuple[str, ...]):
    """A bar over named stages on stderr; yields the callback to call with each stage's name as
    it ends (work of minutes shows where it is, and a line per stage stays in the log)."""
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(f"{label} {stages[0]}", total=len(stages))

        def ended(stage: str) -> None:
            i = stages.index(stage) + 1
            bar.update(task, completed=i, description=f"{label} {stages[i]}" if i < len(stages) else f"{label} done")
            console.print(f"{label} {stage} done", highlight=False)

        yield ended


@app.command()
def restore(
    library: str,
    model: str,
    out_dir: str,
    rehash: bool = typer.Option(False, "--rehash", help="Also re-hash every restored byte against the file's recorded BLAKE3 (fragments and layout are always checked)."),
    force: bool = typer.Option(False, "--force", help="overwrite files already in OUT_DIR"),
    threads: int = typer.Option(0, "--threads", min=0, help="threads reading, decoding and verifying (0: every core)"),
) -> None:
    """Write MODEL's files into OUT_DIR (safetensors byte-identical unless stored lossy, which it says)."""
    try:
        validate_model_id(model)  # a traversal id is refused whatever the library holds
        with warnings.catch_warnings(record=True, action="always", category=LossyRestoreWarning) as said:
            paths = FragmentLibrary.open(library, create=False).restore(model, out_dir, rehash, force, threads)
        for w in said:  # a lossy model says so on every restore, on stderr
            console.print(f"[yellow]warning:[/yellow] {w.message}", highlight=False, soft_wrap=True)
        out.print(f"restored {model}: {', '.join(paths)}")
    except (HaagentiError, OSError) as e:
        _fail(e, library)


@app.command("list")
def list_models(library: str) -> None:
    """The models in LIBRARY, in ingest order: id (in full), family, files, raw bytes."""
    try:
        models = FragmentLibrary.open(library, create=False).models()
    except (HaagentiError, OSError) as e:
        _fail(e)
        return
    if not models:
        out.print(f"no models in {library}", highlight=False, markup=False)
    width = max((len(m["model_id"]) for m in models), default=0)
    fam = max((len(m["family"] or "-") for m in models), default=0)
    for m in models:
        lossy = "  lossy" if m["lossy"] else ""
        out.print(f"{m['model_id']:<{width}}  {m['family'] or '-':<{fam}}  {len(m['files']):>3} file(s)  {m['raw_bytes']:>15,} B{lossy}",
                  highlight=False, markup=False, soft_wrap=True)


app.command("ls", help="The same as list.")(list_models)


@app.command()
def stats(library: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Fragments, bytes and reduction, per model and per family."""
    try:
        s = FragmentLibrary.open(library, create=False).stats()
    except (HaagentiError, OSError) as e:
        _fail(e)
        return
    if as_json:
        d = asdict(s)
        d.update(saved_bytes=s.saved_bytes, reduction=s.reduction, stored_reduction=s.stored_reduction)
        for m, row in zip(s.per_model, d["per_model"]):
            row["reduction"] = m.reduction
        out.print_json(json.dumps(d))
        return
    out.print(
        f"{s.models} models, {s.fragments} fragments ({s.plain_fragments} plain, {s.delta_fragments} delta"
        + (f", of which {s.predicted_fragments} quantized blocks predicted from a float source" if s.predicted_fragments else "") + "), "
        f"{s.raw_bytes:,} B raw -> {s.disk_bytes:,} B on disk: {s.reduction:.1%} saved (lossless"
        + (f"; {s.lossy_refs} lossy refs saved a further {s.lossy_saved_bytes:,} B" if s.lossy_refs else "")
        + f"); {s.shared_fragments} shared fragments, {s.refs_per_shared_fragment:.2f} models each"
        + (f"; {s.unreferenced_fragments} other fragments, {s.unreferenced_bytes:,} B, no model references (gc frees them)" if s.unreferenced_fragments else ""),
        highlight=False, soft_wrap=True,
    )
    out.print("on disk: " + ", ".join(f"{part} {n:,} B" for part, n in s.disk_by_part.items())
              + f" (fragment blobs {s.stored_bytes:,} B: {s.stored_reduction:.1%} saved)", soft_wrap=True)
    t = Table("model", "family", "raw B", "new stored B", "on disk B", "reduction", "lossy refs")
    for m in s.per_model:
        t.add_row(m.model_id, m.family or "-", f"{m.raw_bytes:,}", f"{m.new_stored_bytes:,}", f"{m.disk_bytes:,}", f"{m.reduction:.1%}", str(m.lossy_fragments))
    # At its natural width: a console narrower than the table (80 columns when not a terminal)
    # would cut figures and ids.
    need = Measurement.get(out, out.options.update_width(1 << 16), t).maximum
    (out if need <= out.width else Console(width=need)).print(t)
    for fam, red in s.per_family.items():
        out.print(f"family {fam}: {red:.1%} reduction")


@app.command()
def verify(library: str, model: Optional[str] = typer.Argument(None)) -> None:
    """Re-hash every fragment (or one model's) and every restored file."""
    try:
        lib = FragmentLibrary.open(library, create=False)
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console, transient=True) as bar:
            tasks: dict[str, int] = {}

            def progress(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = bar.add_task(f"verify {phase}", total=total)
                bar.update(tasks[phase], completed=done)

            r = lib.verify(model, progress)
    except (HaagentiError, OSError) as e:
        _fail(e, library)
        return
    for name, err in r.lossy_tensors.items():
        out.print(f"lossy {name}: {err['fragments']} fragment(s), max abs error {err['max_abs_error']:.3g}, relative L2 {err['rel_l2_error']:.3g}")
    if not r.ok:
        for e in r.errors:
            console.print(f"[red]error:[/red] {e}", soft_wrap=True)
        raise typer.Exit(1)
    out.print(f"ok: {r.fragments_checked} fragments, {r.models_checked} models, {r.files_checked} files verified")
    if r.unpublished_manifests:
        out.print(f"note: {r.unpublished_manifests} manifest(s) of interrupted ingests are ignored; gc removes them")


@app.command()
def rm(library: str, model: str) -> None:
    """Remove MODEL from the catalogue (run gc to free its fragments)."""
    try:
        FragmentLibrary.open(library, create=False).rm(model)
        out.print(f"removed {model}")
    except (HaagentiError, OSError) as e:
        _fail(e, library)


@app.command()
def gc(library: str, wait: float = typer.Option(0.0, "--wait", help="seconds to wait for running writers (ingests, rm) to finish")) -> None:
    """Delete fragments no model references (refused while another writer runs)."""
    try:
        from haagenti.maintenance import gc_line

        out.print(gc_line(FragmentLibrary.open(library, create=False).gc(wait)))
    except (HaagentiError, OSError) as e:
        _fail(e)


@app.command()
def upgrade(library: str) -> None:
    """Move a format-4 to 8 library to this haagenti's format in place (record digests, verbatim pieces; docs/format.md)."""
    from haagenti.maintenance import upgrade as upgrade_library
    from haagenti.store import LIBRARY_FORMAT_VERSION

    try:
        failed = upgrade_library(library)
        for line in failed:
            console.print(f"[yellow]warning:[/yellow] {line}", highlight=False, soft_wrap=True)
        out.print(f"{library}: library format {LIBRARY_FORMAT_VERSION}{f' ({len(failed)} model(s) left unverifiable)' if failed else ''}", soft_wrap=True)
    except (HaagentiError, OSError) as e:
        _fail(e)


@app.command()
def dedup(
    catalog: str,
    library: str = typer.Option(..., "--library", help="library URL (local path, s3://, gs://)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)"),
    executor: str = typer.Option("ray", help="ray or local"),
    workers: Optional[int] = typer.Option(None, help="CPU step actors on Ray (default: one per cluster CPU), threads with --executor local (default 1)"),
    prune: bool = typer.Option(False, help="remove models no longer in the catalog"),
    index: Optional[str] = typer.Option(None, "--index", help=INDEX_HELP),
    rehash: bool = typer.Option(False, "--rehash", help="hash every catalog file, trusting no stamp (size and mtime, or ETag) kept by the last run"),
    file_blake3: bool = typer.Option(False, "--file-blake3", help=FILE_BLAKE3_HELP),
    dense_quantized: bool = typer.Option(False, "--dense-quantized", help=DENSE_HELP),
) -> None:
    """Deduplicate a whole CATALOG into the library with the Ray pipeline (jobs.dedup)."""
    from jobs.dedup import main as dedup_main  # the pipeline layer, imported only for this command

    argv = ["--catalog", catalog, "--library", library, "--executor", executor] + (["--address", address] if address else [])
    argv += (["--workers", str(workers)] if workers else []) + (["--prune"] if prune else []) + (["--index", index] if index else []) + (["--rehash"] if rehash else [])
    argv += (["--file-blake3"] if file_blake3 else []) + (["--dense-quantized"] if dense_quantized else [])
    from pipelines.dedup import STAGES

    with _stages("dedup:", STAGES) as ended:
        code = dedup_main(argv, progress=ended)
    raise typer.Exit(code)


@tier_app.command("add")
def tier_add(library: str, model: str, precision: str = typer.Argument(..., help="int8, int6, int5 or int4")) -> None:
    """Store MODEL again at PRECISION as the tier model MODEL.PRECISION (read by tiers.load_model)."""
    from haagenti.adaptive.precision import AdaptiveError
    from haagenti.adaptive.tiers import add_tier

    try:
        r = add_tier(FragmentLibrary.open(library, create=False), model, precision)
        out.print(f"added tier {r.model_id}: {r.raw_bytes:,} B -> {r.stored_bytes:,} B new")
    except (HaagentiError, AdaptiveError) as e:
        _fail(e)


@tier_app.command("list")
def tier_list(library: str, model: Optional[str] = typer.Argument(None)) -> None:
    """The precision tiers stored for MODEL (or for every model that has any)."""
    from haagenti.adaptive.tiers import TIERS, tier_id, tiers_of

    try:
        lib = FragmentLibrary.open(library, create=False)
        tier_ids = {tier_id(m["model_id"], p) for m in lib.models() for p in TIERS}
        models = [model] if model else [m["model_id"] for m in lib.models() if m["model_id"] not in tier_ids]
        for mid in models:
            out.print(f"{mid}: {', '.join(p.value for p in tiers_of(lib, mid)) or 'no tiers'}")
    except (HaagentiError, OSError) as e:
        _fail(e)


@examples_app.command("make-family")
def make_family_cmd(out_dir: str, small: bool = typer.Option(False, "--small", help="a smaller model, for quick runs")) -> None:
    """Train the example digits family into OUT_DIR and write catalog.yaml beside it. A family
    trained before with the same settings and code, here or into any other folder, is reused
    (kept in $HAAGENTI_CACHE, default ~/.cache/haagenti)."""
    from haagenti.examples import MEMBERS, family_cache, obtain_family, write_catalog

    settings = {"d": 128, "layers": 2, "epochs": 2} if small else {}
    with _stages("training", MEMBERS) as trained:
        members, how = obtain_family(out_dir, progress=trained, **settings)
    if how != "trained":
        where = f"trained in {out_dir}" if how == "kept" else f"trained before (same settings and code), copied into {out_dir}"
        out.print(f"reusing the family {where}; delete {family_cache()} and {out_dir}/family.json to retrain", highlight=False, soft_wrap=True)
    path = write_catalog(members, out_dir)
    for m in members:
        out.print(f"{m.model_id:22s} {m.family or '-':8s} {m.note}", highlight=False)
    out.print(f"catalog: {path}", highlight=False, soft_wrap=True)


@examples_app.command("export")
def export_cmd(model_file: str, out_dir: str) -> None:
    """Write an example model's safetensors file as GGUF (F16, Q8_0), ONNX, a Hugging Face
    folder and a diffusers folder into OUT_DIR, with gguf's, torch.onnx's, huggingface_hub's and
    diffusers' own writers."""
    try:
        from haagenti.exports import export_all

        for path in export_all(model_file, out_dir):
            out.print(path)
    except (HaagentiError, OSError) as e:
        _fail(e)


@examples_app.command("ladder")
def ladder_cmd(model_file: str, out_dir: str, onnx: bool = typer.Option(False, "--onnx", help="also its fp32 ONNX export and that file's int8 and uint8 quantizations, per tensor and per channel (onnxruntime's quantize_dynamic)")) -> None:
    """Write an example model's safetensors file as a GGUF quantization ladder into OUT_DIR: F16,
    then Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 quantized from its F16 values by gguf's quantizers (as
    llama-quantize quantizes an F16 GGUF)."""
    try:
        from haagenti.exports import export_ladder, export_onnx_ladder

        for path in export_ladder(model_file, out_dir) + (export_onnx_ladder(model_file, out_dir) if onnx else []):
            out.print(path, soft_wrap=True, highlight=False)
    except (HaagentiError, OSError) as e:
        _fail(e)


def _transition(text: str):
    from haagenti.adaptive import AdaptiveError, TransitionStrategy

    kind, _, n = text.partition(":")
    if kind in ("immediate", "step_aware"):
        return TransitionStrategy.immediate() if kind == "immediate" else TransitionStrategy.step_aware()
    if kind == "gradual" and n.isdigit():
        return TransitionStrategy.gradual(int(n))
    raise AdaptiveError(f"unknown transition {text!r}; use immediate, gradual:N or step_aware")


@schedule_app.callback(invoke_without_command=True)
def schedule(
    ctx: typer.Context,
    preset: str = typer.Option("balanced", help="performance, balanced, quality, low_vram, conservative (budget points), noise_adaptive"),
    steps: int = typer.Option(20),
    sampler: str = typer.Option("ddim", help="ddim, dpmpp2m, euler_a, heun: whose measured sensitivity and noise levels to use"),
    transition: str = typer.Option("immediate", help="immediate, gradual:N or step_aware"),
) -> None:
    """Print the timeline of a preset's schedule on the sampler's own noise levels."""
    if ctx.invoked_subcommand:
        return
    from haagenti.adaptive.presets import AdaptiveError, ProfilePreset, check_sampler

    try:
        chosen = ProfilePreset.parse(preset)  # refused here, before torch and diffusers are imported (seconds)
        check_sampler(sampler)
        from haagenti.adaptive import PrecisionCapabilities, preset_profile
        from haagenti.adaptive.sampling import make_scheduler
        from haagenti.adaptive.switch import plan_for

        scheduler = make_scheduler(sampler)
        profile = preset_profile(chosen, sampler)
        plan = plan_for(scheduler, steps, profile, _transition(transition), PrecisionCapabilities.detect())
        out.print(plan.timeline(), highlight=False, markup=False, soft_wrap=True)
    except (AdaptiveError, MissingExtraError, ValueError) as e:
        _fail(e)


@schedule_app.command("search")
def schedule_search(
    budget: float = typer.Option(..., help="weight bytes touched over a generation, as a share of all-FP16 (0.4 = 40%)"),
    sampler: str = typer.Option("ddim", help="ddim, dpmpp2m or euler_a"),
    model: str = typer.Option("unet", help="unet, mlp or unet5m: whose measured sensitivity"),
    steps: Optional[int] = typer.Option(None, help="plan at this many steps (default: the measured count)"),
    transition: str = typer.Option("immediate", help="immediate, gradual:N or step_aware"),
    sensitivity: Optional[str] = typer.Option(None, help="adaptive.json from `haagenti schedule evaluate` (default: the shipped measurement)"),
) -> None:
    """The schedule with the least predicted quality loss within BUDGET (a DP over windows of
    steps on the measured per-step sensitivity; loss = summed MSE vs FP32 samples)."""
    from haagenti.adaptive import AdaptiveError
    from haagenti.adaptive.schedule import searched_schedule
    from haagenti.adaptive.search import search, sensitivity_of

    try:
        if not 0 < budget <= 2:
            raise AdaptiveError(f"--budget is a share of all-FP16 weight bytes in (0, 2], not {budget}")
        found = search(sensitivity_of(model, sampler, sensitivity), budget)
        plan = searched_schedule(found, f"search@{budget:g} {model}/{sampler}", steps, _transition(transition))
        out.print(plan.timeline(), highlight=False, markup=False, soft_wrap=True)
        out.print(f"  predicted MSE vs FP32 samples {found.predicted_mse:.3g} (windows: {' '.join(p.value for p in found.choice)}); "
                  f"measured weight bytes {found.weight_bytes_vs_fp16:.1%} of all-FP16 (scales included)", highlight=False, markup=False, soft_wrap=True)
    except (AdaptiveError, MissingExtraError, ValueError) as e:
        _fail(e)


@schedule_app.command("evaluate")
def schedule_evaluate(
    out_dir: str = typer.Option("adaptive-eval", "--out"),
    models: str = typer.Option("unet,mlp", help="comma-separated: unet, mlp, unet5m (6.3 M parameters at 32x32, ~20 min of training)"),
    samplers: str = typer.Option("ddim,dpmpp2m,euler_a", help="comma-separated: ddim, dpmpp2m, euler_a, heun"),
    steps: int = typer.Option(20),
    samples: int = typer.Option(256),
    window: int = typer.Option(4, help="steps per window of the sensitivity sweep"),
    train_iters: Optional[int] = typer.Option(None, help="training iterations for models not yet in OUT (default: unet 1500, mlp 4000, unet5m 1200)"),
) -> None:
    """Measure sensitivity, searched schedules and the presets (named budget points) on the
    project's digits models (trained into OUT on first use); write adaptive.md/json/png to OUT."""
    from haagenti.adaptive import AdaptiveError

    try:
        from haagenti.adaptive.models import KINDS
        from haagenti.adaptive.report import STAGES, evaluate_all
        from haagenti.adaptive.sampling import SAMPLERS

        ms, ss = [m.strip() for m in models.split(",")], [s.strip() for s in samplers.split(",")]
        bad = [m for m in ms if m not in KINDS] + [s for s in ss if s not in SAMPLERS]
        if bad or steps < 1 or samples < 2 or window < 1 or (train_iters is not None and train_iters < 1):
            raise AdaptiveError(f"unknown model/sampler {', '.join(bad)}" if bad else "--steps, --window and --train-iters must be >= 1, --samples >= 2")
        with _stages("evaluate:", STAGES) as ended:
            doc = evaluate_all(out_dir, ms, ss, steps, samples, window, train_iters=train_iters, progress=ended)
    except (AdaptiveError, MissingExtraError, ValueError) as e:
        _fail(e)
    md = os.path.join(out_dir, "adaptive.md")
    with open(md) as f:
        out.print(f.read(), highlight=False, markup=False, soft_wrap=True)
    out.print(f"wrote {md}, adaptive.json (use as --sensitivity), adaptive-*.png; {len(doc['pairs'])} model/sampler pairs", highlight=False, soft_wrap=True)


class _PandasLater(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pandas":
            raise ImportError("pandas is imported when a command needs it")
        return None


def _pyarrow_without_pandas() -> None:
    """pyarrow imports pandas (0.2-0.3 s of CPU, a quarter of a short command) the first time it
    builds an array from Python objects, only to ask whether they are pandas objects, and no
    command hands it any. That one look is answered "absent" here. pyarrow retries the import
    where pandas is required (`to_pandas`), so nothing is lost (docs/decisions/0400)."""
    if "pandas" in sys.modules:
        return
    later = _PandasLater()
    sys.meta_path.insert(0, later)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(later)


def main() -> None:
    """The console entry (`haagenti`, `python -m haagenti.cli`)."""
    _pyarrow_without_pandas()
    app()


if __name__ == "__main__":
    main()
