"""Small state files of `kvgate up` (status, replica counts, the autoscaler's windows).

Each is replaced atomically (written next to it, then renamed), so a crash or a reader never
sees half a file. The writes are tiny but still file-system calls, so the async side runs them
in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> None:
    """Blocking: call it in a thread from the event loop."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class JsonFileStateStore:
    """A JSON document in one file: the autoscaler's `StateStore` and the replica counts' file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    async def load(self) -> Any:
        """The saved document, or None when there is none yet; ValueError if it is not JSON."""
        return await asyncio.to_thread(self._read)

    async def save(self, state: Any) -> None:
        await asyncio.to_thread(write_atomic, self.path, json.dumps(state, sort_keys=True))

    def _read(self) -> Any:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
