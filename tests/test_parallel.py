import threading
import time

import pytest

from haagenti.parallel import Workers, thread_count


def test_map_keeps_order_and_uses_the_workers():
    seen: set[str] = set()
    meet = threading.Barrier(2, timeout=10)  # the first two slices run at once, or map did not fan out
    calls = iter(range(1000))

    def part(xs):
        seen.add(threading.current_thread().name)
        if next(calls) < 2:
            meet.wait()
        return [x * 2 for x in xs]

    with Workers(3) as w:
        assert w.map(part, list(range(10))) == [x * 2 for x in range(10)]
        assert w.each(lambda x: x + 1, range(5)) == [1, 2, 3, 4, 5]
        # a stage in the background fans out too: it takes slices in its own thread
        meet.reset()
        calls = iter(range(1000))
        assert w.submit(lambda: w.map(part, list(range(7)))).result() == [x * 2 for x in range(7)]
    assert len(seen) >= 2


def test_map_balances_a_slow_thread():
    """Slices go to whichever thread is free: a thread held up the whole time (by a read, a
    commit, another process) does a small share, the others take the rest (with one fixed slice
    per thread it did half of the work, and the others waited for it)."""
    first: list[int] = []
    done: list[int] = []

    def part(xs):
        if xs[0] == 0:  # the first slice stalls until every other item is done
            first.extend(xs)
            deadline = time.monotonic() + 10
            while len(done) < 16 - len(first) and time.monotonic() < deadline:
                time.sleep(0.001)
        else:
            done.extend(xs)
        return xs

    with Workers(2) as w:
        assert w.map(part, list(range(16))) == list(range(16))
    assert len(done) == 16 - len(first) and len(first) <= 16 // 4


def test_one_thread_runs_inline_and_errors_surface():
    w = Workers(1)
    assert w.map(lambda xs: [threading.current_thread().name for _ in xs], [1, 2]) == [threading.current_thread().name] * 2
    f = w.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        f.result()
    with Workers(2) as w2, pytest.raises(ZeroDivisionError):
        w2.map(lambda xs: [1 / x for x in xs], [1, 0, 2])


def test_thread_count():
    assert thread_count(3) == 3 and thread_count(0) >= 1 and thread_count(None) == thread_count(0)
    with pytest.raises(ValueError):
        thread_count(-1)
    with pytest.raises(ValueError, match="whole number"):  # a float slipped through, and Workers.map failed midway
        Workers(2.0)


def test_threads_change_nothing_stored_or_restored(tmp_path, family):
    """The example family ingested on 1 and on 4 threads gives the same rows, byte for byte, and
    restores the same files whatever the thread count."""
    from haagenti.config import LibraryConfig
    from haagenti.library import FragmentLibrary, ModelInput

    from helpers import sha256

    tables = []
    config = LibraryConfig(fragment_size=64 * 1024, batch_bytes=256 * 1024)  # many batches in flight
    for threads in (1, 4):
        lib = FragmentLibrary.open(str(tmp_path / f"lib{threads}"), config)
        lib.ingest_many([ModelInput([m.file], m.model_id, m.family) for m in family], threads=threads)
        frags = lib.store.read("fragments").sort_by("fragment_id")
        sigs = lib.store.read("signatures").sort_by("fragment_id")
        tables.append((frags, sigs))
        for m in family:
            [p] = lib.restore(m.model_id, str(tmp_path / f"out{threads}" / m.model_id), threads=5 - threads)
            assert sha256(p) == sha256(m.file)
    (f1, s1), (f4, s4) = tables
    assert f1.num_rows > 50 and f1.equals(f4) and s1.equals(s4)
    assert set(f1["encoding"].to_pylist()) >= {"plain", "delta_xor"}


def test_local_executor_streams_batches_in_order_with_a_step_per_thread():
    import pyarrow as pa

    from haagenti.executors import LocalExecutor

    made: list[int] = []
    calls: list[int] = []

    class Double:
        def __init__(self, factor: int):
            self.factor = factor
            made.append(threading.get_ident())

        def __call__(self, batch: pa.Table) -> pa.Table:
            time.sleep(0.01)
            calls.append(batch.num_rows)
            return pa.table({"x": pa.compute.multiply(batch["x"], self.factor)})

    table = pa.table({"x": list(range(100))})
    with LocalExecutor(threads=2) as executor:
        results = executor.map_batches(Double, (2,), table, 7)
        first = next(results)
        assert first["x"].to_pylist() == [2 * i for i in range(7)]
        assert len(calls) <= 4  # two slices per thread ahead, not the whole table
        rest = [x for t in results for x in t["x"].to_pylist()]
        assert rest == [2 * i for i in range(7, 100)]
        assert len(made) == len(set(made)) <= 2  # one step object per thread
        assert executor.map(lambda r: r["x"] + 1, [{"x": 1}, {"x": 2}]) == [2, 3]
