# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: annotation_typing=False, binding=False, embedsignature=True
# (annotations document the twin's API but must not add Cython's own type checks, which would
# raise where the twin raises something else; binding=False makes methods plain C methods,
# ~10 ns less per pick than cyfunction wrappers)
"""Consistent hashing with bounded loads (CHWBL): the ring core in C.

``lb/chwbl.py`` is the specification. This module has the same API and, for every sequence
of operations, the same picks, tickets, loads, exceptions and ``stats()`` (the property tests in
``tests/test_ring_twins.py`` run both side by side). Only the *how* differs, because a pick sits
on every request's path:

* The ring is two parallel C arrays, sorted ``uint64`` vnode hashes and ``int32`` owner slots;
  per-slot loads and generations are C arrays too, so the bounded-load walk touches no Python
  object until it returns the chosen key.
* MurmurHash3 is computed natively (``_murmur3.h``) over the key's UTF-8, which CPython already
  holds for ASCII text: hashing an ASCII prompt prefix allocates nothing.
* A bucket index over the top bits of the hashes replaces the bisect: a pick reads one index
  entry and a cache line of hashes instead of ~log2(vnodes) scattered ones.
* Adapter membership is one byte per slot per adapter, found with a single dict lookup per
  pick, instead of a set lookup per visited vnode.
* When every eligible endpoint is at capacity, the twin walks the whole ring before falling
  back; here the walk stops once each eligible endpoint has been seen, and ``stats()`` still
  counts the full walk, so the observable results are identical.
* ``add`` merges the new endpoint's sorted vnodes into the arrays with ``memmove`` runs and
  ``remove`` compacts them: no other endpoint is rehashed.
* With a shared ``LoadTable`` each slot also holds a pointer to its counter in the shared
  memory map; acquire/release add to it (and to the model's total) with one atomic add each
  (``_atomic.h``), and the walk reads the shared counts instead of the local ones.
"""

cimport cython
from cpython cimport array
from cpython.bool cimport PyBool_Check
from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.exc cimport PyErr_Clear
from cpython.object cimport Py_SIZE
from cpython.list cimport PyList_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check
from cpython.set cimport PySet_GET_SIZE
from cpython.tuple cimport PyTuple_GET_SIZE
from cpython.unicode cimport PyUnicode_Check, PyUnicode_DATA, PyUnicode_GET_LENGTH
from libc.stdint cimport UINT32_MAX, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, qsort, realloc
from libc.string cimport memcpy, memmove, memset

cdef extern from "_murmur3.h":
    uint64_t kv_murmur3_64(const void *data, size_t length, uint64_t seed) noexcept nogil

cdef extern from "_atomic.h":
    int64_t kv_atomic_add(int64_t *counter, int64_t delta) noexcept nogil
    int64_t kv_atomic_load(const int64_t *counter) noexcept nogil

import array as _array

from lb.loads import LoadTable

cdef extern from "Python.h":
    # Declared here without Cython's ``except NULL``: a lone surrogate is not an error for
    # us, it just takes the slower ``surrogatepass`` route (see ``_hash_str``).
    const char *_utf8_and_size "PyUnicode_AsUTF8AndSize" (object s, Py_ssize_t *size) noexcept
    bint PyUnicode_IS_COMPACT_ASCII(object s) noexcept
    char *PyBytes_AS_STRING(object b) noexcept
    Py_ssize_t PyBytes_GET_SIZE(object b) noexcept

cdef extern from *:
    """
    /* The paper's bound, load < ceil(factor / 100 * m / n) with m = total + the request's
     * weight, as load * n * 100 < m * factor (see lb/chwbl.py), in integers so both twins
     * agree to the last request; 128-bit where available so no count can overflow it. */
    static inline int kv_load_ok(int64_t load, int64_t n, int64_t m, int64_t factor) {
    #ifdef __SIZEOF_INT128__
        return (__int128)load * n * 100 < (__int128)m * factor;
    #else
        return (long double)load * n * 100 < (long double)m * factor;
    #endif
    }
    static int kv_cmp_u64(const void *a, const void *b) {
        uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
        return (x > y) - (x < y);
    }
    """
    bint kv_load_ok(int64_t load, int64_t n, int64_t m, int64_t factor) noexcept nogil
    int kv_cmp_u64(const void *a, const void *b) noexcept nogil

__all__ = ["Ring", "LoadTable", "SharedCount", "hash64", "block_hashes", "MAX_ENDPOINTS", "SLOT_BITS",
           "MAX_WEIGHT"]

SLOT_BITS = 20
MAX_ENDPOINTS = 1 << SLOT_BITS
MAX_WEIGHT = 1 << 32
cdef enum:
    _C_SLOT_BITS = 20
cdef int64_t _SLOT_MASK = (1 << _C_SLOT_BITS) - 1
cdef Py_ssize_t _MAX_SLOTS = 1 << _C_SLOT_BITS
_U64 = (1 << 64) - 1
_DEFAULT_SEED = 0x9E3779B97F4A7C15
cdef frozenset _NO_ADAPTERS = frozenset()


# -- hashing ------------------------------------------------------------------------------------

cdef inline uint64_t _hash_str(object key) except? 0:
    """MurmurHash3 of ``key``'s UTF-8 without creating a bytes object on the common path."""
    cdef Py_ssize_t n
    cdef const char *data
    if PyUnicode_IS_COMPACT_ASCII(key):
        return kv_murmur3_64(PyUnicode_DATA(key), <size_t>PyUnicode_GET_LENGTH(key), 0)
    data = _utf8_and_size(key, &n)
    if data != NULL:
        return kv_murmur3_64(data, <size_t>n, 0)
    PyErr_Clear()  # lone surrogates: encode them as the twin does rather than reject the key
    cdef bytes raw = key.encode("utf-8", "surrogatepass")
    return kv_murmur3_64(PyBytes_AS_STRING(raw), <size_t>PyBytes_GET_SIZE(raw), 0)


cdef inline bytes _utf8(object key):
    """The bytes the twin hashes for ``key`` (surrogates passed through)."""
    try:
        return key.encode()
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogatepass")


def hash64(key: str) -> int:
    """First 64 bits of MurmurHash3 x64-128 (seed 0) over the UTF-8 of ``key``; lone
    surrogates are encoded with ``surrogatepass`` so any prompt still routes."""
    if not PyUnicode_Check(key):
        raise _not_str("key", key)
    return _hash_str(key)


# A typed mask: with the bare literal, Cython computes ``x & 0xFFFFFFFF`` on Python ints.
cdef uint64_t MASK32 = 0xFFFFFFFFULL
cdef array.array _HASHES = _array.array("Q")  # block_hashes' result type, cloned


def block_hashes(text: str, block_bytes: int, max_blocks: int) -> array.array:
    """Chained hashes of the full ``block_bytes`` blocks of ``text``'s UTF-8, at most
    ``max_blocks``, as an ``array('Q')`` (the twin, ``lb.chwbl.block_hashes``, says why): one
    pass over the bytes, no slice per block and no int object per hash."""
    cdef Py_ssize_t n, count, i, size = block_bytes, limit = max_blocks
    cdef const char *data
    cdef uint64_t parent = 0
    cdef bytes raw
    cdef array.array out
    cdef unsigned long long *hashes
    if not PyUnicode_Check(text):
        raise _not_str("text", text)
    if size < 1 or limit < 0:
        raise ValueError("block_bytes must be at least 1 and max_blocks at least 0")
    if PyUnicode_IS_COMPACT_ASCII(text):
        data = <const char *>PyUnicode_DATA(text)
        n = PyUnicode_GET_LENGTH(text)
    else:
        data = _utf8_and_size(text, &n)
        if data == NULL:
            PyErr_Clear()
            raw = text.encode("utf-8", "surrogatepass")
            data = PyBytes_AS_STRING(raw)
            n = PyBytes_GET_SIZE(raw)
    count = n // size
    if count > limit:
        count = limit
    out = array.clone(_HASHES, count, False)
    hashes = out.data.as_ulonglongs
    for i in range(count):
        parent = kv_murmur3_64(data + i * size, <size_t>size,
                               (parent ^ (parent >> 32)) & MASK32)
        hashes[i] = parent
    return out


# -- small helpers ------------------------------------------------------------------------------

cdef inline object _not_str(str what, object value):
    return TypeError(f"{what} must be str, not {type(value).__name__}")


cdef inline int _check_str(object value, str what) except -1:
    if not PyUnicode_Check(value):
        raise _not_str(what, value)
    return 0


cdef inline int64_t _weight(object weight) except -1:
    """A request's weight, checked exactly like the twin (same exception types)."""
    cdef int overflow = 0
    cdef long long value
    if not PyLong_Check(weight) or PyBool_Check(weight):
        raise TypeError(f"weight must be int, not {type(weight).__name__}")
    value = PyLong_AsLongLongAndOverflow(weight, &overflow)
    if overflow != 0 or not 1 <= value <= (<long long>1 << 32):
        raise ValueError(f"weight must be in [1, {MAX_WEIGHT}]")
    return value


cdef inline bint _is_empty(object collection) noexcept:
    """True for an empty tuple/list/set/frozenset: the common ``exclude=()`` then costs two
    pointer compares instead of the generic iteration (a str never counts as empty here, so
    ``exclude=""`` still gets the twin's TypeError)."""
    cdef type t = type(collection)
    if t is tuple:
        return PyTuple_GET_SIZE(collection) == 0
    if t is list:
        return PyList_GET_SIZE(collection) == 0
    if t is frozenset or t is set:
        return PySet_GET_SIZE(collection) == 0
    return False


cdef frozenset _adapter_set(object adapters):
    """Validate an adapter collection exactly like the twin (same exception types)."""
    if PyUnicode_Check(adapters):
        raise TypeError("adapters must be an iterable of str, not a str")
    cdef frozenset result = frozenset(adapters)
    for name in result:
        _check_str(name, "adapter")
    return result


cdef inline void *_grow(void *ptr, size_t nbytes) except NULL:
    """realloc that raises MemoryError and leaves ``ptr`` valid when it fails."""
    cdef void *out = realloc(ptr, nbytes if nbytes else 1)
    if out == NULL:
        raise MemoryError()
    return out


cdef inline Py_ssize_t _upper_bound(const uint64_t *a, Py_ssize_t n, uint64_t h) noexcept nogil:
    """First index whose hash is > h (used when merging new vnodes after equal hashes)."""
    cdef Py_ssize_t lo = 0, half
    while n > 0:
        half = n >> 1
        if a[lo + half] <= h:
            lo += half + 1
            n -= half + 1
        else:
            n = half
    return lo


cdef inline Py_ssize_t _lower_bound(const uint64_t *a, Py_ssize_t n, uint64_t h) noexcept nogil:
    """First index whose hash is >= h; branch-free halving so the CPU never mispredicts."""
    cdef Py_ssize_t base = 0, half
    if n == 0:
        return 0
    while n > 1:
        half = n >> 1
        base = base + half if a[base + half - 1] < h else base
        n -= half
    return base + (a[base] < h)


cdef inline int _write_decimal(char *out, uint32_t value) noexcept nogil:
    """``str(value)`` into ``out``; returns its length (vnode indexes are < 65536)."""
    cdef char tmp[10]
    cdef int n = 0, i
    while True:
        tmp[n] = <char>(48 + value % 10)
        n += 1
        value //= 10
        if value == 0:
            break
    for i in range(n):
        out[i] = tmp[n - 1 - i]
    return n


# -- adapter membership -------------------------------------------------------------------------

@cython.final
cdef class _Members:
    """Which slots serve one adapter: a byte per slot, so the walk tests membership with one
    load instead of a set lookup; ``count`` lets a pick know at once when nobody serves it."""
    cdef uint8_t *bits
    cdef Py_ssize_t count

    def __dealloc__(self):
        free(self.bits)


cdef _Members _new_members(Py_ssize_t capacity):
    cdef _Members m = _Members.__new__(_Members)
    m.bits = <uint8_t *>calloc(capacity if capacity else 1, 1)
    if m.bits == NULL:
        raise MemoryError()
    return m


# -- a shared counter outside any ring -----------------------------------------------------------

@cython.final
cdef class SharedCount:
    """One counter of a ``LoadTable`` outside any ring (e.g. a model's active requests, summed
    over the worker processes): ``inc``/``dec`` are one atomic add each."""
    cdef Py_buffer _view
    cdef bint _has_view
    cdef int64_t *_counter

    def __init__(self, table, namespace: str, key: str) -> None:
        if not isinstance(table, LoadTable):
            raise TypeError(f"table must be a LoadTable, not {type(table).__name__}")
        if self._has_view:
            raise RuntimeError("this counter is already attached to a load table")
        cdef Py_ssize_t word = table.offset(table.entry(namespace, key))
        PyObject_GetBuffer(table.buffer, &self._view, PyBUF_WRITABLE)
        self._has_view = True
        if word < 0 or (word + 1) * 8 > self._view.len:
            raise ValueError("load table entry out of range")
        self._counter = (<int64_t *>self._view.buf) + word

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)

    def inc(self) -> None:
        kv_atomic_add(self._counter, 1)

    def dec(self) -> None:
        kv_atomic_add(self._counter, -1)

    @property
    def value(self) -> int:
        return kv_atomic_load(self._counter)


# -- the ring -----------------------------------------------------------------------------------

cdef struct _Scan:
    # What a scoring pick reads once before its C scan (``Ring._open_scan``): the adapter's
    # member bits (NULL: every endpoint), whether exclusions are stamped, and per-slot shares
    # and engine queues (one allocation, ``share``, that the caller frees).
    const uint8_t *member
    bint use_excl
    double *share
    double *queue


cdef class Ring:
    """The CHWBL ring plus per-endpoint in-flight loads, and the LeastLoad and Random picks
    over the same endpoint set (so every strategy shares one accounting)."""

    # vnodes, sorted by (hash, endpoint key)
    cdef uint64_t *_hashes
    cdef int32_t *_owners
    cdef Py_ssize_t _n_vnodes, _vnode_cap
    # _bucket[k] = first vnode whose hash >> _shift >= k: a pick jumps to its bucket and scans
    # a few vnodes instead of bisecting the whole array (whose cache misses dominated a pick)
    cdef uint32_t *_bucket
    cdef Py_ssize_t _n_buckets
    cdef int _shift
    # per slot (a slot is an endpoint's index; freed slots are reused lowest first)
    cdef int64_t *_loads
    cdef int64_t *_gens          # 0 = free slot
    cdef uint32_t *_excl         # == _excl_epoch: excluded from the current pick
    cdef uint32_t *_seen         # == _seen_epoch: already found over the bound in this walk
    cdef int32_t *_excl_list     # the distinct excluded slots of the current pick
    cdef Py_ssize_t _n_slots, _slot_cap, _n_live, _n_excl
    cdef uint32_t _excl_epoch, _seen_epoch
    cdef list _keys              # slot -> key or None
    cdef list _adapters          # slot -> frozenset
    cdef dict _slot_of           # key -> slot
    cdef dict _members           # adapter -> _Members (only adapters some endpoint has)
    cdef int64_t _total, _last_gen, _factor
    cdef int _replication
    cdef uint64_t _rand
    cdef Py_ssize_t _cursor
    cdef uint64_t _lookups, _iterations, _fallbacks
    # shared loads (NULL without a LoadTable): per slot, its counter in the table's map
    cdef object _table
    cdef str _namespace
    cdef Py_buffer _view
    cdef bint _has_view
    cdef int64_t **_sh_loads
    cdef int64_t *_sh_total

    def __cinit__(self, *args, **kwargs):
        self._keys = []
        self._adapters = []
        self._slot_of = {}
        self._members = {}
        self._excl_epoch = 0
        self._seen_epoch = 0

    def __init__(self, replication: int = 256, mean_load_factor: int = 125,
                 seed: int = _DEFAULT_SEED, loads=None, namespace: str = "") -> None:
        if not isinstance(replication, int) or not 1 <= replication <= 65536:
            raise ValueError("replication must be an int in [1, 65536]")
        self._replication = replication
        self.mean_load_factor = mean_load_factor
        self._rand = (seed & _U64) or _DEFAULT_SEED
        if loads is not None and not isinstance(loads, LoadTable):
            raise TypeError(f"loads must be a LoadTable, not {type(loads).__name__}")
        _check_str(namespace, "namespace")
        self._namespace = namespace
        if loads is not None:
            self._attach(loads)

    def __dealloc__(self):
        free(self._hashes)
        free(self._owners)
        free(self._bucket)
        free(self._loads)
        free(self._gens)
        free(self._excl)
        free(self._seen)
        free(self._excl_list)
        free(self._sh_loads)
        if self._has_view:
            PyBuffer_Release(&self._view)

    # -- configuration ---------------------------------------------------------------------

    @property
    def replication(self) -> int:
        return self._replication

    @property
    def mean_load_factor(self) -> int:
        return self._factor

    @mean_load_factor.setter
    def mean_load_factor(self, value: int) -> None:
        if not isinstance(value, int) or not 100 <= value <= 1_000_000:
            raise ValueError("mean_load_factor must be an int in [100, 1000000] (percent)")
        self._factor = value

    @mean_load_factor.deleter
    def mean_load_factor(self) -> None:
        raise AttributeError("can't delete attribute 'mean_load_factor'")

    # -- endpoints -------------------------------------------------------------------------

    def add(self, key: str, adapters=()) -> None:
        """Add an endpoint; its vnodes are merged in, the rest of the ring is not rehashed."""
        _check_str(key, "endpoint key")
        if PyUnicode_GET_LENGTH(key) == 0:
            raise ValueError("endpoint key must not be empty")
        if key in self._slot_of:
            raise ValueError(f"endpoint {key!r} is already in the ring")
        cdef frozenset adapter_set = _adapter_set(adapters)
        if key in self._slot_of:  # a generator of adapters could have added it meanwhile
            raise ValueError(f"endpoint {key!r} is already in the ring")
        cdef int64_t *shared = NULL
        if self._table is not None:
            shared = self._counter(self._table.entry(self._namespace, key))
        cdef Py_ssize_t slot = self._free_slot()
        self._merge_vnodes(key, <int32_t>slot)
        self._last_gen += 1
        self._keys[slot] = key
        self._gens[slot] = self._last_gen
        self._loads[slot] = 0
        self._adapters[slot] = adapter_set
        self._slot_of[key] = slot
        if shared != NULL:
            self._sh_loads[slot] = shared
        self._n_live += 1
        self._join_members(slot, adapter_set)

    def remove(self, key: str) -> None:
        """Remove an endpoint; its in-flight requests leave ``total`` now, and their later
        releases are recognised as stale by generation."""
        cdef Py_ssize_t slot = self._slot(key)
        self._share(slot, -self._loads[slot])  # other processes' requests stay counted
        self._total -= self._loads[slot]
        self._loads[slot] = 0
        self._leave_members(slot, self._adapters[slot])
        self._keys[slot] = None
        self._gens[slot] = 0
        self._adapters[slot] = _NO_ADAPTERS
        del self._slot_of[key]
        self._n_live -= 1
        self._drop_vnodes(<int32_t>slot)
        self._rebuild_buckets()

    def set_adapters(self, key: str, adapters) -> None:
        # The twin evaluates the adapter set before looking the key up (assignment order).
        cdef frozenset adapter_set = _adapter_set(adapters)
        cdef Py_ssize_t slot = self._slot(key)
        self._leave_members(slot, self._adapters[slot])
        self._adapters[slot] = adapter_set
        self._join_members(slot, adapter_set)

    def adapters(self, key: str) -> frozenset:
        return self._adapters[self._slot(key)]

    def keys(self) -> list:
        """Endpoint keys in slot order."""
        return [k for k in self._keys if k is not None]

    def __len__(self) -> int:
        return self._n_live

    def __contains__(self, key: object) -> bool:
        return key in self._slot_of

    def slot_of(self, key: str) -> int:
        """The endpoint's slot: its index in the share arrays the scoring picks read (and its
        replica number in CacheAware's prefix index). Stable while the endpoint stays."""
        return self._slot(key)

    # -- loads -----------------------------------------------------------------------------

    @property
    def total(self) -> int:
        """In-flight requests over all endpoints (of every process sharing the table)."""
        return self._total_now()

    def load(self, key: str) -> int:
        return self._load_at(self._slot(key))

    def acquire(self, key: str, weight=1) -> int:
        """Count one more in-flight request of ``weight`` on ``key``; returns the ticket for
        ``release`` (which takes the same weight)."""
        cdef Py_ssize_t slot = self._slot(key)
        cdef int64_t w = 1 if weight is 1 else _weight(weight)
        self._loads[slot] += w
        self._total += w
        self._share(slot, w)
        return (self._gens[slot] << _C_SLOT_BITS) | slot

    def release(self, ticket, weight=1) -> bool:
        """End one in-flight request of ``weight``. False when its endpoint has gone since
        (nothing to do)."""
        cdef int overflow = 0
        cdef long long value
        cdef int64_t gen, slot, w
        if not PyLong_Check(ticket) or PyBool_Check(ticket):
            raise TypeError(f"ticket must be int, not {type(ticket).__name__}")
        w = 1 if weight is 1 else _weight(weight)
        value = PyLong_AsLongLongAndOverflow(ticket, &overflow)
        # Out of 64-bit range means negative or a generation never issued: both unknown.
        if overflow != 0 or value < 0:
            raise ValueError(f"unknown ticket {ticket}")
        gen = value >> _C_SLOT_BITS
        slot = value & _SLOT_MASK
        if gen == 0 or gen > self._last_gen or slot >= self._n_slots:
            raise ValueError(f"unknown ticket {ticket}")
        if self._gens[slot] != gen:
            return False
        if self._loads[slot] < w:
            raise ValueError(f"ticket {ticket} released more often than acquired")
        self._loads[slot] -= w
        self._total -= w
        self._share(slot, -w)
        return True

    # -- picks -----------------------------------------------------------------------------

    def pick(self, hash_key: str, adapter: str = "", exclude=(), weight=1):
        """CHWBL: the endpoint for ``hash_key`` within the load bound for a request of
        ``weight``, or None if no endpoint (outside ``exclude``) serves ``adapter``. Does not
        acquire."""
        cdef const uint8_t *member = NULL
        cdef bint use_excl = False
        cdef Py_ssize_t eligible, start
        cdef uint64_t h
        cdef _Members m
        if not PyUnicode_Check(hash_key):
            raise _not_str("hash key", hash_key)
        if not PyUnicode_Check(adapter):
            raise _not_str("adapter", adapter)
        cdef int64_t w = 1 if weight is 1 else _weight(weight)
        if self._n_vnodes == 0:
            return None
        if not _is_empty(exclude):
            use_excl = self._mark_excluded(exclude)
        self._lookups += 1
        h = _hash_str(hash_key)
        eligible = self._n_live
        if PyUnicode_GET_LENGTH(adapter) != 0:
            found = self._members.get(adapter)
            if found is None:
                eligible = 0
            else:
                m = <_Members>found
                member = m.bits
                eligible = m.count
        if use_excl:
            eligible -= self._excluded_eligible(member)
        if eligible <= 0:
            self._iterations += <uint64_t>self._n_vnodes
            return None
        start = self._find(h)
        return self._keys[self._walk(start, member, use_excl, eligible, w)]

    def pick_scored(self, hash_key: str, adapter: str, exclude, weight, shares, queues,
                    double prefix_weight, double load_weight, double queue_weight):
        """CacheAware: the best-scoring endpoint within the CHWBL bound (see the twin,
        ``lb.chwbl.Ring.pick_scored``, for the score; the same float operations in the same
        order, so both twins pick alike to the last bit). The shares (an ``array('d')`` by
        slot: one copy) and queues are read once into per-slot arrays; the scan is C."""
        cdef _Scan scan
        cdef Py_ssize_t slot, best = -1, home_slot, n_slots = self._n_slots
        cdef int64_t n, m, factor = self._factor
        cdef double capacity, longest = 0.0, score, best_score = 0.0
        home = self.pick(hash_key, adapter, exclude, weight)
        if home is None or not shares:
            return home
        cdef int64_t w = 1 if weight is 1 else _weight(weight)
        self._open_scan(&scan, adapter, exclude, shares, queues)
        try:
            n = self._n_live
            m = self._total_now() + w
            home_slot = <Py_ssize_t>self._slot_of[home]
            for slot in range(n_slots):  # the longest engine queue among the candidates
                if (scan.queue[slot] > longest
                        and self._candidate(slot, scan.member, scan.use_excl, n, m, factor)):
                    longest = scan.queue[slot]
            capacity = <double>(factor * m) / (100.0 * <double>n)
            for slot in range(n_slots):
                if not self._candidate(slot, scan.member, scan.use_excl, n, m, factor):
                    continue
                score = prefix_weight * scan.share[slot]
                score += load_weight * (1.0 - <double>self._load_at(slot) / capacity)
                if longest > 0.0:
                    score += queue_weight * (1.0 - scan.queue[slot] / longest)
                else:
                    score += queue_weight
                if best < 0 or score > best_score or (score == best_score and slot == home_slot):
                    best = slot
                    best_score = score
        finally:
            free(scan.share)
        if best < 0:
            return home
        return self._keys[best]

    def pick_cost(self, hash_key: str, adapter: str, exclude, weight, shares, queues,
                  double prompt_tokens, double load_tokens, double queue_tokens):
        """CacheAware's cost model: the endpoint within the CHWBL bound with the lowest
        estimated time to first token (see the twin, ``lb.chwbl.Ring.pick_cost``; the same
        float operations in the same order). Shares and queues are read into per-slot arrays
        once, as for ``pick_scored``; the scan is C."""
        cdef _Scan scan
        cdef Py_ssize_t slot, step, best = -1, home_slot, n_slots = self._n_slots
        cdef int64_t n, m, factor = self._factor
        cdef double cost, best_cost = 0.0
        home = self.pick(hash_key, adapter, exclude, weight)
        if home is None:
            return None
        cdef int64_t w = 1 if weight is 1 else _weight(weight)
        self._open_scan(&scan, adapter, exclude, shares, queues)
        try:
            n = self._n_live
            m = self._total_now() + w
            home_slot = <Py_ssize_t>self._slot_of[home]
            for step in range(n_slots):  # from the home on, so the first of equals wins
                slot = home_slot + step
                if slot >= n_slots:
                    slot -= n_slots
                if not self._candidate(slot, scan.member, scan.use_excl, n, m, factor):
                    continue
                cost = load_tokens * <double>self._load_at(slot)
                cost += queue_tokens * scan.queue[slot]
                cost += prompt_tokens * (1.0 - scan.share[slot])
                if best < 0 or cost < best_cost:
                    best = slot
                    best_cost = cost
        finally:
            free(scan.share)
        if best < 0:
            return home
        return self._keys[best]

    def pick_least_load(self, adapter: str = "", exclude=()):
        """The matching endpoint with the fewest in-flight requests; ties rotate so idle
        endpoints share sequential traffic instead of the first one taking all of it."""
        cdef const uint8_t *member = NULL
        cdef bint use_excl = False
        cdef Py_ssize_t best
        _check_str(adapter, "adapter")
        if not _is_empty(exclude):
            use_excl = self._mark_excluded(exclude)
        if PyUnicode_GET_LENGTH(adapter) != 0:
            found = self._members.get(adapter)
            if found is None:
                return None
            member = (<_Members>found).bits
        best = self._least_loaded(member, use_excl)
        if best < 0:
            return None
        self._cursor = best + 1
        return self._keys[best]

    def pick_random(self, adapter: str = "", exclude=()):
        """Uniform over matching endpoints: what a plain Kubernetes Service does. The generator
        is xorshift64, seeded per ring, so runs are reproducible."""
        cdef const uint8_t *member = NULL
        cdef bint use_excl = False
        cdef Py_ssize_t count
        _check_str(adapter, "adapter")
        if not _is_empty(exclude):
            use_excl = self._mark_excluded(exclude)
        if PyUnicode_GET_LENGTH(adapter) != 0:
            found = self._members.get(adapter)
            if found is None:
                return None
            member = (<_Members>found).bits
        count = self._count_matching(member, use_excl)
        if count == 0:
            return None
        return self._keys[self._nth_matching(member, use_excl,
                                             <Py_ssize_t>(self._next_random() % <uint64_t>count))]

    def stats(self) -> tuple:
        """(lookups, vnodes visited, fallbacks to the default endpoint) since creation."""
        return self._lookups, self._iterations, self._fallbacks

    # -- internals: the walk ---------------------------------------------------------------

    @cython.final
    cdef inline bint _eligible(self, Py_ssize_t slot, const uint8_t *member,
                               bint use_excl) noexcept nogil:
        """Serves the adapter and is not excluded (free slots own no vnode and no bit)."""
        if member != NULL and not member[slot]:
            return False
        return not (use_excl and self._excl[slot] == self._excl_epoch)

    @cython.final
    cdef int _open_scan(self, _Scan *scan, str adapter, object exclude, object shares,
                        object queues) except -1:
        """Fill ``scan`` for a scoring pick: stamp the exclusions, find the adapter's member
        bits, read shares and queues into one zeroed allocation the caller frees."""
        cdef Py_ssize_t n_slots = self._n_slots
        scan.member = NULL
        scan.use_excl = False
        if not _is_empty(exclude):
            scan.use_excl = self._mark_excluded(exclude)
        if PyUnicode_GET_LENGTH(adapter) != 0:
            scan.member = (<_Members>self._members[adapter]).bits
        scan.share = <double *>calloc(2 * n_slots, sizeof(double))
        if scan.share == NULL:
            raise MemoryError()
        scan.queue = scan.share + n_slots
        try:
            if shares:
                self._shares_per_slot(shares, scan.share)
            if queues:
                self._per_slot(queues, scan.queue)
        except BaseException:
            free(scan.share)
            raise
        return 0

    @cython.final
    cdef int _shares_per_slot(self, object shares, double *out) except -1:
        """``out[slot]`` = ``shares[slot]`` for the slots both have: an ``array('d')`` in one
        copy, any other sequence of numbers item by item."""
        cdef Py_ssize_t n_slots = self._n_slots, slot = 0
        if type(shares) is array.array and (<array.array>shares).ob_descr.typecode == b'd':
            memcpy(out, (<array.array>shares).data.as_doubles,
                   min(Py_SIZE(shares), n_slots) * sizeof(double))
            return 0
        for value in shares:
            if slot == n_slots:
                break
            out[slot] = <double>value
            slot += 1
        return 0

    @cython.final
    cdef int _per_slot(self, object values, double *out) except -1:
        """``out[slot]`` = the value of each endpoint key in ``values`` (others ignored)."""
        for key, value in values.items():
            found = self._slot_of.get(key)
            if found is not None:
                out[<Py_ssize_t>found] = <double>value
        return 0

    @cython.final
    cdef inline bint _candidate(self, Py_ssize_t slot, const uint8_t *member, bint use_excl,
                                int64_t n, int64_t m, int64_t factor) noexcept nogil:
        """A live slot that serves the adapter, is not excluded and is within the bound."""
        return (self._gens[slot] != 0 and self._eligible(slot, member, use_excl)
                and kv_load_ok(self._load_at(slot), n, m, factor))

    @cython.final
    cdef Py_ssize_t _walk(self, Py_ssize_t i, const uint8_t *member, bint use_excl,
                          Py_ssize_t eligible, int64_t weight) noexcept nogil:
        """Clockwise from vnode ``i``: the first eligible slot within the bound, else the
        first eligible one. The twin finds "else" by walking the whole ring; here the walk
        stops once each of the ``eligible`` (> 0) distinct slots has failed the bound, since
        the rest of the ring cannot change the answer, and ``stats()`` still counts the full
        walk. (Capacities sum to at least total + 1, so "else" needs an adapter or exclusion
        that leaves only full endpoints eligible.)"""
        cdef Py_ssize_t n_vnodes = self._n_vnodes, step, rejected = 0, default = -1
        cdef int32_t slot
        cdef int64_t n = self._n_live, m = self._total_now() + weight, factor = self._factor
        cdef bint seen_ready = False
        for step in range(n_vnodes):
            slot = self._owners[i]
            if self._eligible(slot, member, use_excl):
                if default < 0:
                    default = slot
                if kv_load_ok(self._load_at(slot), n, m, factor):
                    self._iterations += <uint64_t>(step + 1)
                    return slot
                if not seen_ready:
                    self._next_seen_epoch()
                    seen_ready = True
                if self._seen[slot] != self._seen_epoch:
                    self._seen[slot] = self._seen_epoch
                    rejected += 1
                    if rejected == eligible:
                        break
            i += 1
            if i == n_vnodes:
                i = 0
        self._iterations += <uint64_t>n_vnodes
        self._fallbacks += 1
        return default

    @cython.final
    cdef void _next_seen_epoch(self) noexcept nogil:
        self._seen_epoch += 1
        if self._seen_epoch == 0:  # wrapped: old stamps could alias the new epoch
            memset(self._seen, 0, <size_t>self._slot_cap * sizeof(uint32_t))
            self._seen_epoch = 1

    @cython.final
    cdef int _mark_excluded(self, object exclude) except -1:
        """Stamp the slots of ``exclude`` for this pick; 1 if any endpoint is excluded.
        Unknown keys are ignored, unhashable ones raise, as in the twin."""
        cdef Py_ssize_t slot
        if PyUnicode_Check(exclude):
            raise TypeError("exclude must be a collection of endpoint keys, not a str")
        self._excl_epoch += 1
        if self._excl_epoch == 0:
            memset(self._excl, 0, <size_t>self._slot_cap * sizeof(uint32_t))
            self._excl_epoch = 1
        self._n_excl = 0
        for key in exclude:
            found = self._slot_of.get(key)
            if found is None:
                continue
            slot = <Py_ssize_t>found
            if self._excl[slot] != self._excl_epoch:
                self._excl[slot] = self._excl_epoch
                self._excl_list[self._n_excl] = <int32_t>slot
                self._n_excl += 1
        return self._n_excl > 0

    @cython.final
    cdef Py_ssize_t _excluded_eligible(self, const uint8_t *member) noexcept nogil:
        """How many live excluded slots serve the adapter (they leave the eligible count)."""
        cdef Py_ssize_t k, count = 0
        cdef int32_t slot
        for k in range(self._n_excl):
            slot = self._excl_list[k]
            if self._gens[slot] != 0 and (member == NULL or member[slot]):
                count += 1
        return count

    @cython.final
    cdef Py_ssize_t _least_loaded(self, const uint8_t *member, bint use_excl) noexcept nogil:
        cdef Py_ssize_t n_slots = self._n_slots, step, slot, best = -1
        cdef int64_t best_load = -1, load
        if n_slots == 0:
            return -1
        slot = self._cursor % n_slots
        for step in range(n_slots):
            if self._gens[slot] != 0 and self._eligible(slot, member, use_excl):
                load = self._load_at(slot)
                if best < 0 or load < best_load:
                    best = slot
                    best_load = load
            slot += 1
            if slot == n_slots:
                slot = 0
        return best

    @cython.final
    cdef Py_ssize_t _count_matching(self, const uint8_t *member, bint use_excl) noexcept nogil:
        cdef Py_ssize_t slot, count = 0
        for slot in range(self._n_slots):
            if self._gens[slot] != 0 and self._eligible(slot, member, use_excl):
                count += 1
        return count

    @cython.final
    cdef Py_ssize_t _nth_matching(self, const uint8_t *member, bint use_excl,
                                  Py_ssize_t nth) noexcept nogil:
        cdef Py_ssize_t slot
        for slot in range(self._n_slots):
            if self._gens[slot] != 0 and self._eligible(slot, member, use_excl):
                if nth == 0:
                    return slot
                nth -= 1
        return -1

    @cython.final
    cdef uint64_t _next_random(self) noexcept nogil:
        cdef uint64_t x = self._rand
        x ^= x << 13
        x ^= x >> 7
        x ^= x << 17
        self._rand = x
        return x

    @cython.final
    cdef inline Py_ssize_t _find(self, uint64_t h) noexcept nogil:
        """Index of the first vnode with hash >= h, wrapping to 0 past the end."""
        cdef Py_ssize_t i, end
        cdef const uint64_t *hashes = self._hashes
        if self._bucket == NULL:
            i = _lower_bound(hashes, self._n_vnodes, h)
        else:
            i = self._bucket[h >> self._shift]
            end = self._bucket[(h >> self._shift) + 1]
            while i < end and hashes[i] < h:
                i += 1
        return 0 if i == self._n_vnodes else i

    @cython.final
    cdef int _rebuild_buckets(self) noexcept nogil:
        """About four vnodes per bucket: the table stays small enough for the cache (16 KB at
        64 endpoints x 256 vnodes) and the scan inside a bucket is one cache line."""
        cdef Py_ssize_t n = self._n_vnodes, i, k = 0, n_buckets
        cdef uint32_t *table
        cdef int bits = 1
        cdef uint64_t top
        if n < 64 or n >= <Py_ssize_t>UINT32_MAX:  # tiny ring: bisect is as fast; huge: indexes overflow
            free(self._bucket)
            self._bucket = NULL
            return 0
        while (<Py_ssize_t>1 << (bits + 3)) <= n and bits < 30:
            bits += 1
        n_buckets = <Py_ssize_t>1 << bits
        if n_buckets != self._n_buckets or self._bucket == NULL:
            table = <uint32_t *>realloc(self._bucket, (n_buckets + 1) * sizeof(uint32_t))
            if table == NULL:  # no memory for the index: picks bisect instead, still correct
                free(self._bucket)
                self._bucket = NULL
                self._n_buckets = 0
                return 0
            self._bucket = table
            self._n_buckets = n_buckets
        self._shift = 64 - bits
        for i in range(n):
            top = self._hashes[i] >> self._shift
            while k <= <Py_ssize_t>top:
                self._bucket[k] = <uint32_t>i
                k += 1
        while k <= n_buckets:
            self._bucket[k] = <uint32_t>n
            k += 1
        return 0

    # -- internals: shared loads -----------------------------------------------------------

    @cython.final
    cdef int _attach(self, object table) except -1:
        """Hold a buffer on the table's map (it cannot be unmapped under us) and find the
        model's total."""
        if self._has_view:
            raise RuntimeError("this ring is already attached to a load table")
        PyObject_GetBuffer(table.buffer, &self._view, PyBUF_WRITABLE)
        self._has_view = True
        self._table = table
        self._sh_total = self._counter(table.entry(self._namespace, ""))
        if self._slot_cap:
            self._sh_loads = <int64_t **>calloc(<size_t>self._slot_cap, sizeof(int64_t *))
            if self._sh_loads == NULL:
                raise MemoryError()
        return 0

    @cython.final
    cdef int64_t *_counter(self, object index) except NULL:
        cdef Py_ssize_t word = self._table.offset(index)
        if word < 0 or (word + 1) * 8 > self._view.len:
            raise ValueError("load table entry out of range")
        return (<int64_t *>self._view.buf) + word

    @cython.final
    cdef inline int64_t _load_at(self, Py_ssize_t slot) noexcept nogil:
        if self._sh_total != NULL:
            return kv_atomic_load(self._sh_loads[slot])
        return self._loads[slot]

    @cython.final
    cdef inline int64_t _total_now(self) noexcept nogil:
        if self._sh_total != NULL:
            return kv_atomic_load(self._sh_total)
        return self._total

    @cython.final
    cdef inline void _share(self, Py_ssize_t slot, int64_t delta) noexcept nogil:
        """Apply this process's change to the shared counters, if any."""
        if self._sh_total != NULL and delta != 0:
            kv_atomic_add(self._sh_loads[slot], delta)
            kv_atomic_add(self._sh_total, delta)

    # -- internals: slots and membership ---------------------------------------------------

    @cython.final
    cdef Py_ssize_t _slot(self, object key) except -1:
        _check_str(key, "endpoint key")
        found = self._slot_of.get(key)
        if found is None:
            raise KeyError(f"unknown endpoint {key!r}")
        return <Py_ssize_t>found

    @cython.final
    cdef Py_ssize_t _free_slot(self) except -1:
        """The lowest free slot, growing the per-slot arrays when none is free."""
        cdef Py_ssize_t slot
        if self._n_live < self._n_slots:
            for slot in range(self._n_slots):
                if self._gens[slot] == 0:
                    return slot
        if self._n_slots >= _MAX_SLOTS:
            raise ValueError(f"a ring holds at most {MAX_ENDPOINTS} endpoints")
        self._reserve_slots(self._n_slots + 1)
        self._keys.append(None)
        self._adapters.append(_NO_ADAPTERS)
        slot = self._n_slots
        self._n_slots += 1
        return slot

    @cython.final
    cdef int _reserve_slots(self, Py_ssize_t need) except -1:
        """Grow every per-slot array (adapter bitmaps included) to hold ``need`` slots."""
        cdef Py_ssize_t old = self._slot_cap, cap
        cdef _Members m
        if need <= old:
            return 0
        cap = max(need, 2 * old, 8)
        self._loads = <int64_t *>_grow(self._loads, cap * sizeof(int64_t))
        self._gens = <int64_t *>_grow(self._gens, cap * sizeof(int64_t))
        self._excl = <uint32_t *>_grow(self._excl, cap * sizeof(uint32_t))
        self._seen = <uint32_t *>_grow(self._seen, cap * sizeof(uint32_t))
        self._excl_list = <int32_t *>_grow(self._excl_list, cap * sizeof(int32_t))
        if self._sh_total != NULL:
            self._sh_loads = <int64_t **>_grow(self._sh_loads, cap * sizeof(int64_t *))
            memset(self._sh_loads + old, 0, (cap - old) * sizeof(int64_t *))
        for found in self._members.values():
            m = <_Members>found
            m.bits = <uint8_t *>_grow(m.bits, <size_t>cap)
            memset(m.bits + old, 0, <size_t>(cap - old))
        memset(self._loads + old, 0, (cap - old) * sizeof(int64_t))
        memset(self._gens + old, 0, (cap - old) * sizeof(int64_t))
        memset(self._excl + old, 0, (cap - old) * sizeof(uint32_t))
        memset(self._seen + old, 0, (cap - old) * sizeof(uint32_t))
        self._slot_cap = cap
        return 0

    @cython.final
    cdef int _join_members(self, Py_ssize_t slot, frozenset adapter_set) except -1:
        cdef _Members m
        for name in adapter_set:
            found = self._members.get(name)
            if found is None:
                m = _new_members(self._slot_cap)
                self._members[name] = m
            else:
                m = <_Members>found
            if not m.bits[slot]:
                m.bits[slot] = 1
                m.count += 1
        return 0

    @cython.final
    cdef int _leave_members(self, Py_ssize_t slot, frozenset adapter_set) except -1:
        """Clear ``slot``'s bits; an adapter nobody serves any more leaves the dict, so a pick
        for it answers None after one failed lookup."""
        cdef _Members m
        for name in adapter_set:
            found = self._members.get(name)
            if found is None:
                continue
            m = <_Members>found
            if m.bits[slot]:
                m.bits[slot] = 0
                m.count -= 1
                if m.count == 0:
                    del self._members[name]
        return 0

    # -- internals: vnodes -----------------------------------------------------------------

    @cython.final
    cdef int _merge_vnodes(self, object key, int32_t slot) except -1:
        """Hash ``key#0 .. key#(r-1)``, sort them, and merge them into the arrays."""
        cdef Py_ssize_t r = self._replication
        cdef uint64_t *fresh = <uint64_t *>_grow(NULL, r * sizeof(uint64_t))
        try:
            self._hash_vnodes(key, fresh, r)
            qsort(fresh, <size_t>r, sizeof(uint64_t), kv_cmp_u64)
            self._reserve_vnodes(self._n_vnodes + r)
            self._merge_sorted(fresh, r, key, slot)
            self._rebuild_buckets()
        finally:
            free(fresh)
        return 0

    @cython.final
    cdef int _hash_vnodes(self, object key, uint64_t *out, Py_ssize_t r) except -1:
        """The twin hashes ``f"{key}#{i}"``: the key's bytes, ``#``, then ``i`` in decimal."""
        cdef bytes raw = _utf8(key)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(raw), i
        cdef char *buf = <char *>_grow(NULL, <size_t>(n + 16))
        memcpy(buf, PyBytes_AS_STRING(raw), <size_t>n)
        buf[n] = 35  # '#'
        for i in range(r):
            out[i] = kv_murmur3_64(buf, <size_t>(n + 1 + _write_decimal(buf + n + 1, <uint32_t>i)), 0)
        free(buf)
        return 0

    @cython.final
    cdef int _reserve_vnodes(self, Py_ssize_t need) except -1:
        cdef Py_ssize_t cap
        if need <= self._vnode_cap:
            return 0
        cap = max(need, self._vnode_cap + self._vnode_cap // 2, 256)
        self._hashes = <uint64_t *>_grow(self._hashes, cap * sizeof(uint64_t))
        self._owners = <int32_t *>_grow(self._owners, cap * sizeof(int32_t))
        self._vnode_cap = cap
        return 0

    @cython.final
    cdef int _merge_sorted(self, const uint64_t *fresh, Py_ssize_t r, object key,
                           int32_t slot) except -1:
        """Merge from the back: each new vnode's old successors move up in one memmove, so the
        cost is one pass over the ring. Equal hashes order by endpoint key, as in the twin."""
        cdef uint64_t *hashes = self._hashes
        cdef int32_t *owners = self._owners
        cdef Py_ssize_t end = self._n_vnodes, j, p, run
        cdef uint64_t h
        for j in range(r - 1, -1, -1):
            h = fresh[j]
            p = _upper_bound(hashes, end, h)
            while p > 0 and hashes[p - 1] == h and self._keys[owners[p - 1]] > key:
                p -= 1
            run = end - p
            if run:
                memmove(hashes + p + j + 1, hashes + p, run * sizeof(uint64_t))
                memmove(owners + p + j + 1, owners + p, run * sizeof(int32_t))
            hashes[p + j] = h
            owners[p + j] = slot
            end = p
        self._n_vnodes += r
        return 0

    @cython.final
    cdef void _drop_vnodes(self, int32_t slot) noexcept nogil:
        """Compact the arrays over ``slot``'s vnodes; the order of the others is unchanged."""
        cdef Py_ssize_t read, write = 0
        cdef int32_t owner
        for read in range(self._n_vnodes):
            owner = self._owners[read]
            if owner != slot:
                self._hashes[write] = self._hashes[read]
                self._owners[write] = owner
                write += 1
        self._n_vnodes = write
