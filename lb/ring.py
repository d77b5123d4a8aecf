"""Chooses the native cores at import: the Cython ring (and CacheAware's prefix index) when
built, else the pure twins.

Mirrors aiohttp's `_http_parser.pyx` / `http_parser.py` pairing. Set ``KVGATE_PURE_RING=1`` to
force the twins (the tests run both). ``IMPLEMENTATION`` says which ring is live;
``INDEX_IMPLEMENTATION`` which prefix index (``lb._prefix_index`` or ``lb.prefix_index``).
"""

from __future__ import annotations

import logging
import os

from lb.chwbl import MAX_ENDPOINTS, MAX_WEIGHT
from lb.loads import LoadTable

__all__ = ["Ring", "LoadTable", "SharedCount", "IMPLEMENTATION", "MAX_ENDPOINTS", "MAX_WEIGHT",
           "hash64", "block_hashes", "PrefixIndex", "INDEX_IMPLEMENTATION"]

_log = logging.getLogger(__name__)
_BUILD = "Build it with `python setup.py build_ext --inplace` (or `make build`)."

if os.environ.get("KVGATE_PURE_RING") == "1":
    from lb.chwbl import Ring, SharedCount, block_hashes, hash64
    from lb.prefix_index import PrefixIndex

    IMPLEMENTATION = INDEX_IMPLEMENTATION = "python"
else:
    try:
        from lb._chwbl import Ring, SharedCount, block_hashes, hash64
    except ImportError:
        from lb.chwbl import Ring, SharedCount, block_hashes, hash64

        IMPLEMENTATION = "python"
        _log.warning("kvgate: the Cython ring (lb._chwbl) is not built; using the pure-Python "
                     "twin. " + _BUILD)
    else:
        IMPLEMENTATION = "cython"
    try:
        from lb._prefix_index import PrefixIndex
    except ImportError:
        from lb.prefix_index import PrefixIndex

        INDEX_IMPLEMENTATION = "python"
        _log.warning("kvgate: the Cython prefix index (lb._prefix_index) is not built; using "
                     "the pure-Python twin. " + _BUILD)
    else:
        INDEX_IMPLEMENTATION = "cython"
