/* MurmurHash3 x64-128, first 64 bits: the ring's hash, computed natively.
 *
 * Why a hand-written copy instead of calling the `mmh3` module: a pick hashes one key, and a
 * Python-level call plus a bytes object would cost more than the whole bisect. The algorithm
 * (Austin Appleby's MurmurHash3, public domain) is small; this is our own rendering of it, and
 * tests/test_ring_twins.py checks it against `mmh3.hash64(..., signed=False)[0]`.
 *
 * Blocks are read little-endian whatever the host, so two gateway replicas on different CPUs
 * still place every vnode at the same point of the ring.
 */
#ifndef KVGATE_MURMUR3_H
#define KVGATE_MURMUR3_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define KV_MM3_C1 0x87c37b91114253d5ULL
#define KV_MM3_C2 0x4cf5ad432745937fULL

static inline uint64_t kv_rotl64(uint64_t x, int r) {
    return (x << r) | (x >> (64 - r));
}

static inline uint64_t kv_load64le(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, sizeof v); /* unaligned-safe; one mov on x86/arm64 */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint64_t kv_fmix64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

static inline uint64_t kv_mix_k1(uint64_t k1) {
    k1 *= KV_MM3_C1;
    k1 = kv_rotl64(k1, 31);
    return k1 * KV_MM3_C2;
}

static inline uint64_t kv_mix_k2(uint64_t k2) {
    k2 *= KV_MM3_C2;
    k2 = kv_rotl64(k2, 33);
    return k2 * KV_MM3_C1;
}

/* h1 of MurmurHash3_x64_128(data, len, seed): what mmh3.hash64(...)[0] returns unsigned. */
static inline uint64_t kv_murmur3_64(const void *data, size_t len, uint64_t seed) {
    const unsigned char *p = (const unsigned char *)data;
    const size_t n_blocks = len / 16;
    uint64_t h1 = seed, h2 = seed;
    size_t b;

    for (b = 0; b < n_blocks; b++, p += 16) {
        h1 ^= kv_mix_k1(kv_load64le(p));
        h1 = kv_rotl64(h1, 27);
        h1 += h2;
        h1 = h1 * 5 + 0x52dce729;

        h2 ^= kv_mix_k2(kv_load64le(p + 8));
        h2 = kv_rotl64(h2, 31);
        h2 += h1;
        h2 = h2 * 5 + 0x38495ab5;
    }

    /* The tail, zero-padded to a block: XOR-ing bytes into zero words is the same as the
     * reference's byte-by-byte switch, and the padding never reaches the mix. */
    {
        const size_t rest = len & 15;
        unsigned char tail[16] = {0};
        memcpy(tail, p, rest);
        if (rest > 8) h2 ^= kv_mix_k2(kv_load64le(tail + 8));
        if (rest > 0) h1 ^= kv_mix_k1(kv_load64le(tail));
    }

    h1 ^= (uint64_t)len;
    h2 ^= (uint64_t)len;
    h1 += h2;
    h2 += h1;
    h1 = kv_fmix64(h1);
    h2 = kv_fmix64(h2);
    h1 += h2;
    return h1;
}

#endif /* KVGATE_MURMUR3_H */
