# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: annotation_typing=False, binding=False, embedsignature=True
"""CacheAware's approximate prefix index in C.

``lb/prefix_index.py`` is the specification. This module has the same API and, for every
sequence of operations, the same matches, counts and exceptions (the property tests in
``tests/test_prefix_index_twins.py`` run both side by side). Only the *how* differs, because a
match and a record sit on every CacheAware request's path:

* Each (block, replica) pair the index remembers is one node of an open-addressing table
  (linear probing, deletion by backward shift, so no tombstones pile up). A node is also a
  link in its replica's LRU list (oldest to newest), so moving a block to the newest end or
  forgetting the oldest touches no Python object. A node that the backward shift moves takes
  its list links along: its neighbours are re-pointed to its new slot.
* Per block, the replicas holding it are a bit mask in a second table (``words`` 64-bit words
  per entry, widened when a replica's bit passes them): a match walks the prompt's blocks
  once, ANDing masks, whatever the number of replicas.
* Replica bits are handed out exactly as the twin hands them out (the one a record gives,
  else the lowest free one; a forgotten replica's bit is reused), from the same Python dict
  and list, so a match returns the same replicas in the same order.
* Memory comes from ``PyMem_*`` (tracemalloc sees it) and follows the content: both tables
  grow at half full and shrink at an eighth, so what is kept stays within the capacity per
  replica, as the twin's does.
"""

cimport cython
from cpython cimport array
from cpython.bool cimport PyBool_Check
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_Check
from cpython.object cimport Py_SIZE
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.string cimport memcpy, memset

import array as _array
from operator import index as _as_index

cdef extern from "Python.h":
    void *PyMem_Malloc(size_t n)
    void *PyMem_Calloc(size_t nelem, size_t elsize)
    void PyMem_Free(void *p)
    object PySequence_Fast(object o, const char *message)
    Py_ssize_t PySequence_Fast_GET_SIZE(object o)
    PyObject **PySequence_Fast_ITEMS(object o)

cdef extern from *:
    """
    static inline int kv_ctz64(unsigned long long x) { return __builtin_ctzll(x); }
    """
    int kv_ctz64(unsigned long long x) noexcept nogil

__all__ = ["PrefixIndex", "MAX_BIT"]

MAX_BIT = (1 << 20) - 1  # as the twin: the ring's last slot
cdef array.array _DOUBLES = _array.array("d")

ctypedef struct Node:
    uint64_t block
    int32_t replica  # its bit; -1: a free slot
    int32_t older  # slot of the next older node of the same replica, -1: none
    int32_t newer

cdef enum:
    _DEPTHS = 0  # the forms of a match
    _SHARES = 1
    _SHARE_ARRAY = 2

cdef enum:
    MIN_SLOTS = 64
    MAX_SLOTS = 1 << 30  # slots are int32
    WORD_BITS = 64

cdef uint64_t GOLDEN = 0x9E3779B97F4A7C15ULL
cdef uint64_t PAIR = 0xD6E8FEB86659FD93ULL
cdef Py_ssize_t PY_SSIZE_T_MAX = <Py_ssize_t>((<size_t>-1) >> 1)


cdef inline Py_ssize_t _pow2_at_least(Py_ssize_t n) noexcept:
    cdef Py_ssize_t size = MIN_SLOTS
    while size < n:
        size <<= 1
    return size


cdef inline int _shift_of(Py_ssize_t slots) noexcept:
    cdef int shift = 64
    while slots > 1:
        slots >>= 1
        shift -= 1
    return shift


@cython.final
cdef class PrefixIndex:
    """Per replica, the block hashes it was recently sent (LRU, ``capacity`` each); and, per
    block, which replicas hold it (a bit mask). See the twin, ``lb.prefix_index``."""

    cdef object _capacity  # as given (an int), for the getter
    cdef Py_ssize_t _cap
    cdef dict _bit  # replica key -> its bit
    cdef list _key_of_bit  # bit -> replica key, None when free
    # (block, replica) nodes, each a link in its replica's LRU list
    cdef Node *_nodes
    cdef Py_ssize_t _node_slots, _node_used
    cdef int _node_shift
    # block -> holder mask: entries of 1 + _words uint64 (the block, then the mask; an all-zero
    # mask is a free entry, as a block no replica holds is never kept)
    cdef uint64_t *_held
    cdef Py_ssize_t _held_slots, _held_used, _words
    cdef int _held_shift
    # per replica bit: its oldest and newest node slots and its node count
    cdef int32_t *_oldest
    cdef int32_t *_newest
    cdef Py_ssize_t *_count
    cdef Py_ssize_t _replicas  # bits the per-replica arrays have room for
    cdef Py_ssize_t _total
    # scratch: the blocks of the current call, and a match's running masks
    cdef uint64_t *_blocks
    cdef Py_ssize_t _blocks_room
    cdef uint64_t *_alive

    def __cinit__(self, *args, **kwargs):
        self._bit = {}
        self._key_of_bit = []

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._nodes = self._new_nodes(MIN_SLOTS)
        self._node_slots = MIN_SLOTS
        self._node_shift = _shift_of(MIN_SLOTS)
        self._words = 1
        self._held = <uint64_t *>PyMem_Calloc(MIN_SLOTS * 2, sizeof(uint64_t))
        self._alive = <uint64_t *>PyMem_Calloc(1, sizeof(uint64_t))
        if self._held == NULL or self._alive == NULL:
            raise MemoryError()
        self._held_slots = MIN_SLOTS
        self._held_shift = _shift_of(MIN_SLOTS)

    def __dealloc__(self):
        PyMem_Free(self._nodes)
        PyMem_Free(self._held)
        PyMem_Free(self._oldest)
        PyMem_Free(self._newest)
        PyMem_Free(self._count)
        PyMem_Free(self._blocks)
        PyMem_Free(self._alive)

    @property
    def capacity(self) -> int:
        """Blocks kept per replica; a lower one takes effect at the replica's next record."""
        return self._capacity

    @capacity.setter
    def capacity(self, value) -> None:
        value = _as_index(value)
        if value < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = value
        self._cap = value if value <= PY_SSIZE_T_MAX else PY_SSIZE_T_MAX

    def __len__(self) -> int:
        """Blocks remembered, summed over the replicas."""
        return self._total

    def __sizeof__(self) -> int:
        return (object.__sizeof__(self) + self._node_slots * sizeof(Node)
                + self._held_slots * (1 + self._words) * sizeof(uint64_t)
                + self._replicas * (2 * sizeof(int32_t) + sizeof(Py_ssize_t))
                + self._blocks_room * sizeof(uint64_t) + self._words * sizeof(uint64_t))

    def match(self, blocks) -> dict:
        """Replica -> how many of ``blocks``, from the first, it is believed to hold (replicas
        holding none are left out)."""
        return self._match(blocks, _DEPTHS)

    def shares(self, blocks) -> dict:
        """Replica -> the share (0..1] of ``blocks`` ``match`` finds it holding."""
        return self._match(blocks, _SHARES)

    def share_array(self, blocks):
        """The same shares by replica number (the ring slot each was recorded with), 0.0 for
        a replica holding none; None when no replica holds the first block."""
        return self._match(blocks, _SHARE_ARRAY)

    cdef object _match(self, object blocks, int form):
        """A match in ``form``: a dict of depths or shares by key, or an array of shares by
        bit (made at the first holder, so None when there is none)."""
        cdef Py_ssize_t n = self._load(blocks), depth, w, words = self._words, found
        cdef uint64_t *alive = self._alive
        cdef uint64_t *mask
        cdef uint64_t held, dropped, left
        cdef object out = None if form == _SHARE_ARRAY else {}
        if n == 0:
            return out
        found = self._find_held(self._blocks[0])
        if found < 0:
            return out
        if form == _SHARE_ARRAY:
            out = array.clone(_DOUBLES, PyList_GET_SIZE(self._key_of_bit), True)
        memcpy(alive, self._held + found * (1 + words) + 1, words * sizeof(uint64_t))
        for depth in range(1, n):
            found = self._find_held(self._blocks[depth])
            mask = self._held + found * (1 + words) + 1 if found >= 0 else NULL
            left = 0
            for w in range(words):
                held = alive[w] & mask[w] if mask != NULL else 0
                dropped = alive[w] & ~held
                if dropped:  # some replicas' prefixes end here
                    self._note(dropped, w, depth, out, n, form)
                alive[w] = held
                left |= held
            if not left:
                return out
        for w in range(words):
            if alive[w]:
                self._note(alive[w], w, n, out, n, form)
        return out

    def record(self, key, blocks, bit=None) -> None:
        """``key`` was sent a request with these blocks: it holds them now (most recent);
        ``bit``: its number, as the twin's ``record`` says."""
        cdef Py_ssize_t n = self._load(blocks), i, slot
        cdef int32_t wanted = -1 if bit is None else _checked_bit(bit)
        if n == 0:
            return
        cdef int32_t b = self._bit_of(key, wanted)
        # Last block first: the first blocks end up the most recent (see the twin).
        for i in range(n - 1, -1, -1):
            slot = self._find_node(self._blocks[i], b)
            if slot >= 0:
                if slot != self._newest[b]:
                    self._unlink(slot)
                    self._append(slot, b)
            else:
                self._add(self._blocks[i], b)
        while self._count[b] > self._cap:
            self._drop_oldest(b)
        self._shrink()

    def forget(self, key) -> None:
        """The replica is gone (or restarted): nothing it held counts any more."""
        found = self._bit.pop(key, None)
        if found is None:
            return
        cdef int32_t bit = found
        while self._oldest[bit] >= 0:
            self._drop_oldest(bit)
        self._key_of_bit[bit] = None
        self._shrink()

    def blocks_of(self, key) -> int:
        found = self._bit.get(key)
        return self._count[<int32_t>found] if found is not None else 0

    # -- internals: arguments and bits -------------------------------------------------------

    cdef Py_ssize_t _load(self, object blocks) except -1:
        """Copies ``blocks`` into the scratch array, checked like the twin's ``_checked``."""
        cdef Py_ssize_t n, i
        cdef PyObject **items
        cdef object item
        if type(blocks) is array.array and (<array.array>blocks).ob_descr.typecode == b'Q':
            n = Py_SIZE(blocks)  # block_hashes' own result: copied as it is
            self._room_for_blocks(n)
            memcpy(self._blocks, (<array.array>blocks).data.as_ulonglongs, n * sizeof(uint64_t))
            return n
        seq = PySequence_Fast(blocks, "blocks must be a sequence of ints")
        n = PySequence_Fast_GET_SIZE(seq)
        self._room_for_blocks(n)
        items = PySequence_Fast_ITEMS(seq)
        for i in range(n):
            item = <object>items[i]
            if not PyLong_Check(item):
                raise TypeError(f"a block hash must be int, not {type(item).__name__}")
            # Cython's conversion reads the digits in place (PyLong_AsUnsignedLongLong goes
            # through a byte array: ten times the cost); OverflowError outside uint64.
            self._blocks[i] = <uint64_t>item
        return n

    cdef int _room_for_blocks(self, Py_ssize_t n) except -1:
        if n > self._blocks_room:
            PyMem_Free(self._blocks)
            self._blocks = <uint64_t *>PyMem_Malloc(n * sizeof(uint64_t))
            self._blocks_room = 0
            if self._blocks == NULL:
                raise MemoryError()
            self._blocks_room = n
        return 0

    cdef int32_t _bit_of(self, object key, int32_t wanted) except -1:
        found = self._bit.get(key)
        keys = self._key_of_bit
        cdef Py_ssize_t index, size = PyList_GET_SIZE(keys)
        if wanted >= 0:
            if found is not None and <int32_t>found == wanted:
                return wanted
            if found is not None:
                self.forget(key)
            if wanted < size and <object>PyList_GET_ITEM(keys, wanted) is not None:
                self.forget(<object>PyList_GET_ITEM(keys, wanted))
            self._room_for(wanted + 1)
            if wanted >= size:
                keys.extend([None] * (wanted + 1 - size))
            keys[wanted] = key
            self._bit[key] = wanted
            return wanted
        if found is not None:
            return <int32_t>found
        for index in range(size):
            if <object>PyList_GET_ITEM(keys, index) is None:
                break
        else:
            index = size
        self._room_for(index + 1)
        if index == size:
            keys.append(key)
        else:
            keys[index] = key
        self._bit[key] = index
        return <int32_t>index

    cdef int _room_for(self, Py_ssize_t replicas) except -1:
        """Per-replica arrays and mask words for ``replicas`` bits."""
        cdef Py_ssize_t room = self._replicas, i, words
        cdef int32_t *oldest
        cdef int32_t *newest
        cdef Py_ssize_t *count
        words = (replicas + WORD_BITS - 1) // WORD_BITS
        if words > self._words:
            self._rehash_held(self._held_slots, words)
        if replicas <= room:
            return 0
        if replicas > MAX_SLOTS:
            raise MemoryError("too many replicas")
        while room < replicas:
            room = room * 2 if room else 64
        oldest = <int32_t *>PyMem_Malloc(room * sizeof(int32_t))
        newest = <int32_t *>PyMem_Malloc(room * sizeof(int32_t))
        count = <Py_ssize_t *>PyMem_Malloc(room * sizeof(Py_ssize_t))
        if oldest == NULL or newest == NULL or count == NULL:
            PyMem_Free(oldest)
            PyMem_Free(newest)
            PyMem_Free(count)
            raise MemoryError()
        for i in range(room):
            if i < self._replicas:
                oldest[i], newest[i], count[i] = self._oldest[i], self._newest[i], self._count[i]
            else:
                oldest[i], newest[i], count[i] = -1, -1, 0
        PyMem_Free(self._oldest)
        PyMem_Free(self._newest)
        PyMem_Free(self._count)
        self._oldest, self._newest, self._count, self._replicas = oldest, newest, count, room
        return 0

    cdef int _note(self, uint64_t mask, Py_ssize_t word, Py_ssize_t depth,
                   object out, Py_ssize_t of, int form) except -1:
        """For each replica in ``mask`` (word ``word``), lowest bit first as the twin notes
        them: ``out[key] = depth`` (or ``depth / of``), or ``out[bit] = depth / of``."""
        cdef uint64_t low
        cdef Py_ssize_t bit
        cdef double share = <double>depth / <double>of  # exact as Python's int / int
        keys = self._key_of_bit
        value = depth if form == _DEPTHS else share
        while mask:
            low = mask & (~mask + 1)
            bit = word * WORD_BITS + kv_ctz64(low)
            if form == _SHARE_ARRAY:
                (<array.array>out).data.as_doubles[bit] = share
            else:
                key = <object>PyList_GET_ITEM(keys, bit)
                if key is not None:
                    (<dict>out)[key] = value
            mask ^= low
        return 0

    # -- internals: the node table and the LRU lists ------------------------------------------

    cdef inline Py_ssize_t _node_home(self, uint64_t block, int32_t bit) noexcept:
        return <Py_ssize_t>(((block ^ (<uint64_t>(bit + 1) * PAIR)) * GOLDEN) >> self._node_shift)

    cdef Py_ssize_t _find_node(self, uint64_t block, int32_t bit) noexcept:
        cdef Py_ssize_t mask = self._node_slots - 1
        cdef Py_ssize_t slot = self._node_home(block, bit)
        cdef Node *nodes = self._nodes
        while nodes[slot].replica >= 0:
            if nodes[slot].block == block and nodes[slot].replica == bit:
                return slot
            slot = (slot + 1) & mask
        return -1

    cdef Node *_new_nodes(self, Py_ssize_t slots) except NULL:
        cdef Node *nodes = <Node *>PyMem_Malloc(slots * sizeof(Node))
        if nodes == NULL:
            raise MemoryError()
        memset(nodes, 0xFF, slots * sizeof(Node))  # replica -1 everywhere: all free
        return nodes

    cdef inline void _unlink(self, Py_ssize_t slot) noexcept:
        cdef Node *node = &self._nodes[slot]
        if node.older >= 0:
            self._nodes[node.older].newer = node.newer
        else:
            self._oldest[node.replica] = node.newer
        if node.newer >= 0:
            self._nodes[node.newer].older = node.older
        else:
            self._newest[node.replica] = node.older

    cdef inline void _append(self, Py_ssize_t slot, int32_t bit) noexcept:
        cdef int32_t last = self._newest[bit]
        self._nodes[slot].older = last
        self._nodes[slot].newer = -1
        if last >= 0:
            self._nodes[last].newer = <int32_t>slot
        else:
            self._oldest[bit] = <int32_t>slot
        self._newest[bit] = <int32_t>slot

    cdef int _add(self, uint64_t block, int32_t bit) except -1:
        """A new newest node for ``bit``, and its bit in the block's holder mask."""
        cdef Py_ssize_t slot, mask
        if (self._node_used + 1) * 2 > self._node_slots:
            self._rehash_nodes(self._node_slots * 2)
        if (self._held_used + 1) * 2 > self._held_slots:
            self._rehash_held(self._held_slots * 2, self._words)
        mask = self._node_slots - 1
        slot = self._node_home(block, bit)
        while self._nodes[slot].replica >= 0:
            slot = (slot + 1) & mask
        self._nodes[slot].block = block
        self._nodes[slot].replica = bit
        self._append(slot, bit)
        self._node_used += 1
        self._count[bit] += 1
        self._total += 1
        self._hold(block, bit)
        return 0

    cdef void _drop_oldest(self, int32_t bit) noexcept:
        """Forgets ``bit``'s oldest node, and its bit in the block's holder mask."""
        cdef Py_ssize_t slot = self._oldest[bit]
        cdef uint64_t block = self._nodes[slot].block
        self._unlink(slot)
        self._remove_node(slot)
        self._node_used -= 1
        self._count[bit] -= 1
        self._total -= 1
        self._release(block, bit)

    cdef void _remove_node(self, Py_ssize_t hole) noexcept:
        """Frees an unlinked node's slot; later nodes of its probe run shift back into the
        hole (taking their list links along), so every run stays unbroken."""
        cdef Py_ssize_t mask = self._node_slots - 1, slot = hole, home
        cdef Node *nodes = self._nodes
        while True:
            slot = (slot + 1) & mask
            if nodes[slot].replica < 0:
                break
            home = self._node_home(nodes[slot].block, nodes[slot].replica)
            if ((slot - home) & mask) >= ((slot - hole) & mask):
                nodes[hole] = nodes[slot]
                self._relink(hole)
                hole = slot
        nodes[hole].replica = -1

    cdef inline void _relink(self, Py_ssize_t slot) noexcept:
        """The node now at ``slot`` moved there: its neighbours (or its list's ends) follow."""
        cdef Node *node = &self._nodes[slot]
        if node.older >= 0:
            self._nodes[node.older].newer = <int32_t>slot
        else:
            self._oldest[node.replica] = <int32_t>slot
        if node.newer >= 0:
            self._nodes[node.newer].older = <int32_t>slot
        else:
            self._newest[node.replica] = <int32_t>slot

    cdef int _rehash_nodes(self, Py_ssize_t slots) except -1:
        """Moves every node into a table of ``slots``, each replica's list in its order."""
        cdef Node *old = self._nodes
        cdef Node *nodes
        cdef Py_ssize_t bit, slot, mask = slots - 1, at
        cdef int32_t prev
        if slots > MAX_SLOTS:
            raise MemoryError("prefix index too large")
        nodes = self._new_nodes(slots)
        self._nodes = nodes
        self._node_slots = slots
        self._node_shift = _shift_of(slots)
        for bit in range(self._replicas):
            at = self._oldest[bit]
            prev = -1
            while at >= 0:
                slot = self._node_home(old[at].block, <int32_t>bit)
                while nodes[slot].replica >= 0:
                    slot = (slot + 1) & mask
                nodes[slot].block = old[at].block
                nodes[slot].replica = <int32_t>bit
                nodes[slot].older = prev
                nodes[slot].newer = -1
                if prev >= 0:
                    nodes[prev].newer = <int32_t>slot
                else:
                    self._oldest[bit] = <int32_t>slot
                prev = <int32_t>slot
                at = old[at].newer
            self._newest[bit] = prev
        PyMem_Free(old)
        return 0

    # -- internals: the holder table -----------------------------------------------------------

    cdef inline Py_ssize_t _held_home(self, uint64_t block) noexcept:
        return <Py_ssize_t>((block * GOLDEN) >> self._held_shift)

    cdef inline bint _free_entry(self, uint64_t *entry) noexcept:
        cdef Py_ssize_t w
        for w in range(1, self._words + 1):
            if entry[w]:
                return False
        return True

    cdef Py_ssize_t _find_held(self, uint64_t block) noexcept:
        cdef Py_ssize_t mask = self._held_slots - 1, stride = 1 + self._words
        cdef Py_ssize_t slot = self._held_home(block)
        cdef uint64_t *entry
        while True:
            entry = self._held + slot * stride
            if self._free_entry(entry):
                return -1
            if entry[0] == block:
                return slot
            slot = (slot + 1) & mask

    cdef void _hold(self, uint64_t block, int32_t bit) noexcept:
        """Sets ``bit`` in the block's mask, adding the block if no replica held it (the
        table has room: ``_add`` saw to it)."""
        cdef Py_ssize_t mask = self._held_slots - 1, stride = 1 + self._words
        cdef Py_ssize_t slot = self._held_home(block)
        cdef uint64_t *entry
        while True:
            entry = self._held + slot * stride
            if self._free_entry(entry):
                entry[0] = block
                self._held_used += 1
                break
            if entry[0] == block:
                break
            slot = (slot + 1) & mask
        entry[1 + bit // WORD_BITS] |= (<uint64_t>1) << (bit % WORD_BITS)

    cdef void _release(self, uint64_t block, int32_t bit) noexcept:
        """Clears ``bit`` in the block's mask; a block nobody holds any more leaves the table
        (backward shift, as for nodes)."""
        cdef Py_ssize_t mask = self._held_slots - 1, stride = 1 + self._words
        cdef Py_ssize_t hole = self._find_held(block), slot, home
        cdef uint64_t *entry = self._held + hole * stride
        entry[1 + bit // WORD_BITS] &= ~((<uint64_t>1) << (bit % WORD_BITS))
        if not self._free_entry(entry):
            return
        self._held_used -= 1
        slot = hole
        while True:
            slot = (slot + 1) & mask
            entry = self._held + slot * stride
            if self._free_entry(entry):
                break
            home = self._held_home(entry[0])
            if ((slot - home) & mask) >= ((slot - hole) & mask):
                memcpy(self._held + hole * stride, entry, stride * sizeof(uint64_t))
                memset(entry, 0, stride * sizeof(uint64_t))
                hole = slot

    cdef int _rehash_held(self, Py_ssize_t slots, Py_ssize_t words) except -1:
        """Moves every holder mask into a table of ``slots`` entries of ``words`` words."""
        cdef uint64_t *old = self._held
        cdef uint64_t *table
        cdef uint64_t *alive
        cdef uint64_t *entry
        cdef Py_ssize_t old_stride = 1 + self._words, stride = 1 + words, mask = slots - 1
        cdef Py_ssize_t i, slot, old_slots = self._held_slots
        cdef int shift
        if slots > MAX_SLOTS:
            raise MemoryError("prefix index too large")
        table = <uint64_t *>PyMem_Calloc(slots * stride, sizeof(uint64_t))
        alive = <uint64_t *>PyMem_Calloc(words, sizeof(uint64_t))
        if table == NULL or alive == NULL:
            PyMem_Free(table)
            PyMem_Free(alive)
            raise MemoryError()
        shift = _shift_of(slots)
        for i in range(old_slots):
            entry = old + i * old_stride
            if self._free_entry(entry):
                continue
            slot = <Py_ssize_t>((entry[0] * GOLDEN) >> shift)
            while not _all_zero(table + slot * stride + 1, words):
                slot = (slot + 1) & mask
            memcpy(table + slot * stride, entry, old_stride * sizeof(uint64_t))
        PyMem_Free(old)
        PyMem_Free(self._alive)
        self._held, self._alive = table, alive
        self._held_slots, self._held_shift, self._words = slots, shift, words
        return 0

    cdef int _shrink(self) except -1:
        """Tables an eighth full or less are rebuilt at about a quarter full: memory follows
        what is remembered (a lowered capacity, forgotten replicas)."""
        if self._node_slots > MIN_SLOTS and self._node_used * 8 < self._node_slots:
            self._rehash_nodes(_pow2_at_least(self._node_used * 4))
        if self._held_slots > MIN_SLOTS and self._held_used * 8 < self._held_slots:
            self._rehash_held(_pow2_at_least(self._held_used * 4), self._words)
        return 0


cdef inline bint _all_zero(const uint64_t *words, Py_ssize_t count) noexcept:
    cdef Py_ssize_t w
    for w in range(count):
        if words[w]:
            return False
    return True


cdef int32_t _checked_bit(object bit) except -1:
    """A replica number in [0, MAX_BIT], or the twin's error."""
    if PyBool_Check(bit) or not PyLong_Check(bit):
        raise TypeError("a replica's bit must be int")
    if not 0 <= bit <= MAX_BIT:
        raise OverflowError(f"a replica's bit must be in [0, {MAX_BIT}]")
    return <int32_t>bit
