/* Atomic 64-bit counters for the ring's shared load table (lb.chwbl.LoadTable), and the
 * spin lock of the per-key limit table (lb.limits.LimitTable).
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
/* A spin lock in one 64-bit word of shared memory (0 free, 1 held), for the per-key limit
 * budgets (lb/_limits.pyx): their check-and-charge reads and writes two words and holds the
 * lock for a few dozen instructions, so a waiter spins briefly and yields the CPU if the
 * holder was preempted. */
#include <sched.h>

static inline void kv_spin_lock(int64_t *word) {
    int spins = 0;
    for (;;) {
        int64_t expected = 0;
        if (__atomic_compare_exchange_n(word, &expected, 1, 0, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED))
            return;
        if (++spins >= 64) {
            spins = 0;
            sched_yield();
        }
    }
}

static inline void kv_spin_unlock(int64_t *word) {
    __atomic_store_n(word, 0, __ATOMIC_RELEASE);
}

#endif
}

static inline int64_t kv_atomic_load(const int64_t *counter) {
    return __atomic_load_n(counter, __ATOMIC_RELAXED);
}

/* A spin lock in one 64-bit word of shared memory (0 free, 1 held), for the per-key limit
 * budgets (lb/_limits.pyx): their check-and-charge reads and writes two words and holds the
 * lock for a few dozen instructions, so a waiter spins briefly and yields the CPU if the
 * holder was preempted. */
#include <sched.h>

static inline void kv_spin_lock(int64_t *word) {
    int spins = 0;
    for (;;) {
        int64_t expected = 0;
        if (__atomic_compare_exchange_n(word, &expected, 1, 0, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED))
            return;
        if (++spins >= 64) {
            spins = 0;
            sched_yield();
        }
    }
}

static inline void kv_spin_unlock(int64_t *word) {
    __atomic_store_n(word, 0, __ATOMIC_RELEASE);
}

#endif
