"""The fault campaign as a bench: N trials of each fault class against libraries on a local
folder and on S3 (moto on loopback), every writer a real process.

    python bench/faults.py [--trials 50] [--where local,s3] [--classes kill,pairs,disk,crafted] [--seed 0]

Classes:
  kill     one writer (ingest, rm, gc, compact, restore --force, tier add) killed with SIGKILL
           at a random time of its run; then the library is checked, the writer run again to
           its end, gc run, and the library checked again.
  pairs    two writers (every pair of those, and two ingests of one model id with other bytes)
           started together, a random stagger apart; each must finish or refuse in one line.
  disk     a real full disk (a tmpfs of a few MB, else a loop-mounted ext4 file; local only):
           ingest and restore with random room left, then again with room.
  crafted  libraries with a damaged record, file, log entry, marker or lease; restore, verify
           and ingest must refuse in one line or give the right bytes.
After every trial: `verify` passes (kill, pairs, disk), every published model restores with
--rehash and its bytes are its source's. Counted per class and place: trials, lost (a model
that should be there is not), unrestorable (listed but fails verify or restore), wrong bytes
(exit 0 with bytes other than the source's), tracebacks, unclear errors (a failure that is not
one line). Exits 1 on any loss, unrestorable model or wrong bytes; tracebacks and unclear
errors are printed and fail too.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from haagenti.config import LibraryConfig  # noqa: E402
from haagenti.library import FragmentLibrary  # noqa: E402

CONFIG = LibraryConfig(fragment_size=65536)
FRAGMENT = ["--fragment-size", "65536"]
COLUMNS = ("trials", "lost", "unrestorable", "wrong bytes", "tracebacks", "unclear errors")
CLASSES = ("kill", "pairs", "disk", "crafted")


@dataclass
class Tally:
    trials: int = 0
    lost: int = 0
    unrestorable: int = 0
    wrong: int = 0
    tracebacks: int = 0
    unclear: int = 0
    events: int = 0  # kill: writers killed mid-work; disk: refusals for want of room; pairs: one-line refusals
    notes: list[str] = field(default_factory=list)

    def row(self) -> tuple[int, ...]:
        return (self.trials, self.lost, self.unrestorable, self.wrong, self.tracebacks, self.unclear)

    def note(self, text: str) -> None:
        if len(self.notes) < 20:
            self.notes.append(text[:300])


def sha(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def models(work: Path) -> dict[str, str]:
    """The source files: a; b, a near copy of a (stored as deltas); c and c2, one id's two
    versions; d, removed from the base library so a gc has work; big, for the full disk."""
    rng = np.random.default_rng(7)
    base = {f"layer{i}.weight": rng.standard_normal((64, 512)).astype(np.float16) for i in range(4)}
    out = {}
    variants = {
        "a": base,
        "b": {k: v + np.float16(0.002) * rng.standard_normal(v.shape).astype(np.float16) for k, v in base.items()},
        "c": {k: rng.standard_normal(v.shape).astype(np.float16) for k, v in base.items()},
        "c2": {k: rng.standard_normal(v.shape).astype(np.float16) for k, v in base.items()},
        "d": {k: rng.standard_normal(v.shape).astype(np.float16) for k, v in base.items()},
        "big": {f"w{i}": rng.standard_normal((512, 512)).astype(np.float32) for i in range(8)},
    }
    for name, tensors in variants.items():
        out[name] = str(work / f"{name}.safetensors")
        save_file(tensors, out[name])
    return out


class Place:
    """Where trials' libraries live: a local folder or a bucket on the S3 server."""

    def __init__(self, kind: str, work: Path):
        self.kind, self.work, self.n = kind, work, 0
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        self.proc = None
        if kind == "s3":
            import boto3

            from haagenti.testing import s3_environment, start_s3_server

            self.proc, endpoint = start_s3_server()
            os.environ.update(s3_environment(endpoint))
            self.env.update(s3_environment(endpoint))
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="faults")

    def url(self, name: str) -> str:
        return f"s3://faults/{name}" if self.kind == "s3" else str(self.work / name)

    def copy(self, src: str) -> str:
        """A fresh copy of the library at `src` for one trial."""
        self.n += 1
        dst = self.url(f"trial-{self.n}")
        if self.kind == "s3":
            import s3fs

            fs = s3fs.S3FileSystem()
            for p in fs.find(src.removeprefix("s3://")):
                fs.copy(p, dst.removeprefix("s3://") + p[len(src.removeprefix("s3://")):])
        else:
            shutil.copytree(src, dst, symlinks=True)
        return dst

    def drop(self, url: str) -> None:
        if self.kind == "s3":
            import s3fs

            with contextlib.suppress(FileNotFoundError):
                s3fs.S3FileSystem().rm(url.removeprefix("s3://"), recursive=True)
        else:
            shutil.rmtree(url, ignore_errors=True)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def base_library(place: Place, src: dict[str, str]) -> str:
    """a and b published; d ingested and removed (gc has fragments to free)."""
    url = place.url("base")
    lib = FragmentLibrary.open(url, CONFIG)
    lib.ingest([src["a"]], "a")
    lib.ingest([src["b"]], "b")
    lib.ingest([src["d"]], "d")
    lib.rm("d")
    return url


def writers(url: str, src: dict[str, str], out: str) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "haagenti.cli"]
    return {
        "ingest": [*cli, "ingest", url, src["c"], "--model-id", "c", *FRAGMENT],
        "ingest-other-bytes": [*cli, "ingest", url, src["c2"], "--model-id", "c", *FRAGMENT],
        "rm": [*cli, "rm", url, "b"],
        "gc": [*cli, "gc", url],
        "compact": [sys.executable, "-m", "jobs.compact", "--library", url],
        "restore": [*cli, "restore", url, "a", out, "--force"],
        "tier": [*cli, "tier", "add", url, "a", "int8"],
    }


def judge(t: Tally, what: str, rc: int, err: str, findings: bool = False) -> None:
    """A command's exit: 0, killed, or 1 with one line on stderr and no traceback (`findings`:
    a report, verify's, of one "error:" line per finding)."""
    lines = [x for x in err.splitlines() if x.strip()]
    clear = all(x.startswith("error: ") for x in lines) if findings else len(lines) == 1
    if "Traceback" in err:
        t.tracebacks += 1
        t.note(f"{what}: traceback: {err.strip().splitlines()[-1]}")
    elif rc not in (0, -signal.SIGKILL) and (rc != 1 or not lines or not clear):
        t.unclear += 1
        t.note(f"{what}: exit {rc}, stderr {err.strip()[:200]!r}")


def check(t: Tally, url: str, src: dict[str, str], must: set[str], may: set[str], ids: dict[str, set[str]], scratch: Path) -> None:
    """The invariant: verify passes; every model listed restores (rehash) to one of the sources
    its id may have; every id in `must` is listed; nothing listed outside `must | may`."""
    try:
        lib = FragmentLibrary.open(url, create=False)
        report = lib.verify()
        listed = {m["model_id"] for m in lib.models()}
    except Exception as e:  # noqa: BLE001 - a check must count, never stop the bench
        t.unrestorable += 1
        t.note(f"check: cannot open or verify: {type(e).__name__}: {e}")
        return
    if not report.ok:
        t.unrestorable += 1
        t.note(f"verify: {report.errors[0]}")
    t.lost += len(must - listed)
    if must - listed:
        t.note(f"lost: {sorted(must - listed)}")
    for mid in sorted(listed):
        if mid not in must | may:
            t.wrong += 1
            t.note(f"{mid}: listed, and no writer of this trial published it")
            continue
        out = scratch / f"check-{mid}-{time.monotonic_ns()}"
        try:
            paths = lib.restore(mid, str(out), rehash=True)
        except Exception as e:  # noqa: BLE001
            t.unrestorable += 1
            t.note(f"{mid}: {type(e).__name__}: {e}")
            continue
        if mid in ids and not any(sha(paths[0]) == sha(src[s]) for s in ids[mid]):
            t.wrong += 1
            t.note(f"{mid}: restored bytes are not its source's")
        shutil.rmtree(out, ignore_errors=True)


def run(cmd: list[str], env: dict, kill_after: float | None = None) -> tuple[int, str, str]:
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True)
    if kill_after is not None:
        try:
            p.wait(kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


IDS = {"a": {"a"}, "b": {"b"}, "c": {"c", "c2"}}  # which source each model id may restore to


def expected(done: dict[str, int | None]) -> tuple[set[str], set[str]]:
    """(must be listed, may be listed) after writers that ended with `done`'s exit codes (None:
    killed): a finished rm removed b, a refused one kept it; a finished ingest published c."""
    must, may = {"a", "b"}, {"a.int8"}
    if "rm" in done and done["rm"] != 1:
        must.discard("b")
        if done["rm"] is None:
            may.add("b")
    for w in ("ingest", "ingest-other-bytes"):
        if w in done:
            (must if done[w] == 0 else may).add("c")
    if done.get("tier") == 0:
        must.add("a.int8")
    return must, may


def restore_ok(t: Tally, out: str, src: dict[str, str], rc: int, killed: bool) -> None:
    """A restore into `out` (prefilled with b's bytes under a's name): finished, it holds a's
    bytes; killed or refused, each file is whole (old or new), or the journal says otherwise."""
    path = Path(out) / "a.safetensors"
    if not path.exists():
        return
    now = sha(path)
    if rc == 0 and now != sha(src["a"]):
        t.wrong += 1
        t.note("restore exited 0 with other bytes")
    elif now not in (sha(src["a"]), sha(src["b"])) and not (Path(out) / ".haagenti-restore.json").exists():
        t.wrong += 1
        t.note("restore left a file that is neither the old nor the new one, unreported")


def prefill(out: str, src: dict[str, str]) -> None:
    os.makedirs(out, exist_ok=True)
    shutil.copy(src["b"], os.path.join(out, "a.safetensors"))


def import_seconds(env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import haagenti.cli"], env=env, cwd=ROOT, check=True)
    return time.perf_counter() - start


def kill_trials(place: Place, base: str, src: dict[str, str], n: int, rng: random.Random, scratch: Path) -> Tally:
    t = Tally()
    names = ["ingest", "rm", "gc", "compact", "restore", "tier"]
    start = import_seconds(place.env)
    lengths: dict[str, float] = {}
    for k in range(n):
        w = names[k % len(names)]
        url = place.copy(base)
        out = str(scratch / f"out-{place.n}")
        prefill(out, src)
        cmd = writers(url, src, out)[w]
        if w not in lengths:  # one whole run of this writer, on a copy of its own, says how long it runs
            probe = place.copy(base)
            prefill(out + "-probe", src)
            t0 = time.perf_counter()
            run(writers(probe, src, out + "-probe")[w], place.env)
            lengths[w] = time.perf_counter() - t0
            place.drop(probe)
        at = rng.uniform(start * 0.8, max(lengths[w], start) * 1.05)
        rc, _, err = run(cmd, place.env, kill_after=at)
        killed = rc == -signal.SIGKILL
        t.trials += 1
        t.events += killed
        judge(t, f"{w} (killed at {at:.2f}s)", rc, err)
        changes = w in ("ingest", "rm", "tier")  # what the models table holds afterwards
        must, may = expected({w: None if killed else rc} if changes else {})
        check(t, url, src, must, may, IDS, scratch)
        if w == "restore":
            restore_ok(t, out, src, rc, killed)
        rc2, _, err2 = run(cmd, place.env)  # the same writer again, to its end (an rm of what is gone, a tier made, refused in one line)
        judge(t, f"{w} again", rc2, err2)
        if w == "restore":
            restore_ok(t, out, src, rc2, False)
        rc3, _, err3 = run(writers(url, src, out)["gc"], place.env)
        judge(t, "gc after", rc3, err3)
        must, may = expected({w: 0} if changes else {})
        check(t, url, src, must, may, IDS, scratch)
        place.drop(url)
        shutil.rmtree(out, ignore_errors=True)
    return t


def pair_trials(place: Place, base: str, src: dict[str, str], n: int, rng: random.Random, scratch: Path) -> Tally:
    t = Tally()
    names = ["ingest", "ingest-other-bytes", "rm", "gc", "compact", "restore", "tier"]
    pairs = list(itertools.combinations(names, 2)) + [("ingest", "ingest")]
    for k in range(n):
        first, second = pairs[k % len(pairs)]
        url = place.copy(base)
        out = str(scratch / f"out-{place.n}")
        prefill(out, src)
        cmds = writers(url, src, out)
        stagger = rng.uniform(0, 0.6)
        procs = []
        for i, w in enumerate((first, second)):
            if i:
                time.sleep(stagger)
            procs.append(subprocess.Popen(cmds[w], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=place.env, cwd=ROOT))
        results = [(p.wait(300), *p.communicate()) for p in procs]
        t.trials += 1
        done: dict[str, int] = {}
        for w, (rc, _, err) in zip((first, second), results):
            judge(t, f"{w} beside {first if w == second else second}", rc, err)
            t.events += rc == 1
            if w in ("ingest", "ingest-other-bytes", "rm", "tier"):
                done[w] = 0 if rc == 0 or done.get(w) == 0 else rc
            if w == "restore":
                restore_ok(t, out, src, rc, False)
        must, may = expected(done)
        check(t, url, src, must, may, IDS, scratch)
        place.drop(url)
        shutil.rmtree(out, ignore_errors=True)
    return t


@contextlib.contextmanager
def small_disk(path: Path, size_mb: int):
    """A real filesystem of `size_mb` at `path`: tmpfs, else a loop-mounted ext4 file."""
    path.mkdir(parents=True, exist_ok=True)
    image = path.parent / (path.name + ".img")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True).returncode:
        subprocess.run(["truncate", "-s", f"{size_mb}M", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", str(image)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=False)
        image.unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)


def disk_trials(place: Place, base: str, src: dict[str, str], n: int, rng: random.Random, scratch: Path) -> Tally:
    t = Tally()
    big = os.path.getsize(src["big"])
    for k in range(n):
        disk = scratch / f"disk-{k}"
        with small_disk(disk, 16):
            url = str(disk / "lib")
            shutil.copytree(base, url)
            stat = os.statvfs(disk)
            free = stat.f_bavail * stat.f_frsize
            room = rng.randint(0, int(big * 1.6))  # from nothing to enough for the big model's fragments
            filler = disk / "filler"
            with open(filler, "wb") as f:
                f.truncate(0)
                f.write(b"\0" * max(0, free - room - 64 * 1024))
            cli = [sys.executable, "-m", "haagenti.cli"]
            rc, _, err = run([*cli, "ingest", url, src["big"], "--model-id", "big", *FRAGMENT], place.env)
            judge(t, f"ingest on a full disk ({room} B free)", rc, err)
            rc_r, _, err_r = run([*cli, "restore", url, "a", str(disk / "out")], place.env)
            judge(t, f"restore onto a full disk ({room} B free)", rc_r, err_r)
            t.events += sum("No space left" in e for e in (err, err_r))
            if rc_r == 0 and sha(disk / "out" / "a.safetensors") != sha(src["a"]):
                t.wrong += 1
                t.note("restore onto a full disk exited 0 with other bytes")
            t.trials += 1
            ids = {**IDS, "big": {"big"}}
            check(t, url, src, {"a", "b"} | ({"big"} if rc == 0 else set()), {"big"}, ids, scratch)
            filler.unlink()
            shutil.rmtree(disk / "out", ignore_errors=True)
            rc2, _, err2 = run([*cli, "ingest", url, src["big"], "--model-id", "big", *FRAGMENT], place.env)
            judge(t, "ingest with room", rc2, err2)
            if rc2 != 0:
                t.unclear += 1
                t.note(f"ingest with room: exit {rc2}: {err2.strip()[:200]}")
            check(t, url, src, {"a", "b", "big"}, set(), ids, scratch)
    return t


# ---- crafted libraries -------------------------------------------------------------------------
def _rows(table: str, change):
    def apply(url: str) -> None:
        import pyarrow as pa

        store = FragmentLibrary.open(url, create=False).store
        t = store.read(table)
        rows = change(t.to_pylist())
        store.delete(table, "true")
        store.append(table, pa.Table.from_pylist(rows, schema=t.schema))
    return apply


def _files(glob: str, change):
    def apply(url: str) -> None:
        from haagenti.fsio import filesystem_for

        fs, root = filesystem_for(url)
        paths = sorted(fs.glob(f"{root}/{glob}"))
        if paths:
            fs.pipe_file(paths[-1], change(fs.cat_file(paths[-1])))
    return apply


def _first_model(change):
    def on(rows):
        row = next(r for r in rows if r["model_id"] == "a")
        change(row)
        return rows
    return on


def _swap_blobs(rows):
    x, y = [r for r in rows if r["encoding"] == "plain"][:2]
    x["blob"], y["blob"] = y["blob"], x["blob"]
    return rows


def _shift_counts(rows):
    rows.sort(key=lambda r: (r["model_id"], r["tensor_index"], r["fragment_seq"]))
    x = next(r for r in rows if r["model_id"] == "a")
    x["elem_count"] -= 1
    return rows


def _swap_model_files(rows):
    a, b = (next(r for r in rows if r["model_id"] == m) for m in ("a", "b"))
    a["files"], b["files"] = b["files"], a["files"]
    return rows


def _lease(body: dict):
    def apply(url: str) -> None:
        from haagenti.fsio import filesystem_for

        fs, root = filesystem_for(url)
        lease = {"kind": "ingest", "writer": "e" * 32, "host": "elsewhere", "pid": 1, "created": time.time(),
                 "expires": time.time() + 10**9, "model_ids": ["c"], "ticket": 3, "choosing": False, **body}
        fs.pipe_file(f"{root}/_leases/{'e' * 32}.json", json.dumps(lease).encode())
    return apply


def _marker(change):
    return _files("haagenti.json", lambda b: json.dumps(change(json.loads(b))).encode())


CRAFTED = {
    "file renamed": _rows("models", _first_model(lambda r: r["files"][0].update(name="d/d/a.safetensors"))),
    "file renamed out": _rows("models", _first_model(lambda r: r["files"][0].update(name="../a.safetensors"))),
    "files of two models swapped": _rows("models", _swap_model_files),
    "format changed": _rows("models", _first_model(lambda r: r["files"][0].update(format="torch"))),
    "size changed": _rows("models", _first_model(lambda r: r["files"][0].update(size=r["files"][0]["size"] + 2))),
    "blobs swapped": _rows("fragments", _swap_blobs),
    "counts shifted": _rows("manifests", _shift_counts),
    "tensor index -1": _rows("manifests", lambda rows: [dict(r, tensor_index=-1) if i == 0 else r for i, r in enumerate(rows)]),
    "delta refers to itself": _rows("fragments", lambda rows: [dict(r, ref_id=r["fragment_id"]) if r["ref_id"] else r for r in rows]),
    "raw size null": _rows("fragments", lambda rows: [dict(r, raw_size=None) for r in rows]),
    "fragments log entry emptied": _files("fragments/_delta_log/*.json", lambda b: b""),
    "models log entry emptied": _files("models/_delta_log/*.json", lambda b: b""),
    "fragments data file truncated": _files("fragments/*.parquet", lambda b: b[: len(b) // 2]),
    "marker fragment_size 0": _marker(lambda m: {**m, "fragment_size": 0}),
    "marker fragment_size big": _marker(lambda m: {**m, "fragment_size": "big"}),
    "marker without signature": _marker(lambda m: {k: v for k, v in m.items() if k != "signature"}),
    "marker bands 0": _marker(lambda m: {**m, "signature": {**m["signature"], "bands": 0}}),
    "marker not JSON": _files("haagenti.json", lambda b: b"\xff{"),
    "lease ticket a string": _lease({"ticket": "7"}),
    "lease stuck choosing": _lease({"choosing": True}),
}


def crafted_trials(place: Place, base: str, src: dict[str, str], n: int, rng: random.Random, scratch: Path) -> Tally:
    """Each damaged library: restores either refuse in one line or give the source's bytes;
    verify exits 0 only if every model restored; an ingest finishes or refuses in one line."""
    from typer.testing import CliRunner

    from haagenti.cli import app

    t = Tally()
    names = list(CRAFTED)
    runner = CliRunner()

    def cli(what: str, *args: str) -> int:
        r = runner.invoke(app, list(args))
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            t.tracebacks += 1
            t.note(f"{what}: traceback: {type(r.exception).__name__}: {r.exception}")
            return -1
        judge(t, what, r.exit_code, r.stderr, findings=args[0] == "verify")
        return r.exit_code

    for k in range(n):
        damage = names[k % len(names)]
        url = place.copy(base)
        CRAFTED[damage](url)
        t.trials += 1
        restored = 0
        for mid in ("a", "b"):
            out = scratch / f"crafted-{place.n}-{mid}"
            rc = cli(f"{damage}: restore {mid}", "restore", url, mid, str(out))
            if rc == 0:
                restored += 1
                if sha(out / f"{mid}.safetensors") != sha(src[mid]):
                    t.wrong += 1
                    t.note(f"{damage}: restore {mid} exited 0 with other bytes")
            shutil.rmtree(out, ignore_errors=True)
        if cli(f"{damage}: verify", "verify", url) == 0 and restored < 2:
            t.unclear += 1
            t.note(f"{damage}: verify passed a library whose models do not all restore")
        cli(f"{damage}: ingest", "ingest", url, src["c"], "--model-id", "c", *FRAGMENT)
        place.drop(url)
    return t


RUNNERS = {"kill": kill_trials, "pairs": pair_trials, "disk": disk_trials, "crafted": crafted_trials}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=50, help="trials per fault class and place")
    ap.add_argument("--where", default="local,s3", help="local, s3 or both")
    ap.add_argument("--classes", default=",".join(CLASSES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    classes = [c for c in args.classes.split(",") if c]
    if set(classes) - set(CLASSES) or not set(args.where.split(",")) <= {"local", "s3"}:
        ap.error(f"classes are {', '.join(CLASSES)}; places are local and s3")
    rng = random.Random(args.seed)
    table: list[tuple[str, str, Tally]] = []
    with tempfile.TemporaryDirectory(prefix="haagenti-faults-") as tmp:
        work = Path(tmp)
        src = models(work)
        for kind in args.where.split(","):
            place = Place(kind, work / kind)
            (work / kind).mkdir()
            try:
                base = base_library(place, src)
                for c in classes:
                    if c == "disk" and kind == "s3":
                        continue  # an object store has no disk to fill
                    t0 = time.perf_counter()
                    tally = RUNNERS[c](place, base, src, args.trials, rng, work)
                    table.append((c, kind, tally))
                    print(f"{c} on {kind}: {tally.trials} trials in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
            finally:
                place.close()
    print(f"{'class':<9} {'where':<6} " + " ".join(f"{c:>14}" for c in COLUMNS))
    for c, kind, tally in table:
        said = {"kill": "killed mid-work", "disk": "refused for want of room", "pairs": "writers refused"}.get(c)
        extra = f"   ({tally.events} {said})" if said else ""
        print(f"{c:<9} {kind:<6} " + " ".join(f"{v:>14}" for v in tally.row()) + extra)
    bad = [(c, kind, tally) for c, kind, tally in table if any(tally.row()[1:])]
    for c, kind, tally in bad:
        for line in tally.notes:
            print(f"  {c}/{kind}: {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
