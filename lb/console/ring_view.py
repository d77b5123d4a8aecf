"""A model's ring as a picture: which replica owns which share of the hash space.

The ring puts ``replication`` virtual nodes per replica at ``hash64(key + "#" + i)`` and sends
a request to the first vnode at or after its key's hash (``lb.chwbl``); so each vnode owns the
arc from the vnode before it (exclusive) to itself. The arcs are computed here from the same
hash and rule, ordered as the ring orders them (hash, then key), and cached per replica set:
a console refresh costs nothing once a model's replicas are stable. ``tests/test_console_api``
holds this picture to the ring's own picks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from lb.ring import hash64

SPACE = float(1 << 64)


@dataclass(frozen=True, slots=True)
class RingPicture:
    """``keys[owners[j]]`` owns the arc ending at ``ends[j]`` (fractions of the hash space,
    ascending); the first arc starts at the last end, wrapping through 0. Consecutive vnodes of
    one replica are merged into one arc. ``shares`` is each key's fraction of the space."""

    keys: tuple[str, ...]
    ends: tuple[float, ...]
    owners: tuple[int, ...]
    shares: tuple[float, ...]


@lru_cache(maxsize=64)
def ring_picture(keys: tuple[str, ...], replication: int) -> RingPicture:
    """The picture of a ring holding ``keys`` (sorted by the caller: the cache key)."""
    vnodes = sorted((hash64(f"{key}#{i}"), key) for key in keys for i in range(replication))
    index = {key: i for i, key in enumerate(keys)}
    owned = [0] * len(keys)
    ends: list[float] = []
    owners: list[int] = []
    previous = vnodes[-1][0] - (1 << 64) if vnodes else 0
    for position, key in vnodes:
        owner = index[key]
        owned[owner] += position - previous
        previous = position
        if owners and owners[-1] == owner:
            ends[-1] = position / SPACE  # the same replica's arc goes on
        else:
            ends.append(position / SPACE)
            owners.append(owner)
    if len(owners) > 1 and owners[0] == owners[-1]:  # the wrap joins the last arc to the first
        ends.pop()
        owners.pop()
    shares = tuple(n / SPACE for n in owned)
    return RingPicture(keys, tuple(ends), tuple(owners), shares)


def capacity(total: int, replicas: int, mean_load_factor: int) -> int:
    """The bound a replica's load stays under for the next request: the paper's capacity
    ``ceil(factor/100 * (total + 1) / n)``, as the ring computes it (``lb.chwbl``)."""
    if replicas == 0:
        return 0
    return math.ceil(mean_load_factor * (total + 1) / (100 * replicas))
