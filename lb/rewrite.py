"""Adapter responses renamed: the `model` a model server answers with, put back to the client's.

The gateway forwards an adapter request with ``model`` set to the adapter's own name (vLLM
serves a LoRA under its name), so the engine answers ``"model": "sql"`` where the client asked
for ``m_sql``. :class:`ModelRename` puts the client's name back, in a JSON body and in every SSE
chunk, by replacing the exact bytes ``"model":"<adapter>"`` / ``"model": "<adapter>"`` (the
name JSON-escaped) rather than parsing each chunk. A match cannot come from inside a string
value (a quote there is escaped), and the closing quote keeps ``"sqlx"`` from matching ``sql``.

Only adapter requests build one; every other response is relayed as it was.
"""

from __future__ import annotations

import orjson


class ModelRename:
    """Rewrites the served name to the requested one in a body, whole or piece by piece.

    A piece may end inside an occurrence (``..."mod`` then ``el": "sql"...``): the unfinished
    tail is held back and joins the next piece, so :meth:`feed` can return less than it was
    given; :meth:`flush` returns what is still held at the end of the body.
    """

    __slots__ = ("_pairs", "_longest", "_carry")

    def __init__(self, served: str, requested: str) -> None:
        old, new = orjson.dumps(served), orjson.dumps(requested)
        self._pairs = ((b'"model":' + old, b'"model":' + new),
                       (b'"model": ' + old, b'"model": ' + new))
        self._longest = len(self._pairs[1][0])
        self._carry = b""

    def whole(self, body: bytes) -> bytes:
        """A complete body, renamed."""
        if b'"model"' not in body:
            return body
        for old, new in self._pairs:
            body = body.replace(old, new)
        return body

    def feed(self, chunk: bytes) -> bytes:
        """The next piece of a body, renamed, minus any tail that may begin an occurrence."""
        if self._carry:
            chunk = self._carry + chunk
            self._carry = b""
        if not chunk:
            return chunk
        cut = self._unfinished(chunk)
        if cut >= 0:
            self._carry = chunk[cut:]
            chunk = chunk[:cut]
        return self.whole(chunk)

    def flush(self) -> bytes:
        """What is held back (the body ended inside something that only looked like a match)."""
        carry, self._carry = self._carry, b""
        return carry

    def _unfinished(self, data: bytes) -> int:
        """Where the longest tail of ``data`` that is a proper prefix of an occurrence starts,
        -1 when there is none; never inside a complete occurrence."""
        size = len(data)
        start = size - self._longest + 1
        if start < 0:
            start = 0
        quote = data.find(b'"', start)
        if quote < 0:
            return -1
        for old, _ in self._pairs:  # an occurrence near the end is not to be held back
            found = data.rfind(old, quote - self._longest if quote > self._longest else 0)
            if found >= 0 and found + len(old) > quote:
                quote = data.find(b'"', found + len(old))
                if quote < 0:
                    return -1
        while quote >= 0:
            tail = data[quote:]
            for old, _ in self._pairs:
                if len(tail) < len(old) and old.startswith(tail):
                    return quote
            quote = data.find(b'"', quote + 1)
        return -1
