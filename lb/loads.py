"""The in-flight table that the gateway's worker processes share (see ``LoadTable``).

It sits beside the ring chooser (``lb.ring``) rather than inside either twin: both the Cython
ring and the pure one count into the same table, so it belongs to neither.
"""

from __future__ import annotations

import mmap
import multiprocessing

import mmh3

__all__ = ["LoadTable", "LocalCount"]


def _tag(namespace: str, key: str) -> int:
    """A non-zero 64-bit tag for (namespace, key): MurmurHash3, as the ring hashes its keys."""
    data = f"{namespace}\x00{key}".encode("utf-8", "surrogatepass")
    return mmh3.hash64(data, seed=0, x64arch=True, signed=False)[0] or 1  # 0 marks a free entry


class LoadTable:
    """In-flight counters shared by processes: one per (namespace, endpoint key), plus one
    total per namespace (the empty key), in an anonymous shared memory map.

    Create it before forking the workers; each child inherits the mapping. The layout is a
    fixed open-addressing hash table of 16-byte entries (64-bit key hash, signed 64-bit
    count) after a 64-byte header, so the Cython ring updates counts with one atomic add each
    and reads them with plain loads. Finding or inserting an entry (when an endpoint joins a
    ring, rare) takes the table's lock; entries are never removed (an endpoint that comes back
    finds its slot again, with whatever requests other workers still hold on it).

    The pure-Python ring updates counts under the lock, the Cython ring with atomics: all
    processes sharing a table must run the same ring implementation (they run one install).
    """

    HEADER = 64
    ENTRY = 16

    def __init__(self, capacity: int = 16384) -> None:
        if not isinstance(capacity, int) or not 2 <= capacity <= 1 << 24:
            raise ValueError("capacity must be an int in [2, 16777216]")
        self.capacity = capacity
        self.buffer = mmap.mmap(-1, self.HEADER + capacity * self.ENTRY)  # MAP_SHARED
        self._words = memoryview(self.buffer).cast("Q")  # keys, read without the lock
        self._counts = memoryview(self.buffer).cast("q")
        self._lock = multiprocessing.get_context("fork").Lock()

    def entry(self, namespace: str, key: str) -> int:
        """The entry index of (namespace, key), inserted if new. ``key=""`` is the namespace's
        total."""
        if not isinstance(namespace, str) or not isinstance(key, str):
            raise TypeError("namespace and endpoint key must be str")
        tag = _tag(namespace, key)
        base, words, capacity = self.HEADER // 8, self._words, self.capacity
        with self._lock:
            i = tag % capacity
            for _ in range(capacity):
                found = words[base + 2 * i]
                if found == tag:
                    return i
                if found == 0:
                    words[base + 2 * i] = tag
                    return i
                i = (i + 1) % capacity
        raise RuntimeError(f"the load table is full ({capacity} entries)")

    def offset(self, index: int) -> int:
        """Index of entry ``index``'s count in the table viewed as 64-bit words."""
        return self.HEADER // 8 + 2 * index + 1

    def add(self, index: int, delta: int) -> int:
        """Add ``delta`` to an entry's count under the lock; returns the new count."""
        counts, at = self._counts, self.offset(index)
        with self._lock:
            counts[at] += delta
            return counts[at]

    def value(self, index: int) -> int:
        """An entry's count (an aligned 8-byte read: never torn)."""
        return self._counts[self.offset(index)]

    def close(self) -> None:
        """Unmap the table; every ring using it must be gone first."""
        self._words.release()
        self._counts.release()
        self.buffer.close()


class LocalCount:
    """A ``SharedCount``'s interface (``inc``/``dec``/``value``) in one process: the counter a
    gateway keeps where its workers share no load table."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1
