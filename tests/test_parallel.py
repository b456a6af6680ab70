import threading

import pytest

from haagenti.parallel import Workers, thread_count


def test_map_keeps_order_and_uses_the_workers():
    seen: set[str] = set()

    def part(xs):
        seen.add(threading.current_thread().name)
        return [x * 2 for x in xs]

    with Workers(3) as w:
        assert w.map(part, list(range(10))) == [x * 2 for x in range(10)]
        assert w.each(lambda x: x + 1, range(5)) == [1, 2, 3, 4, 5]
        # a stage in the background fans out too: its first slice runs in its own thread
        assert w.submit(lambda: w.map(part, list(range(7)))).result() == [x * 2 for x in range(7)]
    assert len(seen) >= 2


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
