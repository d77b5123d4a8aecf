"""Where files and batches live: the `Store` interface, and its embedded default (SQLite for the
metadata, a directory for the file bodies) that needs no server.

Every method is a coroutine; the SQLite default runs each one on a single thread of its own,
so the event loop never waits on the disk and one connection is never shared between threads.
Several processes may open the same directory (worker processes, or gateway replicas on a shared
volume): SQLite's WAL and write locks keep them consistent, and a batch is run by whichever
process holds its lease (`claim` / `renew`); every write a runner makes names its owner and is
refused once the lease has passed to someone else, so a result is never recorded twice.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import socket
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, BinaryIO, Callable, Iterable, Protocol, TypeVar

import orjson

T = TypeVar("T")
log = logging.getLogger(__name__)

# Request states in the `requests` table.
PENDING, SUCCEEDED, FAILED = 0, 1, 2
# Tokens of one answer: (input, of which cached, output, of which reasoning).
Usage = tuple[int, int, int, int]
NO_USAGE: Usage = (0, 0, 0, 0)
# A recorded request: (line, state, its output or error line, its tokens).
Result = tuple[int, int, bytes, Usage]
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")
_CHUNK = 256 * 1024
_OPEN_PATIENCE_S = 30.0  # how long opening the store waits for other processes' locks


class Store(Protocol):
    """What the API and the runner need; a cluster may put a PVC or an object store behind it."""

    async def create_file(self, filename: str, purpose: str, source: BinaryIO,
                          tenant: str | None = None,
                          expires_after: int | None = None) -> dict[str, Any]: ...
    async def get_file(self, file_id: str, tenant: str | None = None) -> dict[str, Any] | None: ...
    async def list_files(self, purpose: str | None, after: str | None, limit: int, order: str,
                         tenant: str | None = None) -> tuple[list[dict[str, Any]], bool]: ...
    async def delete_file(self, file_id: str, tenant: str | None = None) -> bool: ...
    def read_file(self, file_id: str) -> AsyncIterator[bytes]: ...
    async def file_bytes(self, file_id: str) -> bytes | None: ...
    async def create_batch(self, batch: dict[str, Any], tenant: str | None = None,
                           output_expires_after: int | None = None) -> dict[str, Any]: ...
    async def get_batch(self, batch_id: str, tenant: str | None = None) -> dict[str, Any] | None: ...
    async def list_batches(self, after: str | None, limit: int,
                           tenant: str | None = None) -> tuple[list[dict[str, Any]], bool]: ...
    async def cancel_batch(self, batch_id: str, now: int,
                           tenant: str | None = None) -> dict[str, Any] | None: ...
    async def batch_tenant(self, batch_id: str) -> str | None: ...
    async def claim(self, owner: str, now: float, lease: float, limit: int) -> list[str]: ...
    async def renew(self, batch_id: str, owner: str, until: float) -> str | None: ...
    async def update_batch(self, batch_id: str, owner: str, status: str | None = None,
                           **fields: Any) -> bool: ...
    async def add_requests(self, batch_id: str, owner: str, rows: list[tuple[int, str | None, bytes | None, int, bytes | None]]) -> bool: ...
    async def pending(self, batch_id: str) -> list[tuple[int, str, bytes]]: ...
    async def record(self, batch_id: str, owner: str, results: list[Result]) -> bool: ...
    async def fail_pending(self, batch_id: str, owner: str, result: Callable[[int, str], bytes]) -> bool: ...
    async def finalize(self, batch_id: str, owner: str, status: str, now: int) -> bool: ...
    async def hold(self, role: str, owner: str, now: float, lease: float) -> bool: ...
    async def sweep(self, now: int, limit: int) -> int: ...
    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    tenant TEXT,
    expires_at INTEGER
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    doc BLOB NOT NULL,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    tenant TEXT,
    output_expires_after INTEGER
);
CREATE INDEX IF NOT EXISTS batches_status ON batches (status);
CREATE TABLE IF NOT EXISTS roles (
    name TEXT PRIMARY KEY,
    owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS requests (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    custom_id TEXT,
    body BLOB,
    state INTEGER NOT NULL,
    result BLOB,
    PRIMARY KEY (batch_id, line)
) WITHOUT ROWID;
"""


class SqliteStore:
    """The embedded store under one directory: ``batch.db`` and ``files/<id>``.

    ``journal_mode`` is SQLite's: ``wal`` on a local disk (readers never wait for the writer),
    ``delete`` on a network file system shared by several machines, where WAL's shared-memory
    index cannot work (SQLite's documentation: WAL does not work over a network filesystem)."""

    def __init__(self, directory: str | Path, journal_mode: str = "wal") -> None:
        if journal_mode not in _SYNCHRONOUS:
            raise ValueError(f"journal mode must be one of {', '.join(_SYNCHRONOUS)}")
        self.directory = Path(directory)
        self.journal_mode = journal_mode
        self._files = self.directory / "files"
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batch-store")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> SqliteStore:
        await self._run(self._open)
        return self

    def _open(self) -> None:
        """Connects, retrying while another process holds the lock: the gateway's workers
        open the store together at start, and SQLite answers a connection that meets another
        one switching a new database to WAL (or recovering it) with "database is locked" at
        once, without waiting out the busy timeout."""
        self._files.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + _OPEN_PATIENCE_S
        pause = 0.01
        while True:
            try:
                self._db = self._connect()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(pause)  # the store's own thread, not the event loop
            pause = min(pause * 2, 0.5)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.directory / "batch.db", isolation_level=None, timeout=30,
                             check_same_thread=False)
        try:
            (mode,) = db.execute(f"PRAGMA journal_mode={self.journal_mode.upper()}").fetchone()
            if mode.lower() != self.journal_mode:  # another process holds the store in WAL
                log.warning("batch store %s: journal mode is %s, not %s (batch.journalMode): "
                            "it changes once every process has closed the store",
                            self.directory, mode.lower(), self.journal_mode)
            db.execute(f"PRAGMA synchronous={_SYNCHRONOUS[self.journal_mode]}")
            db.create_function("owner_gone", 1, owner_gone)
            db.executescript(_SCHEMA)
            _add_columns(db)
        except BaseException:
            db.close()
            raise
        return db

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=False)  # idle by now: nothing to wait for

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` in one write transaction (taken at once, so two processes never deadlock)."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the batch store is not open")
        return self._db

    # -- files -----------------------------------------------------------------------------

    async def create_file(self, filename: str, purpose: str, source: BinaryIO,
                          tenant: str | None = None,
                          expires_after: int | None = None) -> dict[str, Any]:
        """A file from ``source``; it expires ``expires_after`` seconds after it is created
        (OpenAI's anchor `created_at`), or never when None."""
        return await self._run(self._create_file, filename, purpose, source, tenant,
                               expires_after)

    def _create_file(self, filename: str, purpose: str, source: BinaryIO,
                     tenant: str | None, expires_after: int | None) -> dict[str, Any]:
        file_id = "file-" + uuid.uuid4().hex
        path = self._files / file_id
        with open(path, "wb") as out:
            shutil.copyfileobj(source, out, _CHUNK)
            size = out.tell()
        return self._write(lambda db: self._insert_file(db, file_id, filename, purpose, size,
                                                        tenant, expires_after))

    @staticmethod
    def _insert_file(db: sqlite3.Connection, file_id: str, filename: str, purpose: str,
                     size: int, tenant: str | None,
                     expires_after: int | None = None) -> dict[str, Any]:
        created = int(time.time())
        expires = None if expires_after is None else created + expires_after
        db.execute("INSERT OR REPLACE INTO files (id, filename, purpose, bytes, created_at, "
                   "tenant, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (file_id, filename, purpose, size, created, tenant, expires))
        return _file_object((file_id, filename, purpose, size, created, expires))

    async def get_file(self, file_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        return await self._run(self._get_file, file_id, tenant)

    def _get_file(self, file_id: str, tenant: str | None) -> dict[str, Any] | None:
        mine, args = _of(tenant)
        row = self._conn().execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE id = ?{mine}"
                                   f"{_LIVE}", (file_id, *args, int(time.time()))).fetchone()
        return _file_object(row) if row else None

    async def list_files(self, purpose: str | None, after: str | None, limit: int, order: str,
                         tenant: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        return await self._run(self._list_files, purpose, after, limit, order, tenant)

    def _list_files(self, purpose: str | None, after: str | None, limit: int, order: str,
                    tenant: str | None) -> tuple[list[dict[str, Any]], bool]:
        newest_first = order != "asc"
        mine, args = _of(tenant)
        where = ["1" + mine + _LIVE]
        args.append(int(time.time()))
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        if after:
            op = "<" if newest_first else ">"
            where.append(f"seq {op} COALESCE((SELECT seq FROM files WHERE id = ?), "
                         f"{'-1' if newest_first else '1 << 62'})")
            args.append(after)
        rows = self._conn().execute(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE {' AND '.join(where)} "
            f"ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?", (*args, limit + 1),
        ).fetchall()
        return [_file_object(r) for r in rows[:limit]], len(rows) > limit

    async def delete_file(self, file_id: str, tenant: str | None = None) -> bool:
        return await self._run(self._delete_file, file_id, tenant)

    def _delete_file(self, file_id: str, tenant: str | None) -> bool:
        mine, args = _of(tenant)
        deleted = self._write(lambda db: db.execute(
            f"DELETE FROM files WHERE id = ?{mine}{_LIVE}",
            (file_id, *args, int(time.time()))).rowcount)
        if deleted:
            (self._files / file_id).unlink(missing_ok=True)
        return bool(deleted)

    async def read_file(self, file_id: str) -> AsyncIterator[bytes]:
        """The body in chunks, each read on the store's thread."""
        handle = await self._run(_open_or_none, self._files / file_id)
        if handle is None:
            return
        try:
            while chunk := await self._run(handle.read, _CHUNK):
                yield chunk
        finally:
            await self._run(handle.close)

    async def file_bytes(self, file_id: str) -> bytes | None:
        """The whole body, read on a thread of its own (a large input must not hold up the
        store's thread), or None if there is no such file."""
        if await self.get_file(file_id) is None:  # the caller checked whose it is
            return None
        try:
            return await asyncio.to_thread((self._files / file_id).read_bytes)
        except FileNotFoundError:
            return None

    # -- batches ---------------------------------------------------------------------------

    async def create_batch(self, batch: dict[str, Any], tenant: str | None = None,
                           output_expires_after: int | None = None) -> dict[str, Any]:
        """A new batch; its output and error files will expire ``output_expires_after``
        seconds after they are written (None: never)."""
        return await self._run(self._write, lambda db: self._insert_batch(
            db, batch, tenant, output_expires_after))

    @staticmethod
    def _insert_batch(db: sqlite3.Connection, batch: dict[str, Any], tenant: str | None,
                      output_expires_after: int | None) -> dict[str, Any]:
        db.execute("INSERT INTO batches (id, status, doc, tenant, output_expires_after) "
                   "VALUES (?, ?, ?, ?, ?)", (batch["id"], batch["status"],
                                              orjson.dumps(batch), tenant, output_expires_after))
        return _batch_object((batch["status"], orjson.dumps(batch), 0, 0, 0, 0, 0, 0, 0))

    async def get_batch(self, batch_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        return await self._run(self._get_batch, batch_id, tenant)

    def _get_batch(self, batch_id: str, tenant: str | None = None,
                   db: sqlite3.Connection | None = None) -> dict[str, Any] | None:
        mine, args = _of(tenant)
        row = (db or self._conn()).execute(
            f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = ?{mine}", (batch_id, *args)
        ).fetchone()
        return _batch_object(row) if row else None

    async def batch_tenant(self, batch_id: str) -> str | None:
        """The API key name the batch was created under (its lines run under it)."""
        row = await self._run(lambda: self._conn().execute(
            "SELECT tenant FROM batches WHERE id = ?", (batch_id,)).fetchone())
        return row[0] if row else None

    async def list_batches(self, after: str | None, limit: int,
                           tenant: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        return await self._run(self._list_batches, after, limit, tenant)

    def _list_batches(self, after: str | None, limit: int,
                      tenant: str | None) -> tuple[list[dict[str, Any]], bool]:
        mine, args = _of(tenant)
        where = "1" + mine
        if after:
            where += " AND seq < COALESCE((SELECT seq FROM batches WHERE id = ?), -1)"
            args.append(after)
        rows = self._conn().execute(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE {where} "
                                    "ORDER BY seq DESC LIMIT ?", (*args, limit + 1)).fetchall()
        return [_batch_object(r) for r in rows[:limit]], len(rows) > limit

    async def cancel_batch(self, batch_id: str, now: int,
                           tenant: str | None = None) -> dict[str, Any] | None:
        """Ask for a batch to stop: `cancelling` until its runner has written what finished.
        A batch already over is returned unchanged (the caller tells the client)."""
        return await self._run(self._write, lambda db: self._cancel(db, batch_id, now, tenant))

    def _cancel(self, db: sqlite3.Connection, batch_id: str, now: int,
                tenant: str | None) -> dict[str, Any] | None:
        batch = self._get_batch(batch_id, tenant, db)
        if batch is None or batch["status"] not in ("validating", "in_progress"):
            return batch
        self._patch(db, batch_id, "cancelling", {"cancelling_at": now})
        return self._get_batch(batch_id, tenant, db)

    @staticmethod
    def _patch(db: sqlite3.Connection, batch_id: str, status: str | None,
               fields: dict[str, Any]) -> None:
        (doc,) = db.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()
        merged = orjson.loads(doc) | fields
        # A cancel wins over a runner moving on (it reads the status again before the end).
        if status is not None and not (merged["status"] == "cancelling"
                                       and status in ("in_progress", "finalizing")):
            merged["status"] = status
        db.execute("UPDATE batches SET doc = ?, status = ? WHERE id = ?",
                   (orjson.dumps(merged), merged["status"], batch_id))

    # -- running: leases -------------------------------------------------------------------

    async def claim(self, owner: str, now: float, lease: float, limit: int) -> list[str]:
        """Take (or keep) up to ``limit`` active batches whose lease is free, lapsed or ours."""
        return await self._run(self._write, lambda db: self._claim(db, owner, now, lease, limit))

    @staticmethod
    def _claim(db: sqlite3.Connection, owner: str, now: float, lease: float,
               limit: int) -> list[str]:
        marks = ",".join("?" * len(ACTIVE))
        ids = [row[0] for row in db.execute(
            f"SELECT id FROM batches WHERE status IN ({marks}) AND "
            "(owner IS NULL OR owner = ? OR lease_until < ? OR owner_gone(owner)) "
            "ORDER BY seq LIMIT ?",
            (*ACTIVE, owner, now, limit))]
        db.executemany("UPDATE batches SET owner = ?, lease_until = ? WHERE id = ?",
                       [(owner, now + lease, i) for i in ids])
        return ids

    async def renew(self, batch_id: str, owner: str, until: float) -> str | None:
        """Extend our lease; the batch's status, or None if the lease is no longer ours."""
        return await self._run(self._write, lambda db: self._renew(db, batch_id, owner, until))

    @staticmethod
    def _renew(db: sqlite3.Connection, batch_id: str, owner: str, until: float) -> str | None:
        if not db.execute("UPDATE batches SET lease_until = ? WHERE id = ? AND owner = ?",
                          (until, batch_id, owner)).rowcount:
            return None
        return db.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()[0]

    async def update_batch(self, batch_id: str, owner: str, status: str | None = None,
                           **fields: Any) -> bool:
        """Set fields of the batch object (and its status), if the lease is ours."""
        def update(db: sqlite3.Connection) -> bool:
            if not _owns(db, batch_id, owner):
                return False
            self._patch(db, batch_id, status, fields)
            return True
        return await self._run(self._write, update)

    # -- running: requests -----------------------------------------------------------------

    async def add_requests(self, batch_id: str, owner: str,
                           rows: list[tuple[int, str | None, bytes | None, int, bytes | None]]) -> bool:
        """The validated input: (line, custom_id, body, state, result) per line, where lines
        refused by validation are already FAILED with their error line as result."""
        def add(db: sqlite3.Connection) -> bool:
            if not _owns(db, batch_id, owner):
                return False
            db.execute("DELETE FROM requests WHERE batch_id = ?", (batch_id,))  # a re-run
            db.executemany("INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?)",
                           [(batch_id, *row) for row in rows])
            failed = sum(1 for row in rows if row[3] == FAILED)
            db.execute("UPDATE batches SET total = ?, failed = ?, completed = 0 WHERE id = ?",
                       (len(rows), failed, batch_id))
            return True
        return await self._run(self._write, add)

    async def pending(self, batch_id: str) -> list[tuple[int, str, bytes]]:
        return await self._run(lambda: self._conn().execute(
            "SELECT line, custom_id, body FROM requests WHERE batch_id = ? AND state = ? "
            "ORDER BY line", (batch_id, PENDING)).fetchall())

    async def record(self, batch_id: str, owner: str, results: list[Result]) -> bool:
        """Results of requests in one transaction with the counts and token sums; a line
        already recorded is left alone. False if the lease is not ours."""
        return await self._run(self._write, lambda db: _record(db, batch_id, owner, results))

    async def fail_pending(self, batch_id: str, owner: str,
                           result: Callable[[int, str], bytes]) -> bool:
        """Every request not run yet fails with ``result(line, custom_id)`` (expiry, cancel)."""
        def fail(db: sqlite3.Connection) -> bool:
            rows = db.execute("SELECT line, custom_id FROM requests WHERE batch_id = ? AND "
                              "state = ?", (batch_id, PENDING)).fetchall()
            return _record(db, batch_id, owner, [(line, FAILED, result(line, cid), NO_USAGE)
                                                 for line, cid in rows])
        return await self._run(self._write, fail)

    async def finalize(self, batch_id: str, owner: str, status: str, now: int) -> bool:
        """Write the output and error files from the recorded results (in input order), attach
        them, end the batch in ``status`` and drop its request rows — all or nothing: the files
        are named after the batch, so a finalize cut short is simply done again."""
        return await self._run(self._finalize, batch_id, owner, status, now)

    def _finalize(self, batch_id: str, owner: str, status: str, now: int) -> bool:
        db = self._conn()
        if not _owns(db, batch_id, owner):
            return False
        suffix = batch_id.removeprefix("batch_")
        written = {SUCCEEDED: ("file-" + suffix + "-output", "batch_output.jsonl"),
                   FAILED: ("file-" + suffix + "-errors", "batch_errors.jsonl")}
        sizes = {state: self._write_results(db, batch_id, state, file_id)
                 for state, (file_id, _) in written.items()}

        def commit(db: sqlite3.Connection) -> bool:
            if not _owns(db, batch_id, owner):
                return False
            fields: dict[str, Any] = {_STATUS_TIME[status]: now}
            tenant, expires_after = db.execute(
                "SELECT tenant, output_expires_after FROM batches WHERE id = ?",
                (batch_id,)).fetchone()
            for state, key in ((SUCCEEDED, "output_file_id"), (FAILED, "error_file_id")):
                file_id, filename = written[state]
                if sizes[state] is None:
                    continue
                self._insert_file(db, file_id, filename, "batch_output", sizes[state], tenant,
                                  expires_after)
                fields[key] = file_id
            self._patch(db, batch_id, status, fields)
            db.execute("UPDATE batches SET owner = NULL, lease_until = 0 WHERE id = ?",
                       (batch_id,))
            db.execute("DELETE FROM requests WHERE batch_id = ?", (batch_id,))
            return True
        return self._write(commit)

    def _write_results(self, db: sqlite3.Connection, batch_id: str, state: int,
                       file_id: str) -> int | None:
        """The result lines of one state into a file; its size, or None if there were none."""
        cursor = db.execute("SELECT result FROM requests WHERE batch_id = ? AND state = ? "
                            "ORDER BY line", (batch_id, state))
        path = self._files / file_id
        size = 0
        with open(path.with_suffix(".tmp"), "wb") as out:
            for (result,) in cursor:
                out.write(result)
                out.write(b"\n")
                size += len(result) + 1
            out.flush()
            os.fsync(out.fileno())
        if not size:
            path.with_suffix(".tmp").unlink()
            return None
        os.replace(path.with_suffix(".tmp"), path)
        return size

    # -- expiry and roles ------------------------------------------------------------------

    async def sweep(self, now: int, limit: int) -> int:
        """Delete up to ``limit`` files expired by ``now``, bodies first: a sweep cut short
        leaves metadata of an expired file (invisible already, removed next time), never a
        body no row names."""
        return await self._run(self._sweep, now, limit)

    def _sweep(self, now: int, limit: int) -> int:
        ids = [row[0] for row in self._conn().execute(
            "SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ? "
            "ORDER BY expires_at LIMIT ?", (now, limit))]
        for file_id in ids:
            (self._files / file_id).unlink(missing_ok=True)
        if ids:
            self._write(lambda db: db.executemany(
                "DELETE FROM files WHERE id = ? AND expires_at <= ?", [(i, now) for i in ids]))
        return len(ids)

    async def hold(self, role: str, owner: str, now: float, lease: float) -> bool:
        """Take or keep the lease on a role (a job one process of all those sharing the store
        does, such as sweeping): True while ``owner`` holds it."""
        return await self._run(self._write, lambda db: _hold(db, role, owner, now, lease))


def _record(db: sqlite3.Connection, batch_id: str, owner: str,
            results: Iterable[Result]) -> bool:
    if not _owns(db, batch_id, owner):
        return False
    done = {SUCCEEDED: 0, FAILED: 0}
    tokens = [0, 0, 0, 0]
    for line, state, result, usage in results:
        if db.execute("UPDATE requests SET state = ?, result = ?, body = NULL "
                      "WHERE batch_id = ? AND line = ? AND state = ?",
                      (state, result, batch_id, line, PENDING)).rowcount:
            done[state] += 1
            tokens = [a + b for a, b in zip(tokens, usage)]
    db.execute("UPDATE batches SET completed = completed + ?, failed = failed + ?, "
               "input_tokens = input_tokens + ?, cached_tokens = cached_tokens + ?, "
               "output_tokens = output_tokens + ?, reasoning_tokens = reasoning_tokens + ? "
               "WHERE id = ?", (done[SUCCEEDED], done[FAILED], *tokens, batch_id))
    return True


def _hold(db: sqlite3.Connection, role: str, owner: str, now: float, lease: float) -> bool:
    db.execute("INSERT OR IGNORE INTO roles (name, owner, lease_until) VALUES (?, NULL, 0)",
               (role,))
    return bool(db.execute(
        "UPDATE roles SET owner = ?, lease_until = ? WHERE name = ? AND (owner IS NULL OR "
        "owner = ? OR lease_until < ? OR owner_gone(owner))",
        (owner, now + lease, role, owner, now)).rowcount)


def _add_columns(db: sqlite3.Connection) -> None:
    """Columns added since the first schema, added to a store made before them."""
    for table, column, kind in (("files", "expires_at", "INTEGER"),
                                ("batches", "output_expires_after", "INTEGER")):
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            try:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            except sqlite3.OperationalError as exc:  # another process added it meanwhile
                if "duplicate column" not in str(exc):
                    raise


def owner_name() -> str:
    """A runner's name in leases: its host, its pid and a random part (a pid is reused)."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def owner_gone(owner: str) -> bool:
    """Whether a lease's holder is a process of this host that no longer exists: its batches
    are taken over at once (a gateway restarted on one machine resumes without waiting out
    the lease). Anything unsure (another host, a pid now in use) leaves it to the lease."""
    host, _, rest = owner.partition("/")
    pid = rest.partition("/")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _of(tenant: str | None) -> tuple[str, list[Any]]:
    """The SQL condition (and its argument) that keeps a caller to its own key's files and
    batches; with API keys off (None) everything is everyone's."""
    return ("", []) if tenant is None else (" AND tenant = ?", [tenant])


def _owns(db: sqlite3.Connection, batch_id: str, owner: str) -> bool:
    row = db.execute("SELECT owner FROM batches WHERE id = ?", (batch_id,)).fetchone()
    return row is not None and row[0] == owner


def _open_or_none(path: Path) -> BinaryIO | None:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None


_FILE_COLUMNS = "id, filename, purpose, bytes, created_at, expires_at"
# The condition (its argument: now) that hides a file once it has expired, swept or not.
_LIVE = " AND (expires_at IS NULL OR expires_at > ?)"
# synchronous per journal mode: NORMAL is durable across process crashes under WAL; a
# rollback journal needs FULL for that.
_SYNCHRONOUS = {"wal": "NORMAL", "delete": "FULL"}
_BATCH_COLUMNS = ("status, doc, total, completed, failed, input_tokens, cached_tokens, "
                  "output_tokens, reasoning_tokens")
_STATUS_TIME = {"completed": "completed_at", "failed": "failed_at", "expired": "expired_at",
                "cancelled": "cancelled_at"}


def _file_object(row: tuple[Any, ...]) -> dict[str, Any]:
    """OpenAI's File object."""
    file_id, filename, purpose, size, created, expires = row
    return {"id": file_id, "object": "file", "bytes": size, "created_at": created,
            "filename": filename, "purpose": purpose, "status": "processed",
            "expires_at": expires, "status_details": None}


def _batch_object(row: tuple[Any, ...]) -> dict[str, Any]:
    """OpenAI's Batch object: the stored document with its live status and counts."""
    status, doc, total, completed, failed, inputs, cached, outputs, reasoning = row
    batch = orjson.loads(doc)
    batch["status"] = status
    batch["request_counts"] = {"total": total, "completed": completed, "failed": failed}
    batch["usage"] = {"input_tokens": inputs, "input_tokens_details": {"cached_tokens": cached},
                      "output_tokens": outputs,
                      "output_tokens_details": {"reasoning_tokens": reasoning},
                      "total_tokens": inputs + outputs}
    return batch
