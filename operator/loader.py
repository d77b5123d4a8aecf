"""Fetch model and LoRA adapter files by URL scheme into a directory a model server can read.

Model servers load from local paths, but files live on the Hugging Face hub, S3, GCS, OSS or a
local path. This module is what the loader image runs (`modelLoading.image`):
- `serve`: the `adapter-loader` sidecar of each adapter-enabled Pod (an emptyDir shared with the
  server), answering `POST /fetch {"name", "url"}` with `{"path"}`; the local runtime uses
  `AdapterStore` in-process instead;
- `fetch <url> <dir>`: the cache-loading Job of a cache profile (see cache.py);
- `evict <dir>`: the cache-eviction Job.

Each URL lands in its own directory, `<root>/<name>-<hash of url>`, written to a temporary
directory first and renamed when complete: a fetch is idempotent, a changed URL never reuses the
old files, and a crash mid-download leaves no half-written adapter behind. Downloads use the
same command-line tools as KubeAI's model-loader image (huggingface-cli, aws, gcloud, ossutil).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from lb.model import parse_model_url

LOADER_CONTAINER = "adapter-loader"
LOADER_PORT = 8001
ADAPTERS_DIR = "/adapters"
LOADER_PORT_ANNOTATION = "kvgate.dev/adapter-loader-port"  # on a Pod that has the sidecar


class FetchError(RuntimeError):
    """An adapter could not be fetched; the message says which URL and why."""


def adapter_dir(root: str | Path, name: str, url: str) -> Path:
    """Where an adapter from `url` lives under `root`; the URL hash makes a changed URL a new path."""
    return Path(root) / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


def download_command(url: str, target: str) -> list[str] | None:
    """The CLI that copies a remote adapter into `target`; None for file:// (copied in Python)."""
    parsed = parse_model_url(url)
    if parsed.scheme == "hf":
        return ["huggingface-cli", "download", parsed.ref, "--local-dir", target]
    if parsed.scheme == "s3":
        return ["aws", "s3", "sync", f"s3://{parsed.ref}", target]
    if parsed.scheme == "gs":
        return ["gcloud", "storage", "rsync", "--recursive", f"gs://{parsed.ref}", target]
    if parsed.scheme == "oss":
        return ["ossutil", "cp", "--recursive", f"oss://{parsed.ref}", target]
    if parsed.scheme == "file":
        return None
    raise FetchError(f"{url}: cannot fetch from {parsed.scheme}://")


class AdapterStore:
    """Adapters fetched under one root directory; concurrent fetches of one URL download once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._locks: dict[Path, asyncio.Lock] = {}

    async def fetch(self, name: str, url: str) -> str:
        """Fetch once into `adapter_dir(root, name, url)` and return that path (at once if present)."""
        target = adapter_dir(self.root, name, url)
        async with self._locks.setdefault(target, asyncio.Lock()):
            if not await asyncio.to_thread(target.is_dir):
                await fetch_to(url, target)
        return str(target)


async def fetch_to(url: str, target: str | Path) -> None:
    """Fetch `url` into `target` all at once: staged next to it, renamed when complete."""
    target = Path(target)
    await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
    staging = await asyncio.to_thread(tempfile.mkdtemp, prefix=f".{target.name}-", dir=target.parent)
    try:
        await _download(url, staging)
        await asyncio.to_thread(_replace_dir, staging, target)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, staging, True)
        raise


def _replace_dir(staging: str, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    os.rename(staging, target)


async def _download(url: str, staging: str) -> None:
    command = download_command(url, staging)
    if command is None:
        source = "/" + parse_model_url(url).ref.lstrip("/")
        try:
            await asyncio.to_thread(shutil.copytree, source, staging, dirs_exist_ok=True)
        except OSError as exc:
            raise FetchError(f"{url}: cannot copy: {exc}") from None
        return
    try:
        proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise FetchError(f"{url}: cannot run {command[0]}: {exc.strerror}") from None
    _, stderr = await proc.communicate()
    if proc.returncode != 0:
        tail = stderr.decode(errors="replace").strip()[-500:]
        raise FetchError(f"{url}: {command[0]} exited with {proc.returncode}: {tail}")


# ---------------------------------------------------------------------------------------------
# The sidecar's HTTP face


def loader_app(store: AdapterStore) -> web.Application:
    """`POST /fetch {"name","url"}` -> 200 `{"path"}`, 400 for a bad request, 502 when the fetch failed."""

    async def fetch(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            name, url = str(body["name"]), str(body["url"])
            path = await store.fetch(name, url)
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)
        except FetchError as exc:
            return web.json_response({"error": str(exc)}, status=502)
        return web.json_response({"path": path})

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/fetch", fetch)
    app.router.add_get("/health", health)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lb_operator.loader",
                                     description="Fetch model and adapter files by URL scheme.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="the adapter-loader sidecar (POST /fetch)")
    serve.add_argument("--dir", default=ADAPTERS_DIR)
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=LOADER_PORT)
    fetch = commands.add_parser("fetch", help="fetch a URL into a directory (cache-loading Job)")
    fetch.add_argument("url")
    fetch.add_argument("dir")
    evict = commands.add_parser("evict", help="remove a directory (cache-eviction Job)")
    evict.add_argument("dir")
    args = parser.parse_args(argv)
    if args.command == "serve":
        web.run_app(loader_app(AdapterStore(args.dir)), host=args.host, port=args.port, access_log=None)
    elif args.command == "fetch":
        try:
            asyncio.run(fetch_to(args.url, args.dir))
        except FetchError as exc:
            print(exc, file=sys.stderr)
            return 1
    else:
        shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
