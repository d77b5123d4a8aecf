"""Chooses the ring implementation at import: the Cython core when built, else the pure twin.

Mirrors aiohttp's `_http_parser.pyx` / `http_parser.py` pairing. Set ``KVGATE_PURE_RING=1`` to
force the twin (the tests run both). ``IMPLEMENTATION`` says which one is live.
"""

from __future__ import annotations

import logging
import os

from lb.chwbl import MAX_ENDPOINTS, MAX_WEIGHT
from lb.loads import LoadTable

__all__ = ["Ring", "LoadTable", "SharedCount", "IMPLEMENTATION", "MAX_ENDPOINTS", "MAX_WEIGHT",
           "hash64", "block_hashes"]

if os.environ.get("KVGATE_PURE_RING") == "1":
    from lb.chwbl import Ring, SharedCount, block_hashes, hash64

    IMPLEMENTATION = "python"
else:
    try:
        from lb._chwbl import Ring, SharedCount, block_hashes, hash64
    except ImportError:
        from lb.chwbl import Ring, SharedCount, block_hashes, hash64

        IMPLEMENTATION = "python"
        logging.getLogger(__name__).warning(
            "kvgate: the Cython ring (lb._chwbl) is not built; using the pure-Python twin. "
            "Build it with `python setup.py build_ext --inplace` (or `make build`)."
        )
    else:
        IMPLEMENTATION = "cython"
