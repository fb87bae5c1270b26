"""One small thread-safe LRU cache, for every in-process cache of the project (text embeddings,
zero-shot classifiers, thumbnails)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_MISSING = object()


class LRUCache(Generic[K, V]):
    """Least-recently-used cache of at most ``max_items`` entries and, when ``max_size`` is given,
    at most ``max_size`` units in total as measured by ``size(value)`` (bytes, with ``size=len``
    on ``bytes`` values).

    Each method holds the cache's lock for a dictionary operation only; computing a missing value
    is the caller's job, outside the lock, so a slow computation never blocks other readers (two
    threads that miss the same key both compute it, and the later ``put`` wins).
    """

    def __init__(self, max_items: int, max_size: int | None = None, size: Callable[[V], int] | None = None):
        if (max_size is None) != (size is None):
            raise ValueError("give max_size and size together, or neither")
        self.max_items = max_items
        self.max_size = max_size
        self._size = size
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value stored for ``key`` (now the most recently used), or ``default``."""
        with self._lock:
            value = self._entries.get(key, _MISSING)
            if value is _MISSING:
                return default
            self._entries.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        """Store ``value`` as the most recently used entry, then drop the least recently used ones
        until the cache is within its bounds. A value larger than ``max_size`` alone is not kept."""
        cost = self._size(value) if self._size is not None else 0
        if self.max_items <= 0 or (self.max_size is not None and cost > self.max_size):
            return
        with self._lock:
            old = self._entries.pop(key, _MISSING)
            if old is not _MISSING:
                self._total -= self._cost(old)
            self._entries[key] = value
            self._total += cost
            while len(self._entries) > self.max_items or (self.max_size is not None and self._total > self.max_size):
                _, dropped = self._entries.popitem(last=False)
                self._total -= self._cost(dropped)

    def values(self) -> list[V]:
        """A snapshot of the stored values, least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def _cost(self, value: V) -> int:
        return self._size(value) if self._size is not None else 0


#: Words open_clip's tokenizer may memoise (:func:`bound_tokenizer_cache`).
TOKENIZER_CACHE_WORDS = 50_000


class BoundedWordCache(dict):
    """A dict that stops taking new entries at ``max_items``: open_clip's tokenizer memoises the
    BPE split of every word it meets (``SimpleTokenizer.cache``), so each distinct word a client
    sends would stay in memory for the life of the process. Entries are never removed, because
    the tokenizer reads the cache unlocked from several threads (``if token in cache: return
    cache[token]``) and a removal between the two steps would raise KeyError; a word past the
    bound is split again each time, which costs microseconds for a real word."""

    def __init__(self, entries: dict, max_items: int):
        super().__init__(entries)
        self.max_items = max_items

    def __setitem__(self, key, value) -> None:
        if len(self) < self.max_items:
            super().__setitem__(key, value)


def bound_tokenizer_cache(tokenizer, max_words: int = TOKENIZER_CACHE_WORDS) -> None:
    """Cap the word cache of an open_clip ``SimpleTokenizer`` at ``max_words`` entries (idempotent;
    tokenizers without such a cache are left alone)."""
    cache = getattr(tokenizer, "cache", None)
    if type(cache) is dict:
        tokenizer.cache = BoundedWordCache(cache, max_words)
