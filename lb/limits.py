"""Per-key rate limits (requests and tokens per minute), shared by the gateway's worker processes.

Each key's budget is a GCRA (generic cell rate algorithm, a token bucket kept as one number):
the "theoretical arrival time" (TAT) of the next unit. A key with a limit of L per minute
replenishes one unit every 60/L s and may hold a burst of L: a request costing ``n`` units is
admitted when ``max(TAT, now) + n * 60/L - now <= 60 s``, and moves TAT there. So a fresh key
gets exactly L units at once, then one every 60/L s, the "continuous replenishment" OpenAI
describes, with no window edge at which twice the limit gets through.

The TATs live in an anonymous shared memory map created before the workers fork, the way the
ring's in-flight loads do (``lb.loads``): one 32-byte entry per key (64-bit tag of the key's
hash, requests TAT, tokens TAT, a lock word) in a fixed open-addressing table. A
check-and-charge reads and writes two words and must be atomic across processes: the C core
(``lb/_limits.pyx``, built with the ring's) takes a spin lock in the entry's lock word
(``_atomic.h``), its pure twin here (``PyBudgets``) the table's process-shared semaphore; all
processes of one install run the same one. Times are ``CLOCK_MONOTONIC`` nanoseconds, one
clock for every process of the machine.

Per request the gateway makes two calls (``lb.admission``): ``admit_lines`` (the check, the
charge and the admitted answer's ``x-ratelimit-*`` header lines) and ``settle`` (the usage at
the end of the answer, ``usage_in``, and the correction of the estimate charged).

Several gateway *replicas* (pods) do not share this table: each enforces the limits on what it
serves (the README says so).
"""

from __future__ import annotations

import mmap
import multiprocessing
import re
import time
from typing import Any, NamedTuple

__all__ = ["LimitTable", "Decision", "WINDOW_NS", "duration_text", "limit_lines", "usage_in"]

WINDOW_NS = 60_000_000_000  # the limits are per minute
_HEADER_WORDS = 8  # LimitTable.HEADER // 8
_ENTRY_WORDS = 4  # LimitTable.ENTRY // 8: tag, requests TAT, tokens TAT, the C core's lock


class Decision(NamedTuple):
    """The outcome of one admission, for the response's headers and the 429's message.

    ``remaining_*`` and ``reset_*_ns`` describe the budget after the request (or, when refused,
    as it stands); ``retry_after_ns`` is how long until the refused request would fit.
    ``refused`` is "", "requests" or "tokens" (the first limit that refused it). A tuple: one
    is made per request."""

    refused: str
    remaining_requests: int
    remaining_tokens: int
    reset_requests_ns: int
    reset_tokens_ns: int
    retry_after_ns: int = 0


class LimitTable:
    """Two GCRA budgets (requests, tokens) per key slot, in shared memory.

    Create it before forking the workers (each child inherits the mapping and the lock).
    Slots are found by a non-zero 64-bit tag (from the key's hash) and never removed: a key
    that is revoked and restored finds its budget again, and a table of ``capacity`` slots
    serves as many distinct keys over the gateway's life.
    """

    HEADER = 64
    ENTRY = 32
    _WORDS = ENTRY // 8

    def __init__(self, capacity: int = 1 << 16, pure: bool = False) -> None:
        """``pure``: use the Python twin even when the C core is built (the tests run both)."""
        if not isinstance(capacity, int) or not 2 <= capacity <= 1 << 24:
            raise ValueError("capacity must be an int in [2, 16777216]")
        self.capacity = capacity
        self.buffer = mmap.mmap(-1, self.HEADER + capacity * self.ENTRY)  # MAP_SHARED
        self._tags = memoryview(self.buffer).cast("Q")
        self._words = memoryview(self.buffer).cast("q")
        self._lock = multiprocessing.get_context("fork").Lock()
        core = PyBudgets if pure or _Budgets is None else _Budgets
        self.budgets = core(self._words, Decision, self._lock)
        # The hot calls, bound once: ``table.admit(...)`` is the chosen twin's own method.
        self.admit = self.budgets.admit
        self.admit_lines = self.budgets.admit_lines
        self.adjust_tokens = self.budgets.adjust_tokens
        self.settle = self.budgets.settle

    def slot(self, tag: int) -> int:
        """The slot of ``tag`` (non-zero), inserted if new."""
        if not isinstance(tag, int) or not 0 < tag < 1 << 64:
            raise ValueError("tag must be a non-zero unsigned 64-bit int")
        tags, capacity = self._tags, self.capacity
        with self._lock:
            i = tag % capacity
            for _ in range(capacity):
                at = self._base(i)
                found = tags[at]
                if found == tag:
                    return i
                if found == 0:
                    tags[at] = tag
                    return i
                i = (i + 1) % capacity
        raise RuntimeError(f"the limit table is full ({capacity} keys)")

    def _base(self, slot: int) -> int:
        return self.HEADER // 8 + self._WORDS * slot

    def close(self) -> None:
        # The C core holds a view of the buffer: every reference to it goes first.
        del self.admit, self.admit_lines, self.adjust_tokens, self.settle, self.budgets
        self._tags.release()
        self._words.release()
        self.buffer.close()


class PyBudgets:
    """The check-and-charge in Python, under the table's lock: the specification of the C core
    (``lb._limits.Budgets``), used when it is not built."""

    def __init__(self, words: memoryview, decision: type[Decision], lock: Any) -> None:
        self._words = words
        self._lock = lock

    def admit(self, slot: int, rpm: int, tpm: int, tokens: int,
              now: int | None = None) -> Decision:
        """Charge one request costing ``tokens`` to ``slot`` if both budgets allow it.

        A limit of 0 is no limit. Nothing is charged when either budget refuses."""
        if now is None:
            now = time.monotonic_ns()
        words, at = self._words, _HEADER_WORDS + _ENTRY_WORDS * slot
        r_step = WINDOW_NS // rpm if rpm else 0
        t_step = WINDOW_NS // tpm if tpm else 0
        with self._lock:
            r_tat = words[at + 1]
            t_tat = words[at + 2]
            if r_tat < now:
                r_tat = now
            if t_tat < now:
                t_tat = now
            r_used = r_tat + r_step - now  # the window spent once this request is charged
            t_used = t_tat + t_step * tokens - now
            if r_used <= WINDOW_NS and t_used <= WINDOW_NS:
                if rpm:
                    words[at + 1] = r_used + now
                if tpm:
                    words[at + 2] = t_used + now
                return Decision("", (WINDOW_NS - r_used) // r_step if rpm else -1,
                                (WINDOW_NS - t_used) // t_step if tpm else -1,
                                r_used if rpm else 0, t_used if tpm else 0)
        r_wait, t_wait = r_used - WINDOW_NS, t_used - WINDOW_NS
        return Decision("requests" if r_wait > 0 else "tokens",
                        _left(r_tat - now, r_step), _left(t_tat - now, t_step),
                        r_tat - now, t_tat - now, _retry_after(r_wait, t_wait, t_step * tokens))

    def admit_lines(self, slot: int, rpm: int, tpm: int, tokens: int,
                    now: int | None = None) -> bytes | Decision:
        """``admit``, answering an admission with its ``x-ratelimit-*`` header lines
        (``limit_lines``) instead of its ``Decision``: what the request path needs, made in
        the same call (the C core writes them without a ``Decision`` or a string in between).
        A refusal is its ``Decision``, for the 429."""
        decision = self.admit(slot, rpm, tpm, tokens, now)
        return decision if decision.refused else limit_lines(rpm, tpm, decision)

    def settle(self, slot: int, tpm: int, estimate: int, tail: bytes) -> int:
        """Correct a charge of ``estimate`` tokens to ``slot`` by the usage found at the end of
        the answer (``tail``: ``usage_in``); the correction made (0: no usage, or no limit).
        One call for the search and the correction (the C core scans the bytes itself)."""
        used = usage_in(tail) if tpm and tail else None
        if used is None or used == estimate:
            return 0
        self.adjust_tokens(slot, tpm, used - estimate)
        return used - estimate

    def adjust_tokens(self, slot: int, tpm: int, delta: int) -> None:
        """Correct the tokens charged to ``slot`` by ``delta`` (the response's usage minus the
        estimate charged at admission). A refund never banks more than a full budget."""
        if not tpm or not delta:
            return
        words, at = self._words, _HEADER_WORDS + _ENTRY_WORDS * slot
        step = WINDOW_NS // tpm
        with self._lock:
            words[at + 2] = words[at + 2] + delta * step



try:
    from lb._limits import Budgets as _Budgets
except ImportError:  # the C core is not built: the twin is used (lb.ring warns about the build)
    _Budgets = None



def _left(used_ns: int, step: int) -> int:
    """Units still available with ``used_ns`` of the window spent (-1: no limit)."""
    if not step:
        return -1
    return max(0, (WINDOW_NS - max(used_ns, 0)) // step)


def _retry_after(r_wait: int, t_wait: int, cost: int) -> int:
    """How long until a refused request fits; a request larger than a whole minute's token
    budget never does, and is told to come back in a minute (its error says why)."""
    if cost > WINDOW_NS:
        return WINDOW_NS
    return max(r_wait, t_wait, 0)


# A usage count above this is not believed (nor can it overflow the budgets' arithmetic).
MAX_USAGE = 1_000_000_000
_TOTAL = re.compile(rb'"total_tokens"\s*:\s*(\d+)')
_INPUT = re.compile(rb'"input_tokens"\s*:\s*(\d+)')
_OUTPUT = re.compile(rb'"output_tokens"\s*:\s*(\d+)')


def usage_in(tail: bytes) -> int | None:
    """The tokens of the last usage object in the end of an answer: ``total_tokens`` (OpenAI's
    chat, completions, embeddings and Responses APIs), else ``input_tokens`` +
    ``output_tokens`` (Anthropic's); None without one (or with a count above ``MAX_USAGE``).
    A search, not a parse: the usage is the last thing in a JSON answer and in the last event
    of a stream with ``include_usage``, and a key in quotes cannot occur inside a JSON string
    (its quotes would be escaped)."""
    at = tail.rfind(b'"total_tokens"')
    if at >= 0:
        found = _TOTAL.match(tail, at)
        return _believed(int(found.group(1))) if found else None
    counts = 0
    for key, pattern in ((b'"input_tokens"', _INPUT), (b'"output_tokens"', _OUTPUT)):
        at = tail.rfind(key)
        found = pattern.match(tail, at) if at >= 0 else None
        if found is None or _believed(int(found.group(1))) is None:
            return None
        counts += int(found.group(1))
    return counts


def _believed(count: int) -> int | None:
    return count if count <= MAX_USAGE else None


def limit_lines(rpm: int, tpm: int, decision: Decision) -> bytes:
    """OpenAI's ``x-ratelimit-*`` headers, for the limits a key has (0: none), as the lines of
    a response head (``name: value\r\n`` each)."""
    lines = b""
    if rpm:
        lines += (b"x-ratelimit-limit-requests: %d\r\nx-ratelimit-remaining-requests: %d\r\n"
                  b"x-ratelimit-reset-requests: %s\r\n"
                  % (rpm, decision.remaining_requests,
                     duration_text(decision.reset_requests_ns).encode()))
    if tpm:
        lines += (b"x-ratelimit-limit-tokens: %d\r\nx-ratelimit-remaining-tokens: %d\r\n"
                  b"x-ratelimit-reset-tokens: %s\r\n"
                  % (tpm, decision.remaining_tokens,
                     duration_text(decision.reset_tokens_ns).encode()))
    return lines


def duration_text(ns: int) -> str:
    """A duration the way OpenAI's ``x-ratelimit-reset-*`` headers write it: ``20ms``, ``1.5s``,
    ``6m0s``."""
    if ns < 1_000_000_000:
        return f"{ns // 1_000_000 if ns > 0 else 0}ms"
    if ns < WINDOW_NS:
        ms = -(-ns // 1_000_000)  # rounded up to the millisecond
        return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms / 1000:g}s"
    minutes, rest = divmod(-(-ns // 1_000_000_000), 60)
    return f"{minutes}m{rest}s"
