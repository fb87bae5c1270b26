"""indexer.cache.LRUCache: least recently used goes first, bounded by count and by size, thread-safe."""
import threading

import pytest

from indexer.cache import LRUCache

pytestmark = pytest.mark.unit


def test_evicts_the_least_recently_used():
    cache = LRUCache(3)
    for i in range(3):
        cache.put(i, str(i))
    assert cache.get(0) == "0"  # 0 is now the most recent: 1 goes next
    cache.put(3, "3")
    assert cache.get(1) is None and cache.get(1, "gone") == "gone"
    assert cache.values() == ["2", "0", "3"] and len(cache) == 3


def test_bounded_by_total_size():
    cache = LRUCache(100, max_size=10, size=len)
    cache.put("a", b"12345")
    cache.put("b", b"123456")  # 11 bytes together: "a" goes
    assert cache.values() == [b"123456"]
    cache.put("b", b"1")  # replacing a value gives its size back
    cache.put("c", b"123456789")
    assert cache.values() == [b"1", b"123456789"]
    cache.put("huge", b"x" * 11)  # larger than the whole bound: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 2


def test_zero_items_keeps_nothing():
    cache = LRUCache(0)
    cache.put("a", 1)
    assert len(cache) == 0


def test_size_bound_needs_a_size_function():
    with pytest.raises(ValueError):
        LRUCache(10, max_size=100)


def test_concurrent_use_keeps_the_bounds():
    cache = LRUCache(50, max_size=500, size=len)

    def work(n):
        for i in range(2000):
            cache.put((n, i % 80), b"x" * (i % 20))
            cache.get((n, (i * 7) % 80))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) <= 50 and sum(len(v) for v in cache.values()) <= 500
