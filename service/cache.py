"""The response cache: per image, the calibrated answer of one model version to one upload.

Keyed by the sha256 of the image's bytes, the model's name and its version (a file hash), so a
rebuilt model never answers from its predecessor's entries. Bounded twice: in entries, and in
bytes as accounted below; the least recently used entry goes first. A hit skips admission,
decoding and inference; the answer is the stored one, the same floats a fresh run gave.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from service.metrics import CacheMetrics

# Accounted per entry besides the key's and the answer's own bytes: the Python objects around them
# (OrderedDict node, key and answer objects, tuples, floats). tracemalloc measured 572 bytes per
# entry in all for 20,000 entries of a two-label model, which this accounts as 598.
ENTRY_OVERHEAD_BYTES = 512


@dataclass(frozen=True)
class CacheKey:
    digest: bytes  # sha256 of the upload's bytes
    model: str
    version: str


@dataclass(frozen=True)
class CachedAnswer:
    label: str
    probabilities: tuple[tuple[str, float], ...]
    confidence: float

    def accounted_bytes(self) -> int:
        return len(self.label) + sum(len(name) + 8 for name, _ in self.probabilities) + 8


def key_for(data: bytes, model: str, version: str) -> CacheKey:
    return CacheKey(hashlib.sha256(data).digest(), model, version)


class ResponseCache:
    def __init__(self, max_entries: int, max_bytes: int, metrics: CacheMetrics) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[CacheKey, CachedAnswer] = OrderedDict()
        self.size_bytes = 0
        self._metrics = metrics

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> CachedAnswer | None:
        answer = self._entries.get(key)
        self._metrics.lookups.labels(key.model, "miss" if answer is None else "hit").inc()
        if answer is not None:
            self._entries.move_to_end(key)
        return answer

    def put(self, key: CacheKey, answer: CachedAnswer) -> None:
        cost = _cost(key, answer)
        if cost > self.max_bytes:
            return  # could never fit: storing it would only empty the cache
        previous = self._entries.pop(key, None)
        if previous is not None:
            self.size_bytes -= _cost(key, previous)
        self._entries[key] = answer
        self.size_bytes += cost
        while len(self._entries) > self.max_entries:
            self._evict("entries")
        while self.size_bytes > self.max_bytes:
            self._evict("bytes")
        self._metrics.entries.set(len(self._entries))
        self._metrics.size_bytes.set(self.size_bytes)

    def _evict(self, reason: str) -> None:
        key, answer = self._entries.popitem(last=False)
        self.size_bytes -= _cost(key, answer)
        self._metrics.evictions.labels(reason).inc()


def _cost(key: CacheKey, answer: CachedAnswer) -> int:
    return (
        len(key.digest) + len(key.model) + len(key.version) + answer.accounted_bytes() + ENTRY_OVERHEAD_BYTES
    )
