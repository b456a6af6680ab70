"""Reference choice (haagenti.matching): the vectorised steps equal the rule written out, and
deciding it batch by batch equals deciding it over the whole run at once."""
import numpy as np
import pyarrow as pa

from haagenti.config import MAX_CHAIN_DEPTH, LibraryConfig
from haagenti.signature import SignatureConfig
from haagenti.matching import (
    BAND_SCHEMA,
    RunMatcher,
    bucket_pairs,
    choose_references,
    hamming_limit,
    match_rows,
    shared_buckets,
)


def test_bucket_pairs_matches_a_plain_loop_over_each_bucket():
    """In each bucket, each new fragment against the first `max_scan` fragments of its length
    before it (library rows first by id, then run rows by position), kept when close enough, the
    `max_partners` nearest of those. Buckets of every kind: singletons, mixed lengths, only old
    rows, and large ones."""
    rng = np.random.default_rng(0)
    rows = []
    pos = 0
    for bucket, size in enumerate([1, 2, 3, 5, 9, 40, 94]):
        for k in range(size):
            library = k % 5 == 0
            rows.append({
                "band": bucket % 3, "band_hash": bucket, "fragment_id": f"{rng.integers(1 << 40):012x}",
                "bits": rng.integers(0, 256, 32, dtype=np.uint8).tobytes() if k % 4 else bytes(32),
                "n_elements": int(rng.choice([512, 1024])), "pos": -1 if library else int(rng.integers(0, 1000)) * 100 + pos,
                "is_new": (new := bool(not library and bucket != 2 and k % 3 != 1)), "depth": None if new else k % 6,
            })
            pos += 1
    table = pa.Table.from_pylist(rows, schema=BAND_SCHEMA)
    limit, cap, scan = 120, 4, 10
    expected = set()
    for key in {(r["band"], r["band_hash"]) for r in rows}:
        members = sorted((r for r in rows if (r["band"], r["band_hash"]) == key), key=lambda r: (r["pos"], r["fragment_id"]))
        for at, r in enumerate(members):
            if not r["is_new"]:
                continue
            looked = [o for o in members[:at] if o["n_elements"] == r["n_elements"]][:scan]
            near = [(sum(bin(a ^ b).count("1") for a, b in zip(r["bits"], o["bits"])), k, o) for k, o in enumerate(looked)]
            for d, _, o in sorted((x for x in near if x[0] <= limit), key=lambda x: x[:2])[:cap]:
                expected.add((r["fragment_id"], o["fragment_id"], d, o["depth"]))
    got = bucket_pairs(table, limit, cap, scan)
    assert set(zip(*(got[c].to_pylist() for c in ("fragment_id", "candidate_id", "hamming", "depth")))) == expected
    assert got.num_rows == len(expected) and len(expected) > 50
    assert {u for *_, u in expected} >= {None, 0, 5}  # depths of earlier rows carried, new rows' left to decide


def test_a_near_duplicate_is_proposed_in_a_bucket_full_of_unrelated_fragments():
    """A 10M-fragment library puts ~152 unrelated rows in every 16-bit bucket: the new fragment's
    near-duplicate must be proposed wherever its id sorts among them (the first 32 by id were
    looked at before, so it was found ~32/152 of the time)."""
    rng = np.random.default_rng(2)
    bits = [rng.integers(0, 256, 32, dtype=np.uint8).tobytes() for _ in range(152)]
    near = bytearray(bits[-1])
    near[0] ^= 0x0F  # 4 of 256 bits flipped: cosine ~0.998
    rows = [{"band": 0, "band_hash": 7, "fragment_id": f"{i:064x}", "bits": b, "n_elements": 1024, "pos": -1,
             "is_new": False, "depth": 0} for i, b in enumerate(bits)]
    rows.append({"band": 0, "band_hash": 7, "fragment_id": "f" * 64, "bits": bytes(near), "n_elements": 1024, "pos": 0, "is_new": True, "depth": None})
    table = pa.Table.from_pylist(rows, schema=BAND_SCHEMA)
    got = bucket_pairs(table, hamming_limit(SignatureConfig(), 0.9))
    assert got["candidate_id"].to_pylist() == [f"{151:064x}"] and got["hamming"].to_pylist() == [4]


def test_choose_references_matches_its_definition():
    """The vectorised choice equals the rule written out: in run order, a fragment's candidates
    (a pair seen in several bands counts once) ranked by (Hamming distance, id), the first `k`
    usable ones kept, usable meaning a depth below MAX_CHAIN_DEPTH (an earlier fragment carries
    its own; one decided in the same call has the depth decided for it: 0 for an anchor, else 1
    + the deepest of its references). Without new deltas only the call's anchors serve among its
    fragments. Input order must not matter."""
    rng = np.random.default_rng(1)
    new = [f"n{i:03d}" for i in range(60)]
    earlier = {f"l{i:03d}": int(rng.integers(0, MAX_CHAIN_DEPTH + 2)) for i in range(25)}  # library and earlier batches
    rows, distance = [], {}
    for _ in range(300):
        at = int(rng.integers(1, len(new)))
        f, c = new[at], str(rng.choice(new[:at] + sorted(earlier)))  # candidates come before
        d = distance.setdefault((f, c), int(rng.integers(0, 40)))
        rows.append((f, c, d, earlier.get(c)))
        if rng.random() < 0.3:
            rows.append((f, c, d, earlier.get(c)))  # the same pair from another band
    table = pa.table({"fragment_id": [r[0] for r in rows], "candidate_id": [r[1] for r in rows],
                      "hamming": pa.array([r[2] for r in rows], pa.int32()), "depth": pa.array([r[3] for r in rows], pa.int16())})
    cands: dict[str, set] = {}
    for f, c, d, _ in rows:
        cands.setdefault(f, set()).add((d, c))
    for k in (1, 2, 3):
        for new_deltas in (True, False):
            depth, expected, chosen = dict(earlier), {}, {}
            for f in new:
                usable = [c for _, c in sorted(cands.get(f, ())) if depth[c] < MAX_CHAIN_DEPTH and (new_deltas or c in earlier or depth[c] == 0)][:k]
                depth[f] = 1 + max(depth[c] for c in usable) if usable else 0
                if usable:
                    expected[f] = usable
                    chosen.update({c: depth[c] for c in usable})
            want = (expected, chosen | {f: depth[f] for f in new})
            assert choose_references(table, new, k, new_deltas=new_deltas) == want
            shuffled = table.take(pa.array(rng.permutation(table.num_rows)))
            assert choose_references(shuffled, new, k, new_deltas=new_deltas) == want
    assert len(expected) < len(new) and any(depth[f] > 1 for f in new)  # anchors and chains both occur
    assert any(all(depth[c] >= MAX_CHAIN_DEPTH for _, c in cands[f]) for f in cands if f not in expected)  # too deep: an anchor


def _signatures(rng, n: int, bits: int) -> pa.Table:
    """Signatures in families of near neighbours (a few bits flipped), as fine-tunes make."""
    bases = rng.integers(0, 2, (max(1, n // 6), bits), dtype=np.uint8)
    rows = bases[rng.integers(0, len(bases), n)]
    flips = rng.random((n, bits)) < rng.choice([0.01, 0.05, 0.3], n)[:, None]
    packed = np.packbits(rows ^ flips, axis=1)
    return pa.table({
        "fragment_id": [f"{i:04d}-{rng.integers(1 << 30):08x}" for i in range(n)],
        "bits": pa.array([r.tobytes() for r in packed], pa.binary()),
        "n_elements": pa.array(rng.choice([4096, 8192], n), pa.int64()),
    })


def test_batch_by_batch_equals_the_whole_run_at_once():
    """The library decides references batch by batch (RunMatcher), the pipeline over the whole
    run at once: every rule looks only at earlier fragments, so the answers are the same."""
    rng = np.random.default_rng(2)
    config = LibraryConfig()
    library, run = _signatures(rng, 120, config.signature.bits), _signatures(rng, 300, config.signature.bits)
    limit = hamming_limit(config.signature, config.thresholds.similar_cosine)
    stored = match_rows(library, config.signature, np.full(library.num_rows, -1), rng.integers(0, MAX_CHAIN_DEPTH, library.num_rows))
    whole = choose_references(
        bucket_pairs(shared_buckets(pa.concat_tables([match_rows(run, config.signature, np.arange(run.num_rows)), stored])), limit),
        run["fragment_id"].to_pylist(), config.candidates,
    )
    rows = stored.select(["band", "band_hash", "fragment_id", "bits", "n_elements", "depth"])

    def lookup(buckets: pa.Table) -> pa.Table:  # the library's band rows in these buckets, as its index returns them
        return rows.join(buckets, ["band", "band_hash"], join_type="left semi")

    for sizes in ([300], [1] * 300, [7, 50, 1, 100, 142]):
        matcher, batched, depths, start = RunMatcher(config, lookup), {}, {}, 0
        for n in sizes:
            refs, d = matcher.match(run.slice(start, n))
            batched.update(refs)
            depths.update(d)
            start += n
        assert (batched, depths) == whole
    assert len(whole[0]) > 50 and len(whole[0]) < run.num_rows  # references and anchors both occur
    assert max(whole[1].values()) > 1  # chains: deltas of deltas
