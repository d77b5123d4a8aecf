"""``kvgate keys create|list|revoke``: manage the gateway's API keys file.

``create`` prints the new key's secret once, on stdout; the file keeps only its SHA-256. Every
change is written to a temporary file beside the keys file and renamed over it, under a lock
(``flock`` on ``.<name>.lock`` beside it), so a gateway reloading the file never reads half of
one and two commands at once do not lose each other's change.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import os
import re
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import yaml

from lb.config import ConfigError, load_config
from lb.keys import (ApiKey, KeyLimits, KeysFile, expiry_of, hash_secret, keys_from_dict, keys_to_dict,
                     new_secret, read_keys)
from lb.schema import SchemaError

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("keys", help="manage the API keys file (create, list, revoke)",
                                 description="Manage the API keys file the gateway reads when "
                                             "apiKeys.enabled is true.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="add a key and print its secret (once)")
    create.add_argument("name", help="the key's name (its metrics label)")
    create.add_argument("--model", action="append", default=[], metavar="GLOB",
                        help="a model the key may use, as a glob (`llama-*`; an adapter is "
                             "`model_adapter`); repeat for several (default: every model)")
    create.add_argument("-l", "--selector", action="append", default=[], metavar="SELECTOR",
                        help="a label selector the Models the key may use must match "
                             "(`team=a,tier!=gpu`: comma terms are ANDed; repeat to add terms); "
                             "an adapter follows its base Model's labels")
    create.add_argument("--rpm", type=int, default=0, help="requests per minute (0: no limit)")
    create.add_argument("--tpm", type=int, default=0, help="tokens per minute (0: no limit)")
    create.add_argument("--priority", default="default", help="priority class")
    create.add_argument("--expires", help="expiry: an ISO 8601 time or a duration from now "
                                          "(30d, 12h, 1w)")
    actions.add_parser("list", help="the keys, without secrets")
    revoke = actions.add_parser("revoke", help="remove a key (gateways refuse it once they "
                                               "reload the file)")
    revoke.add_argument("name")
    for sub in (create, actions.choices["list"], revoke):
        where = sub.add_mutually_exclusive_group()
        where.add_argument("-f", "--file", help="the keys file (default: $KVGATE_KEYS_FILE, "
                                                "else keys.yaml)")
        where.add_argument("-c", "--config", help="a gateway config whose apiKeys.file to use")
    parser.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    try:
        path = _path(args)
        if args.action == "list":
            return _list(path)
        with _locked(path):
            keys = read_keys(path) if path.exists() else KeysFile()
            if args.action == "create":
                secret, keys = _create(keys, args)
                _write(path, keys)
                print(secret)
                print(f"kvgate: key {args.name!r} added to {path}; the secret above is not "
                      "stored and cannot be shown again", file=sys.stderr)
                return 0
            kept = tuple(k for k in keys.keys if k.name != args.name)
            if len(kept) == len(keys.keys):
                print(f"kvgate: no key named {args.name!r} in {path}", file=sys.stderr)
                return 1
            _write(path, replace(keys, keys=kept))
            print(f"kvgate: key {args.name!r} revoked", file=sys.stderr)
            return 0
    except (SchemaError, ValueError, OSError) as exc:
        print(f"kvgate: {exc}", file=sys.stderr)
        return 2


def _path(args: argparse.Namespace) -> Path:
    if args.config:
        config = load_config(args.config)
        if not config.api_keys.file:
            raise ConfigError("apiKeys.file", "not set", file=args.config)
        return Path(config.api_keys.file)
    return Path(args.file or os.environ.get("KVGATE_KEYS_FILE") or "keys.yaml")


def _create(keys: KeysFile, args: argparse.Namespace) -> tuple[str, KeysFile]:
    if any(k.name == args.name for k in keys.keys):
        raise ValueError(f"a key named {args.name!r} exists; revoke it first")
    if args.rpm < 0 or args.tpm < 0:
        raise ValueError("--rpm and --tpm must be at least 0")
    secret = new_secret()
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    key = ApiKey(name=args.name, hash=hash_secret(secret),
                 models=tuple(args.model) or ("*",),
                 model_selector=",".join(s.strip() for s in args.selector if s.strip()),
                 limits=KeyLimits(requests_per_minute=args.rpm, tokens_per_minute=args.tpm),
                 priority=args.priority, expires_at=_expiry(args.expires, now),
                 created_at=_iso(now))
    updated = replace(keys, keys=keys.keys + (key,))
    # Through the file's own validation: a bad name or priority is refused here, not at reload.
    keys_from_dict(keys_to_dict(updated))
    return secret, updated


def _expiry(text: str | None, now: datetime.datetime) -> str:
    if not text:
        return ""
    parts = _DURATION.findall(text)
    if parts and "".join(n + u for n, u in parts) == text:
        return _iso(now + datetime.timedelta(seconds=sum(int(n) * _UNITS[u] for n, u in parts)))
    try:
        expiry_of(text)
    except ValueError:
        raise ValueError(f"--expires: expected an ISO 8601 time or a duration like 30d, "
                         f"got {text!r}") from None
    return text


def _iso(when: datetime.datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def _list(path: Path) -> int:
    keys = read_keys(path) if path.exists() else KeysFile()
    rows = [("NAME", "MODELS", "SELECTOR", "RPM", "TPM", "PRIORITY", "EXPIRES", "CREATED",
             "HASH")]
    for k in keys.keys:
        rows.append((k.name, ",".join(k.models), k.model_selector or "-",
                     str(k.limits.requests_per_minute or "-"),
                     str(k.limits.tokens_per_minute or "-"), k.priority, k.expires_at or "never",
                     k.created_at or "-", k.hash[:19] + "…"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(path: Path, keys: KeysFile) -> None:
    """Write beside the file and rename over it (a reader sees the old file or the new)."""
    text = ("# API keys of the kvgate gateway (`kvgate keys`): hashes only, never secrets.\n"
            + yaml.safe_dump(keys_to_dict(keys), sort_keys=False))
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
