"""Consistent hashing with bounded loads (CHWBL) over one model's endpoints, in pure Python.

This is the reference twin of ``lb/_chwbl.pyx``: the same API and, for every sequence of
operations, the same picks, loads and counters (the property tests hold them to it). The
package falls back to it when the extension is not built; see ``lb.ring``.

Semantics follow KubeAI's ring with its rough edges fixed:

* ``replication`` virtual nodes per endpoint at ``mmh3_64(key + "#" + i)``. The separator
  matters: KubeAI hashes ``key + i`` so ``"a1" + "0"`` and ``"a" + "10"`` collide. Since ``i`` is
  all digits, splitting at the last ``#`` is unambiguous, so no two vnodes share an input.
* Vnodes are ordered by ``(hash, endpoint key)``: ties never depend on insertion order, which
  keeps two gateway replicas with the same endpoints in agreement.
* A lookup bisects to the first vnode at or after ``mmh3_64(hash_key)`` (wrapping) and walks
  clockwise, skipping excluded endpoints and those without the requested adapter. The first
  endpoint that passes the load bound wins; if none does, the first adapter-matching one.
* Bound (the paper's: Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded
  Loads"): with ``m = total + 1`` counting the request being placed, every endpoint has capacity
  ``ceil(factor / 100 * m / n)`` and the request goes to the first endpoint below it:
  ``load < ceil(c)`` is ``load < c`` for an integer load, i.e. ``load * n * 100 < m * factor``,
  evaluated in integers so both twins agree to the last request. Capacities sum to at least
  ``m``, so some endpoint always has room. (KubeAI checks ``load <= m / n * factor / 100``; the
  rule here before was ``load + 1 <= ...``, under which nothing passed while ``m < n / f``: at
  light load a hot key fell back to its own endpoint for every request.)
* Loads are this process's in-flight requests, each counted with its weight: 1, or (per
  Model) its estimated tokens, so a long prompt weighs what it costs. The bound then reads
  ``m = total + weight``; with unit weights it is the paper's rule exactly.
* Loads are per process. ``acquire`` returns a ticket carrying the
  endpoint's generation, so releasing after the endpoint was removed (or removed and re-added)
  never touches the new counters: ``total`` stays exact whatever the endpoints do.
* With a ``LoadTable`` (``Ring(..., loads=table, namespace=model)``), loads and ``total`` are
  those of every process sharing the table: each ring still counts its own share (tickets,
  removal and the "released twice" check stay per process) and adds every change to the
  shared counters, so the gateway's worker processes bound loads as one. See ``LoadTable``.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from heapq import merge
from typing import Collection, Iterable, Mapping, Sequence

import mmh3

from lb.loads import LoadTable

__all__ = ["Ring", "SharedCount", "hash64", "MAX_ENDPOINTS", "SLOT_BITS", "MAX_WEIGHT"]

SLOT_BITS = 20
MAX_ENDPOINTS = 1 << SLOT_BITS
_SLOT_MASK = MAX_ENDPOINTS - 1
_U64 = (1 << 64) - 1
_DEFAULT_SEED = 0x9E3779B97F4A7C15
MAX_WEIGHT = 1 << 32  # a request's weight: 1, or its estimated tokens


def hash64(key: str) -> int:
    """First 64 bits of MurmurHash3 x64-128 (seed 0) over the UTF-8 of ``key``.

    Lone surrogates (which JSON can smuggle in) are encoded with ``surrogatepass`` rather
    than rejected: a client's odd prompt must still route.
    """
    _check_str(key, "key")
    try:
        data = key.encode()
    except UnicodeEncodeError:
        data = key.encode("utf-8", "surrogatepass")
    return mmh3.hash64(data, seed=0, x64arch=True, signed=False)[0]


class SharedCount:
    """One counter of a ``LoadTable`` outside any ring (e.g. a model's active requests, summed
    over the worker processes): ``inc``/``dec`` and ``value``."""

    __slots__ = ("_table", "_index")

    def __init__(self, table: LoadTable, namespace: str, key: str) -> None:
        if not isinstance(table, LoadTable):
            raise TypeError(f"table must be a LoadTable, not {type(table).__name__}")
        self._table = table
        self._index = table.entry(namespace, key)

    def inc(self) -> None:
        self._table.add(self._index, 1)

    def dec(self) -> None:
        self._table.add(self._index, -1)

    @property
    def value(self) -> int:
        return self._table.value(self._index)


def block_hashes(text: str, block_bytes: int, max_blocks: int) -> array:
    """Chained 64-bit hashes of the full ``block_bytes`` blocks of ``text``'s UTF-8, at most
    ``max_blocks``: block i is MurmurHash3 (x64-128, first 64 bits) of its bytes, seeded with
    block i-1's hash folded to the 32 bits a seed takes, so equal hashes mean equal prefixes,
    not just equal blocks. A partial last block is left out, as an engine's prefix cache
    leaves it out. The CacheAware strategy's approximate index is keyed by these.

    An ``array('Q')``, not a list: the prefix index copies it whole into C, where a list cost
    an int object per hash, made here and read back by every match and record (CacheAware's
    extra instructions per request fell from ~35k to ~29k; bench/README.md, "Gateway CPU")."""
    _check_str(text, "text")
    if block_bytes < 1 or max_blocks < 0:
        raise ValueError("block_bytes must be at least 1 and max_blocks at least 0")
    try:
        data = text.encode()
    except UnicodeEncodeError:
        data = text.encode("utf-8", "surrogatepass")
    count = min(len(data) // block_bytes, max_blocks)
    hashes = array("Q")
    parent = 0
    for start in range(0, count * block_bytes, block_bytes):
        seed = (parent ^ (parent >> 32)) & 0xFFFFFFFF
        parent = mmh3.hash64(data[start:start + block_bytes], seed=seed, x64arch=True,
                             signed=False)[0]
        hashes.append(parent)
    return hashes


def _check_str(value: object, what: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")


def _check_weight(weight: object) -> None:
    if not isinstance(weight, int) or isinstance(weight, bool):
        raise TypeError(f"weight must be int, not {type(weight).__name__}")
    if not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be in [1, {MAX_WEIGHT}]")


class Ring:
    """The CHWBL ring plus per-endpoint in-flight loads, and the LeastLoad and Random picks
    over the same endpoint set (so every strategy shares one accounting)."""

    def __init__(self, replication: int = 256, mean_load_factor: int = 125,
                 seed: int = _DEFAULT_SEED, loads: LoadTable | None = None,
                 namespace: str = "") -> None:
        if not isinstance(replication, int) or not 1 <= replication <= 65536:
            raise ValueError("replication must be an int in [1, 65536]")
        self._replication = replication
        self.mean_load_factor = mean_load_factor
        self._rand = (seed & _U64) or _DEFAULT_SEED
        if loads is not None and not isinstance(loads, LoadTable):
            raise TypeError(f"loads must be a LoadTable, not {type(loads).__name__}")
        _check_str(namespace, "namespace")
        self._table = loads
        self._namespace = namespace
        self._shared: list[int] = []  # slot -> table entry (with a table)
        self._shared_total = loads.entry(namespace, "") if loads is not None else -1
        self._cursor = 0
        self._keys: list[str | None] = []
        self._slot_of: dict[str, int] = {}
        self._gens: list[int] = []
        self._loads: list[int] = []
        self._adapters: list[frozenset[str]] = []
        self._total = 0
        self._last_gen = 0
        self._hashes: list[int] = []
        self._owners: list[int] = []
        self._lookups = 0
        self._iterations = 0
        self._fallbacks = 0

    # -- configuration -------------------------------------------------------------------

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

    # -- endpoints -------------------------------------------------------------------------

    def add(self, key: str, adapters: Iterable[str] = ()) -> None:
        """Add an endpoint; its vnodes are merged in, the rest of the ring is not rehashed."""
        _check_str(key, "endpoint key")
        if not key:
            raise ValueError("endpoint key must not be empty")
        if key in self._slot_of:
            raise ValueError(f"endpoint {key!r} is already in the ring")
        adapter_set = self._adapter_set(adapters)
        shared = self._table.entry(self._namespace, key) if self._table is not None else -1
        slot = self._free_slot()
        self._last_gen += 1
        self._keys[slot] = key
        self._gens[slot] = self._last_gen
        self._loads[slot] = 0
        self._adapters[slot] = adapter_set
        self._slot_of[key] = slot
        self._shared[slot] = shared
        self._merge_vnodes(key, slot)

    def remove(self, key: str) -> None:
        """Remove an endpoint; its in-flight requests leave ``total`` now, and their later
        releases are recognised as stale by generation."""
        slot = self._slot(key)
        self._share(slot, -self._loads[slot])  # other processes' requests stay counted
        self._total -= self._loads[slot]
        self._loads[slot] = 0
        self._keys[slot] = None
        self._gens[slot] = 0
        self._adapters[slot] = frozenset()
        del self._slot_of[key]
        keep = [i for i, owner in enumerate(self._owners) if owner != slot]
        self._hashes = [self._hashes[i] for i in keep]
        self._owners = [self._owners[i] for i in keep]

    def set_adapters(self, key: str, adapters: Iterable[str]) -> None:
        self._adapters[self._slot(key)] = self._adapter_set(adapters)

    def adapters(self, key: str) -> frozenset[str]:
        return self._adapters[self._slot(key)]

    def keys(self) -> list[str]:
        """Endpoint keys in slot order."""
        return [k for k in self._keys if k is not None]

    def __len__(self) -> int:
        return len(self._slot_of)

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

    def acquire(self, key: str, weight: int = 1) -> int:
        """Count one more in-flight request of ``weight`` on ``key``; returns the ticket for
        ``release`` (which takes the same weight)."""
        slot = self._slot(key)
        _check_weight(weight)
        self._loads[slot] += weight
        self._total += weight
        self._share(slot, weight)
        return (self._gens[slot] << SLOT_BITS) | slot

    def release(self, ticket: int, weight: int = 1) -> bool:
        """End one in-flight request of ``weight``. False when its endpoint has gone since
        (nothing to do)."""
        if not isinstance(ticket, int) or isinstance(ticket, bool):
            raise TypeError(f"ticket must be int, not {type(ticket).__name__}")
        _check_weight(weight)
        gen, slot = ticket >> SLOT_BITS, ticket & _SLOT_MASK
        if ticket < 0 or gen == 0 or gen > self._last_gen or slot >= len(self._keys):
            raise ValueError(f"unknown ticket {ticket}")
        if self._gens[slot] != gen:
            return False
        if self._loads[slot] < weight:
            raise ValueError(f"ticket {ticket} released more often than acquired")
        self._loads[slot] -= weight
        self._total -= weight
        self._share(slot, -weight)
        return True

    # -- picks -----------------------------------------------------------------------------

    def pick(self, hash_key: str, adapter: str = "", exclude: Collection[str] = (),
             weight: int = 1) -> str | None:
        """CHWBL: the endpoint for ``hash_key`` within the load bound for a request of
        ``weight``, or None if no endpoint (outside ``exclude``) serves ``adapter``. Does not
        acquire."""
        _check_str(hash_key, "hash key")
        _check_str(adapter, "adapter")
        _check_weight(weight)
        if not self._hashes:
            return None
        excluded = self._excluded_slots(exclude)
        self._lookups += 1
        n_vnodes = len(self._hashes)
        i = bisect_left(self._hashes, hash64(hash_key))
        if i == n_vnodes:
            i = 0
        default = -1
        rejected: set[int] | None = None
        n_matching = 0
        for step in range(n_vnodes):
            slot = self._owners[i]
            if slot not in excluded and self._serves(slot, adapter):
                if default < 0:
                    default = slot
                if self._load_ok(slot, weight):
                    self._iterations += step + 1
                    return self._keys[slot]
                # Shortcut to the full walk's answer (stats still count the full walk): once
                # each matching endpoint has failed, the rest of the ring cannot change it.
                if rejected is None:
                    rejected = set()
                    n_matching = sum(1 for s, k in enumerate(self._keys) if k is not None
                                     and s not in excluded and self._serves(s, adapter))
                rejected.add(slot)
                if len(rejected) == n_matching:
                    break
            i += 1
            if i == n_vnodes:
                i = 0
        self._iterations += n_vnodes
        if default < 0:
            return None
        self._fallbacks += 1
        return self._keys[default]

    def pick_scored(self, hash_key: str, adapter: str, exclude: Collection[str], weight: int,
                    shares: Sequence[float] | None, queues: Mapping[str, float] | None,
                    prefix_weight: float, load_weight: float, queue_weight: float) -> str | None:
        """CacheAware: the best-scoring endpoint within the CHWBL bound.

        The CHWBL pick for ``hash_key`` (the "home") is the answer when no endpoint is believed
        to hold any of the prompt (``shares`` None or empty), so every worker sends a new prefix
        to the same place, and when no endpoint is within the bound. Otherwise each matching
        endpoint within the bound scores ``prefix_weight * share`` (the share of the prompt it
        holds, 0..1, at its slot in ``shares``; 0 past its end) ``+ load_weight * (1 - load /
        capacity)`` (its headroom under the bound) ``+ queue_weight * (1 - queue / longest
        queue)`` (the engine's own queue, over the candidates); the highest wins, the home on a tie, else the lowest slot. Float
        arithmetic in this order in both twins: they agree to the last bit."""
        home = self.pick(hash_key, adapter, exclude, weight)
        if home is None or not shares:
            return home
        excluded, share, queue = self._scan_inputs(exclude, shares, queues)
        n = len(self._slot_of)
        m = self._total_now() + weight
        candidates = [slot for slot, key in enumerate(self._keys)
                      if key is not None and slot not in excluded and self._serves(slot, adapter)
                      and self._load_at(slot) * n * 100 < m * self._factor]
        if not candidates:
            return home
        longest = max(max(queue.get(slot, 0.0) for slot in candidates), 0.0)
        capacity = float(self._factor * m) / (100.0 * n)
        home_slot = self._slot_of[home]
        best, best_score = -1, 0.0
        for slot in candidates:
            score = prefix_weight * share.get(slot, 0.0)
            score += load_weight * (1.0 - self._load_at(slot) / capacity)
            if longest > 0.0:
                score += queue_weight * (1.0 - queue.get(slot, 0.0) / longest)
            else:
                score += queue_weight
            if best < 0 or score > best_score or (score == best_score and slot == home_slot):
                best, best_score = slot, score
        return self._keys[best]

    def pick_cost(self, hash_key: str, adapter: str, exclude: Collection[str], weight: int,
                  shares: Sequence[float] | None, queues: Mapping[str, float] | None,
                  prompt_tokens: float, load_tokens: float, queue_tokens: float) -> str | None:
        """CacheAware's cost model: the endpoint within the CHWBL bound with the lowest
        estimated time to first token, in tokens of prefill.

        Each matching endpoint within the bound costs ``load_tokens * load`` (the work its
        in-flight requests put in the way of a new one's prefill) ``+ queue_tokens * queue``
        (its engine's waiting requests) ``+ prompt_tokens * (1 - share)`` (the prompt's
        uncached part, which it must prefill). Units are what make this beat a weighted sum of
        normalised scores: a long prompt's uncached tokens outweigh a short queue, while a
        short prompt goes where the queue is short, with no weight to tune per workload. A
        prompt no endpoint is believed to hold (``shares`` None or empty: 0 everywhere) goes
        to the least loaded, not to its home as under PrefixHash: a new conversation placed by
        hash stays where it lands, and a replica dealt more than its cache holds thrashes
        (the routing study's multi-turn workload at the knee: 0.61x PrefixHash's mean TTFT
        and 0.21x its p99 this way, against 1.04x and 1.29x from the home). The home (the
        CHWBL pick) wins ties; else the first equal in slot order after the home does
        (cyclic), so ties spread with the prefixes' homes instead of piling on the lowest
        slot. Same float operations in the same order in both twins."""
        home = self.pick(hash_key, adapter, exclude, weight)
        if home is None:
            return None
        excluded, share, queue = self._scan_inputs(exclude, shares or (), queues)
        n = len(self._slot_of)
        m = self._total_now() + weight
        home_slot = self._slot_of[home]
        best, best_cost = -1, 0.0
        n_slots = len(self._keys)
        for step in range(n_slots):  # from the home on, so the first of equals wins
            slot = (home_slot + step) % n_slots
            key = self._keys[slot]
            if (key is None or slot in excluded or not self._serves(slot, adapter)
                    or self._load_at(slot) * n * 100 >= m * self._factor):
                continue
            cost = load_tokens * float(self._load_at(slot))
            cost += queue_tokens * queue.get(slot, 0.0)
            cost += prompt_tokens * (1.0 - share.get(slot, 0.0))
            if best < 0 or cost < best_cost:
                best, best_cost = slot, cost
        return home if best < 0 else self._keys[best]

    def pick_least_load(self, adapter: str = "", exclude: Collection[str] = ()) -> str | None:
        """The matching endpoint with the fewest in-flight requests; ties rotate so idle
        endpoints share sequential traffic instead of the first one taking all of it."""
        _check_str(adapter, "adapter")
        excluded = self._excluded_slots(exclude)
        n_slots = len(self._keys)
        best, best_load = -1, -1
        for step in range(n_slots):
            slot = (self._cursor + step) % n_slots
            if self._keys[slot] is None or slot in excluded or not self._serves(slot, adapter):
                continue
            load = self._load_at(slot)
            if best < 0 or load < best_load:
                best, best_load = slot, load
        if best < 0:
            return None
        self._cursor = best + 1
        return self._keys[best]

    def pick_random(self, adapter: str = "", exclude: Collection[str] = ()) -> str | None:
        """Uniform over matching endpoints: what a plain Kubernetes Service does. The generator
        is xorshift64, seeded per ring, so runs are reproducible."""
        _check_str(adapter, "adapter")
        excluded = self._excluded_slots(exclude)
        candidates = [slot for slot, key in enumerate(self._keys)
                      if key is not None and slot not in excluded and self._serves(slot, adapter)]
        if not candidates:
            return None
        return self._keys[candidates[self._next_random() % len(candidates)]]

    def stats(self) -> tuple[int, int, int]:
        """(lookups, vnodes visited, fallbacks to the default endpoint) since creation."""
        return self._lookups, self._iterations, self._fallbacks

    # -- internals -------------------------------------------------------------------------

    def _slot(self, key: str) -> int:
        _check_str(key, "endpoint key")
        try:
            return self._slot_of[key]
        except KeyError:
            raise KeyError(f"unknown endpoint {key!r}") from None

    def _free_slot(self) -> int:
        for slot, key in enumerate(self._keys):
            if key is None:
                return slot
        if len(self._keys) >= MAX_ENDPOINTS:
            raise ValueError(f"a ring holds at most {MAX_ENDPOINTS} endpoints")
        self._keys.append(None)
        self._gens.append(0)
        self._loads.append(0)
        self._adapters.append(frozenset())
        self._shared.append(-1)
        return len(self._keys) - 1

    @staticmethod
    def _adapter_set(adapters: Iterable[str]) -> frozenset[str]:
        if isinstance(adapters, str):
            raise TypeError("adapters must be an iterable of str, not a str")
        result = frozenset(adapters)
        for name in result:
            _check_str(name, "adapter")
        return result

    def _merge_vnodes(self, key: str, slot: int) -> None:
        new = sorted((hash64(f"{key}#{i}"), key, slot) for i in range(self._replication))
        old = ((h, self._keys[o], o) for h, o in zip(self._hashes, self._owners))
        merged = list(merge(old, new))
        self._hashes = [h for h, _, _ in merged]
        self._owners = [o for _, _, o in merged]

    def _scan_inputs(self, exclude: Collection[str], shares: Sequence[float],
                     queues: Mapping[str, float] | None
                     ) -> tuple[set[int], dict[int, float], dict[int, float]]:
        """What a scoring pick reads before its scan: the excluded slots, per-slot shares (as
        many as there are slots, as the C twin copies them) and engine queues (every value of
        an endpoint's key is read, as the C twin reads them all)."""
        excluded = self._excluded_slots(exclude)
        share = {slot: float(value) for slot, value in zip(range(len(self._keys)), shares)}
        queue = {self._slot_of[key]: float(value) for key, value in queues.items()
                 if key in self._slot_of} if queues else {}
        return excluded, share, queue

    def _excluded_slots(self, exclude: Collection[str]) -> set[int]:
        if isinstance(exclude, str):
            raise TypeError("exclude must be a collection of endpoint keys, not a str")
        return {self._slot_of[k] for k in exclude if k in self._slot_of}

    def _serves(self, slot: int, adapter: str) -> bool:
        return not adapter or adapter in self._adapters[slot]

    def _load_ok(self, slot: int, weight: int) -> bool:
        """Below the paper's capacity ``ceil(factor/100 * (total + weight) / n)``."""
        return (self._load_at(slot) * len(self._slot_of) * 100
                < (self._total_now() + weight) * self._factor)

    def _load_at(self, slot: int) -> int:
        if self._table is None:
            return self._loads[slot]
        return self._table.value(self._shared[slot])

    def _total_now(self) -> int:
        if self._table is None:
            return self._total
        return self._table.value(self._shared_total)

    def _share(self, slot: int, delta: int) -> None:
        """Apply this process's change to the shared counters, if any."""
        if self._table is not None and delta:
            self._table.add(self._shared[slot], delta)
            self._table.add(self._shared_total, delta)

    def _next_random(self) -> int:
        x = self._rand
        x ^= (x << 13) & _U64
        x ^= x >> 7
        x ^= (x << 17) & _U64
        self._rand = x
        return x
