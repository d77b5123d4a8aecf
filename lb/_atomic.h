/* Atomic 64-bit counters for the ring's shared load table (lb.chwbl.LoadTable).
 *
 * Several gateway worker processes map the same table; each acquire/release adds to two
 * counters (the endpoint's and the model's total). A plain `+=` from two processes can lose
 * updates, so writes are atomic read-modify-writes. Reads only feed the bounded-load check,
 * which tolerates a value a few nanoseconds old, so they are relaxed loads: on x86-64 a plain
 * aligned 8-byte load, no fence.
 */
#ifndef KVGATE_ATOMIC_H
#define KVGATE_ATOMIC_H

#include <stdint.h>

static inline int64_t kv_atomic_add(int64_t *counter, int64_t delta) {
#if defined(__GNUC__) || defined(__clang__)
    return __atomic_add_fetch(counter, delta, __ATOMIC_SEQ_CST);
#else
#error "kvgate's shared load table needs GCC/Clang __atomic builtins"
#endif
}

static inline int64_t kv_atomic_load(const int64_t *counter) {
    return __atomic_load_n(counter, __ATOMIC_RELAXED);
}

#endif
