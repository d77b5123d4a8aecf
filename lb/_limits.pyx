# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: annotation_typing=False, binding=False, embedsignature=True
"""The per-key budgets' check-and-charge in C: the twin of ``lb.limits.PyBudgets``.

Same arithmetic, same ``Decision``, header lines and corrections for every call
(``tests/test_limits.py`` runs both side by side). The request path makes two calls per
request: ``admit_lines`` (check, charge and the ``x-ratelimit-*`` lines, written by hand: printf
cost three times the rest of the call) and ``settle`` (the usage found with glibc's ``memmem``
and the charge corrected). Only the lock differs: the twin takes the table's process-shared semaphore, this takes a
spin lock in the slot's spare word (``_atomic.h``), so an admission costs no system call and
two keys never wait on each other. All processes sharing a table run one install, hence one of
the two.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

cdef extern from "string.h" nogil:
    # glibc's (Python.h defines _GNU_SOURCE): a vectorised search, far faster than a loop here
    void *memmem(const void *haystack, size_t haystacklen, const void *needle, size_t needlelen)
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef extern from "_atomic.h":
    void kv_spin_lock(int64_t *word) nogil
    void kv_spin_unlock(int64_t *word) nogil

cdef int64_t WINDOW = 60_000_000_000
cdef int64_t HEADER_WORDS = 8
cdef int64_t ENTRY_WORDS = 4


cdef inline int64_t _monotonic_ns() nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1_000_000_000 + ts.tv_nsec


cdef inline int64_t _left(int64_t used, int64_t step):
    if step == 0:
        return -1
    if used < 0:
        used = 0
    if used >= WINDOW:
        return 0
    return (WINDOW - used) // step


cdef inline Py_ssize_t _put(char *out, const char *text, Py_ssize_t size) noexcept:
    memcpy(out, text, size)
    return size


cdef Py_ssize_t _int(char *out, int64_t value) noexcept:
    """``value`` in decimal into ``out``; the length written (no printf: ~10x cheaper)."""
    cdef char digits[24]
    cdef Py_ssize_t n = 0, i
    cdef uint64_t v
    cdef Py_ssize_t sign = 0
    if value < 0:
        out[0] = 45  # '-'
        sign = 1
        v = <uint64_t>(-(value + 1)) + 1
    else:
        v = <uint64_t>value
    while True:
        digits[n] = <char>(48 + v % 10)
        n += 1
        v //= 10
        if v == 0:
            break
    for i in range(n):
        out[sign + i] = digits[n - 1 - i]
    return sign + n


cdef Py_ssize_t _duration(char *out, int64_t ns) noexcept:
    """``lb.limits.duration_text`` into ``out``; the length written."""
    cdef int64_t ms, frac, secs
    cdef Py_ssize_t n
    if ns < 1_000_000_000:
        n = _int(out, ns // 1_000_000 if ns > 0 else 0)
        return n + _put(out + n, "ms", 2)
    if ns < WINDOW:
        ms = (ns + 999_999) // 1_000_000  # rounded up, as the twin's -(-ns // 1_000_000)
        n = _int(out, ms // 1000)
        frac = ms % 1000
        if frac:  # as Python's :g writes it: up to three decimals, no trailing zeros
            out[n] = 46  # '.'
            out[n + 1] = <char>(48 + frac // 100)
            n += 2
            if frac % 100:
                out[n] = <char>(48 + frac // 10 % 10)
                n += 1
                if frac % 10:
                    out[n] = <char>(48 + frac % 10)
                    n += 1
        return n + _put(out + n, "s", 1)
    secs = (ns + 999_999_999) // 1_000_000_000
    n = _int(out, secs // 60)
    n += _put(out + n, "m", 1)
    n += _int(out + n, secs % 60)
    return n + _put(out + n, "s", 1)


cdef Py_ssize_t _block(char *out, const char *what, Py_ssize_t size, int64_t limit,
                       int64_t remaining, int64_t reset) noexcept:
    """One limit's three ``x-ratelimit-*`` lines into ``out``; the length written."""
    cdef Py_ssize_t n = _put(out, "x-ratelimit-limit-", 18)
    n += _put(out + n, what, size)
    n += _put(out + n, ": ", 2)
    n += _int(out + n, limit)
    n += _put(out + n, "\r\nx-ratelimit-remaining-", 24)
    n += _put(out + n, what, size)
    n += _put(out + n, ": ", 2)
    n += _int(out + n, remaining)
    n += _put(out + n, "\r\nx-ratelimit-reset-", 20)
    n += _put(out + n, what, size)
    n += _put(out + n, ": ", 2)
    n += _duration(out + n, reset)
    return n + _put(out + n, "\r\n", 2)


def duration_text(int64_t ns):
    """The C core's ``lb.limits.duration_text`` (the tests compare the two)."""
    cdef char buf[64]
    cdef Py_ssize_t n = _duration(buf, ns)
    return PyBytes_FromStringAndSize(buf, n).decode()


cdef int64_t MAX_USAGE = 1_000_000_000  # lb.limits.MAX_USAGE


cdef inline bint _space(unsigned char c):
    return c == 32 or 9 <= c <= 13  # what ``\s`` matches in a bytes regex


cdef int64_t _count_after(const unsigned char *data, Py_ssize_t n, const char *key,
                          Py_ssize_t size):
    """The count after the last ``key`` (quotes included) in ``data``, as ``lb.limits``'s
    patterns read it: -1 when ``key`` is not there, -2 when it is but no count follows (or
    one above ``MAX_USAGE``)."""
    cdef const unsigned char *at = data
    cdef const unsigned char *last = NULL
    cdef const unsigned char *hit
    cdef Py_ssize_t j
    cdef int64_t value = 0
    while True:  # the last occurrence: each search starts past the one before (they are rare)
        hit = <const unsigned char *>memmem(at, n - (at - data), key, size)
        if hit == NULL:
            break
        last = hit
        at = hit + 1
    if last == NULL:
        return -1
    j = (last - data) + size
    while j < n and _space(data[j]):
        j += 1
    if j >= n or data[j] != 58:  # ':'
        return -2
    j += 1
    while j < n and _space(data[j]):
        j += 1
    if j >= n or not 48 <= data[j] <= 57:
        return -2
    while j < n and 48 <= data[j] <= 57:
        value = value * 10 + (data[j] - 48)
        if value > MAX_USAGE:
            return -2
        j += 1
    return value


cdef int64_t _usage(const unsigned char *data, Py_ssize_t n):
    """``lb.limits.usage_in``: the tokens of the usage at the end of an answer, -1: none."""
    cdef int64_t total, given, made
    if memmem(data, n, b'_tokens"', 8) == NULL:  # the end of every key below: one search
        return -1
    total = _count_after(data, n, b'"total_tokens"', 14)
    if total != -1:
        return total if total >= 0 else -1
    given = _count_after(data, n, b'"input_tokens"', 14)
    made = _count_after(data, n, b'"output_tokens"', 15)
    if given < 0 or made < 0:
        return -1
    return given + made


def usage_in(const unsigned char[::1] tail):
    """The C core's ``lb.limits.usage_in`` (the tests compare the two)."""
    cdef int64_t used = _usage(&tail[0], tail.shape[0]) if tail.shape[0] else -1
    return None if used < 0 else used


cdef class Budgets:
    """Check-and-charge over a ``LimitTable``'s words (a memoryview cast to ``q``)."""

    cdef int64_t *_words
    cdef object _view
    cdef object _decision

    def __cinit__(self, words, decision, lock=None):
        cdef int64_t[::1] view = words
        self._view = view
        self._words = &view[0]
        self._decision = decision

    def admit(self, Py_ssize_t slot, int64_t rpm, int64_t tpm, int64_t tokens, now=None):
        return self._admit(slot, rpm, tpm, tokens, now, False)

    def admit_lines(self, Py_ssize_t slot, int64_t rpm, int64_t tpm, int64_t tokens, now=None):
        """``admit``, answering an admission with its ``x-ratelimit-*`` header lines (bytes)
        instead of a ``Decision``; a refusal is still its ``Decision``."""
        return self._admit(slot, rpm, tpm, tokens, now, True)

    cdef object _admit(self, Py_ssize_t slot, int64_t rpm, int64_t tpm, int64_t tokens, now,
                       bint lines):
        cdef char buf[512]
        cdef Py_ssize_t n = 0
        cdef int64_t t_now = _monotonic_ns() if now is None else <int64_t>now
        cdef int64_t *entry = self._words + HEADER_WORDS + ENTRY_WORDS * slot
        cdef int64_t r_step = WINDOW // rpm if rpm else 0
        cdef int64_t t_step = WINDOW // tpm if tpm else 0
        cdef int64_t r_tat, t_tat, r_used, t_used, r_wait, t_wait, cost
        kv_spin_lock(entry + 3)
        r_tat = entry[1]
        t_tat = entry[2]
        if r_tat < t_now:
            r_tat = t_now
        if t_tat < t_now:
            t_tat = t_now
        r_used = r_tat + r_step - t_now
        t_used = t_tat + t_step * tokens - t_now
        if r_used <= WINDOW and t_used <= WINDOW:
            if rpm:
                entry[1] = r_used + t_now
            if tpm:
                entry[2] = t_used + t_now
            kv_spin_unlock(entry + 3)
            if lines:
                if rpm:  # at most 2 x 3 lines of < 80 bytes: the buffer holds them
                    n = _block(buf, "requests", 8, rpm, (WINDOW - r_used) // r_step, r_used)
                if tpm:
                    n += _block(buf + n, "tokens", 6, tpm, (WINDOW - t_used) // t_step, t_used)
                return PyBytes_FromStringAndSize(buf, n)
            return self._decision("", (WINDOW - r_used) // r_step if rpm else -1,
                                  (WINDOW - t_used) // t_step if tpm else -1,
                                  r_used if rpm else 0, t_used if tpm else 0, 0)
        kv_spin_unlock(entry + 3)
        r_wait = r_used - WINDOW
        t_wait = t_used - WINDOW
        cost = t_step * tokens
        if cost > WINDOW:
            wait = WINDOW
        else:
            wait = max(r_wait, t_wait, 0)
        return self._decision("requests" if r_wait > 0 else "tokens",
                              _left(r_tat - t_now, r_step), _left(t_tat - t_now, t_step),
                              r_tat - t_now, t_tat - t_now, wait)

    def settle(self, Py_ssize_t slot, int64_t tpm, int64_t estimate, const unsigned char[::1] tail):
        """Correct a charge of ``estimate`` tokens by the usage at the end of the answer
        (``tail``); the correction made (0: no usage found, or no limit)."""
        cdef int64_t used, delta
        cdef int64_t *entry
        if tpm == 0 or tail.shape[0] == 0:
            return 0
        used = _usage(&tail[0], tail.shape[0])
        if used < 0 or used == estimate:
            return 0
        delta = used - estimate
        entry = self._words + HEADER_WORDS + ENTRY_WORDS * slot
        kv_spin_lock(entry + 3)
        entry[2] = entry[2] + delta * (WINDOW // tpm)
        kv_spin_unlock(entry + 3)
        return delta

    def adjust_tokens(self, Py_ssize_t slot, int64_t tpm, int64_t delta):
        cdef int64_t *entry
        if not tpm or not delta:
            return
        entry = self._words + HEADER_WORDS + ENTRY_WORDS * slot
        kv_spin_lock(entry + 3)
        entry[2] = entry[2] + delta * (WINDOW // tpm)
        kv_spin_unlock(entry + 3)
