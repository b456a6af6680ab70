"""LSH quality and signature throughput on the example family.

    python bench/similarity.py [--index two-level]
Labelled pairs: fragment k of a tensor in the base and the same fragment in each fine-tune,
LoRA merge and fp16 export (related), and against the unrelated model (unrelated). Recall is
measured two ways, per band of measured cosine: datasketch's in-memory LSH (bench/lsh_baseline.py's `SimilarityIndex`,
nearest 4 of the fragments sharing a band), and what an ingest runs: the base ingested into a
library, whose index tables (haagenti.index) each variant's fragments are matched against with
haagenti.matching's rule (a base fragment is *proposed* when it shares a bucket, is among the MAX_SCAN looked at
and the MAX_PARTNERS nearest within the Hamming limit, *chosen* when it is among the k references tried).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch

from common import example_family
from lsh_baseline import SimilarityIndex

from haagenti.config import LibraryConfig
from haagenti.formats import open_model
from haagenti.formats.dtypes import dtype
from haagenti.fragment import FragmentId
from haagenti.library import FragmentLibrary
from haagenti.matching import choose_references, hamming_limit, match_rows, partner_pairs
from haagenti.signature import compute_signatures
from haagenti.similarity import measure


def fragments(path: str, elems: int) -> dict[tuple[str, int], tuple[bytes, str]]:
    src = open_model([path])
    out = {}
    for t in src.tensors:
        if not t.dtype.is_float or t.nbytes == 0:
            continue
        for k, chunk in enumerate(src.iter_chunks(t, elems * t.dtype.itemsize)):
            out[(t.name, k)] = (chunk, t.dtype.name)
    return out


def values(chunk: bytes, dt: str) -> np.ndarray:
    return torch.frombuffer(bytearray(chunk), dtype=dtype(dt).torch_dtype).double().numpy()


class RuleMatch:
    """The base in a library; a variant's fragments matched against its index tables with the
    reference rule, as `haagenti ingest` of the variant would (one call: the whole model)."""

    def __init__(self, cfg: LibraryConfig, base_file: str, root: str):
        self.cfg = cfg
        lib = FragmentLibrary.open(root, cfg)
        lib.ingest([base_file], "digits-base")
        frags = lib.store.read("fragments", columns=["fragment_id", "encoding", "quality"])
        self.plain = {f for f, e, q in zip(*(frags[c].to_pylist() for c in ("fragment_id", "encoding", "quality"))) if e == "plain" and q == "exact"}
        self.index = lib.index
        self.limit = hamming_limit(cfg.signature, cfg.thresholds.similar_cosine)

    def match(self, frags: dict, sigs: list) -> tuple[set[tuple[str, str]], dict[str, list[str]]]:
        """(proposed pairs (fragment, candidate), chosen references) of a model's fragments."""
        ids, bits, lengths, seen = [], [], [], set()
        for (chunk, dt), s in zip(frags.values(), sigs):
            fid = FragmentId.of(chunk)
            if fid not in seen:
                seen.add(fid)
                ids.append(fid)
                bits.append(s.bits)
                lengths.append(len(chunk) // dtype(dt).itemsize)
        t = pa.table({"fragment_id": ids, "bits": pa.array(bits, pa.binary()), "n_elements": pa.array(lengths, pa.int64())})
        rows = self.index.scoper()(match_rows(t, self.cfg.signature, np.arange(len(ids))))  # scoped as an ingest's run
        pairs = partner_pairs(rows, self.index.propose, None, self.limit)
        proposed = set(zip(pairs["fragment_id"].to_pylist(), pairs["candidate_id"].to_pylist()))
        return proposed, choose_references(pairs, ids, self.cfg.candidates)[0]


def median_seconds(run, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def on_gpu(cfg: LibraryConfig, full: list[tuple[bytes, str]], models: list[list[tuple[bytes, str]]]) -> None:
    """GPU signature throughput (bytes on the host in, signatures on the host out, as in a GPU
    actor) and a check that every fragment of the family gets the CPU's signature."""
    same = sum(compute_signatures(f, cfg.signature, "cuda") == compute_signatures(f, cfg.signature) for f in models)
    print(f"GPU ({torch.cuda.get_device_name()}): signatures of all {len(models)} models identical to the CPU's: {same}/{len(models)}")
    big = full * max(1, (1 << 30) // (len(full) * cfg.fragment_size))  # ~1 GiB: a GPU needs large batches
    compute_signatures(big[:4096], cfg.signature, "cuda")
    for batch in (64, len(big)):  # 64: the pipeline's batch per actor call
        t0 = time.perf_counter()
        for s in range(0, len(big), batch):
            compute_signatures(big[s : s + batch], cfg.signature, "cuda")
        secs = time.perf_counter() - t0
        print(f"signatures on GPU, {len(big)} full BF16 fragments in calls of {batch}: {len(big) * cfg.fragment_size / 1e6:.0f} MB in {secs:.2f}s = {len(big) * cfg.fragment_size / secs / 1e6:.0f} MB/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", default="bands", help="index layout of the library the rule reads")
    torch.set_num_threads(1)
    cfg = LibraryConfig(index=ap.parse_args().index)
    members = {m.model_id: m for m in example_family()}
    base = fragments(members["digits-base"].file, cfg.fragment_elements)
    index = SimilarityIndex(cfg.signature)
    models = [list(fragments(m.file, cfg.fragment_elements).values()) for m in members.values()]
    every = [f for frags in models for f in frags]
    nbytes = sum(len(c) for c, _ in every)
    compute_signatures(every, cfg.signature)  # warm-up: the fixed patterns are built once
    sign_s = median_seconds(lambda: compute_signatures(every, cfg.signature))
    print(f"signatures, all {len(models)} models' float fragments (mixed sizes): {len(every)} fragments, {nbytes / 1e6:.1f} MB, {nbytes / sign_s / 1e6:.0f} MB/s on 1 CPU thread")
    for key, s in zip(base, compute_signatures(list(base.values()), cfg.signature)):
        index.insert(f"{key[0]}#{key[1]}", s.bits, len(base[key][0]) // 2)
    # Steady state: the base's BF16 bytes as full 256 KiB fragments (most of a large model), ~64 MB.
    stream = b"".join(c for c, dt in base.values() if dt == "BF16")
    full = [(stream[i : i + cfg.fragment_size], "BF16") for i in range(0, len(stream) - cfg.fragment_size + 1, cfg.fragment_size)]
    full = full * max(1, (64 << 20) // (len(full) * cfg.fragment_size))
    full_s = median_seconds(lambda: compute_signatures(full, cfg.signature))
    print(f"signatures, full {cfg.fragment_size // 1024} KiB BF16 fragments: {len(full)} ({len(full) * cfg.fragment_size / 1e6:.0f} MB), {len(full) * cfg.fragment_size / full_s / 1e6:.0f} MB/s on 1 CPU thread")
    if torch.cuda.is_available():
        on_gpu(cfg, full, models)
    tmp = tempfile.TemporaryDirectory(prefix="similarity-")
    rule = RuleMatch(cfg, members["digits-base"].file, f"{tmp.name}/lib")
    base_ids = {key: FragmentId.of(chunk) for key, (chunk, _) in base.items()}
    rows, by_rule = [], []
    for mid in ("digits-ft-lr1e-4", "digits-ft-lr1e-3", "digits-ft-partial", "digits-lora-merged", "digits-base-fp16", "unrelated"):
        frags = fragments(members[mid].file, cfg.fragment_elements)
        qs = compute_signatures(list(frags.values()), cfg.signature)
        proposed, chosen = rule.match(frags, qs)
        for (key, (chunk, dt)), s in zip(frags.items(), qs):
            fid, bid = FragmentId.of(chunk), base_ids.get(key)
            if bid in rule.plain and fid != bid and mid != "unrelated":  # a referenceable base fragment, not the same bytes
                by_rule.append((measure(values(chunk, dt), values(*base[key]))[0], (fid, bid) in proposed, bid in chosen.get(fid, [])))
            if key not in base:
                continue
            cos = measure(values(chunk, dt), values(*base[key]))[0]
            found = [fid for fid, _ in index.query(s.bits, k=4, n_elements=len(base[key][0]) // 2)]
            # precision: returned candidates whose measured cosine with the query is >= 0.90
            good = sum(measure(values(chunk, dt), values(*base[(f.rsplit("#", 1)[0], int(f.rsplit("#", 1)[1]))]))[0] >= 0.90 for f in found)
            rows.append((mid, cos, f"{key[0]}#{key[1]}" in found, len(found), good))
    print(f"{'pairs':24s} {'n':>5s} {'mean cos':>9s} {'recall@4':>9s} {'cands/query':>12s} {'precision':>10s}")
    for mid in dict.fromkeys(r[0] for r in rows):
        rs = [r for r in rows if r[0] == mid]
        print(f"{mid:24s} {len(rs):5d} {np.mean([r[1] for r in rs]):9.4f} {np.mean([r[2] for r in rs]):9.3f} {np.mean([r[3] for r in rs]):12.2f} {sum(r[4] for r in rs) / max(sum(r[3] for r in rs), 1):10.3f}")
    print("\nby measured cosine of the pair (all related pairs; 'unrelated' pairs listed apart):")
    rel = [r for r in rows if r[0] != "unrelated"]
    for lo, hi, label in ((0.98, 1.01, "near-duplicate (cos >= 0.98)"), (0.90, 0.98, "similar (0.90-0.98)"), (-1, 0.90, "below 0.90")):
        rs = [r for r in rel if lo <= r[1] < hi]
        if rs:
            print(f"  {label:32s} pairs {len(rs):5d}  recall {np.mean([r[2] for r in rs]):.4f}")
    un = [r for r in rows if r[0] == "unrelated"]
    print(f"  unrelated model vs base: pairs {len(un)}, index returned its same-position fragment for {sum(r[2] for r in un)} (false candidates; verification on bytes rejects them)")
    print("\nthrough the library's index tables and haagenti.matching's rule (related pairs whose base fragment is stored plain, bytes differing):")
    for lo, hi, label in ((0.98, 1.01, "near-duplicate (cos >= 0.98)"), (0.90, 0.98, "similar (0.90-0.98)"), (-1, 0.90, "below 0.90")):
        rs = [r for r in by_rule if lo <= r[0] < hi]
        if rs:
            print(f"  {label:32s} pairs {len(rs):5d}  proposed {np.mean([r[1] for r in rs]):.4f}  chosen {np.mean([r[2] for r in rs]):.4f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
