"""One replica as one OS process: start, health-poll, stop, with asyncio only.

Each replica runs in its own process group (a new session), so stopping it also stops whatever
it spawned (vLLM workers, Ollama runners), and a Ctrl-C in the terminal reaches only kvgate,
which then stops replicas in order. As a last resort on Linux, the child asks the kernel for
SIGTERM if kvgate dies without cleaning up (PR_SET_PDEATHSIG), so even a SIGKILLed kvgate
leaves no model server holding a GPU.

A child inherits none of kvgate's file descriptors but stdin/stdout/stderr: uvloop's subprocess
support ignores `close_fds`, so without `_close_on_exec` a replica would hold the gateway's
listening sockets (and keep its ports bound if it outlived kvgate).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import aiohttp

from lb_operator.local.engines import Launch

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _close_on_exec() -> None:
    """In the child, before exec: mark every descriptor above stderr close-on-exec (what
    `close_fds=True` does, which uvloop does not implement). Errors are ignored: a descriptor
    closed meanwhile (the listing's own) needs nothing."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: every possible descriptor
        fds = list(range(3, min(os.sysconf("SC_OPEN_MAX"), 65536)))
    for fd in fds:
        if fd > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


def _child_setup() -> Callable[[], None]:
    """The preexec hook: close kvgate's descriptors on exec, and on Linux ask for SIGTERM when
    the parent dies."""
    libc = None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        _close_on_exec()
        if libc is None:
            return
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def free_port(host: str) -> int:
    """A port the OS just called free. Another process may take it before the replica binds;
    the replica then exits, and the runtime restarts it on a new port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(eq=False, slots=True)
class ReplicaProcess:
    """A model-server process and what the runtime knows about it."""

    name: str
    model: str
    host: str
    port: int
    launch_hash: str
    log_path: Path
    # Its place among the model's live replicas (lowest free first): replicas share this host,
    # so per-replica ports a Model declares once (its KV events) are offset by it.
    rank: int = 0
    state: str = "pending"  # pending -> starting -> ready <-> unhealthy; stopping; exited
    process: asyncio.subprocess.Process | None = None
    created: float = field(default_factory=time.monotonic)
    ready_since: float | None = None
    adapters: frozenset[str] = frozenset()
    stopping: bool = False
    exit_code: int | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def ready(self) -> bool:
        return self.state == "ready" and not self.stopping

    async def start(self, launch: Launch) -> None:
        """Spawn the process with its output appended to its log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **launch.env}
        logfile = await asyncio.to_thread(open, self.log_path, "ab")
        try:
            self.process = await asyncio.create_subprocess_exec(
                *launch.argv, stdin=asyncio.subprocess.DEVNULL, stdout=logfile,
                stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
                preexec_fn=_child_setup())
        finally:
            logfile.close()
        self.state = "starting"

    async def healthy(self, session: aiohttp.ClientSession, path: str, timeout: float = 2.0) -> bool:
        url = f"http://{self.address}{path}"
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def wait_healthy(self, session: aiohttp.ClientSession, path: str, deadline: float) -> bool:
        """Poll until healthy; False if the process exited or the deadline passed first."""
        delay = 0.05
        while self.process is not None and self.process.returncode is None:
            if await self.healthy(session, path):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        return False

    async def run_setup(self, launch: Launch, timeout: float) -> bool:
        """Run the engine's setup commands (e.g. ollama pull) against the running server."""
        env = {**os.environ, **launch.env}
        for step in launch.setup:
            logfile = await asyncio.to_thread(open, self.log_path, "ab")
            try:
                proc = await asyncio.create_subprocess_exec(
                    *step, stdin=asyncio.subprocess.DEVNULL, stdout=logfile,
                    stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
                    preexec_fn=_child_setup())
            finally:
                logfile.close()
            try:
                async with asyncio.timeout(timeout):
                    code = await proc.wait()
            except (TimeoutError, asyncio.CancelledError):
                await _stop_group(proc, 0)
                raise
            if code != 0:
                log.error("replica %s: setup step `%s` exited with %s (see %s)",
                          self.name, " ".join(step), code, self.log_path)
                return False
        return True

    async def stop(self, grace: float) -> None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds; idempotent."""
        self.stopping = True
        if self.process is not None:
            await _stop_group(self.process, grace)
            self.exit_code = self.process.returncode
        self.state = "exited"

    def kill_now(self) -> None:
        """SIGKILL the whole group at once (a second Ctrl-C)."""
        if self.process is not None:
            _signal_group(self.process.pid, signal.SIGKILL)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _stop_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    if proc.returncode is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await proc.wait()
        except TimeoutError:
            log.warning("process %s did not stop within %gs of SIGTERM; killing it", proc.pid, grace)
    # The leader may be gone while children it spawned still run: the group still exists then.
    _signal_group(proc.pid, signal.SIGKILL)
    await proc.wait()
