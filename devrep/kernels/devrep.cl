// devrep device kernels, OpenCL C 1.2. The spec is kernels/README.md; kernels/devrep.cu mirrors this file.
//
// PAGE_WORDS (8-byte words per page) is passed by the host as -DPAGE_WORDS=512 for 4 KiB pages.

#ifndef PAGE_WORDS
#define PAGE_WORDS 512
#endif

// Rotations are written as shifts rather than rotate(), and the atomic counter as a compiler builtin in the
// prebuilt PoCL bitcode (DEVREP_BITCODE, see build_pocl_bitcode.sh): PoCL does not link its builtin library
// into programs created from bitcode, so the script links only the work-item functions, and the kernels call
// nothing else. Compilers turn the shift pair into one rotate instruction.
#define ROTL(x, r) (((x) << (r)) | ((x) >> (64 - (r))))
#ifdef DEVREP_BITCODE
#define ATOMIC_INC(p) __sync_fetch_and_add((p), 1U)
#else
#define ATOMIC_INC(p) atomic_inc(p)
#endif

#define MINL(a, b) ((a) < (b) ? (a) : (b))  // not min(): no builtins in the bitcode

#define P1 11400714785074694791UL
#define P2 14029467366897019727UL
#define P3 1609587929392839161UL
#define P4 9650029242287828579UL

// XXH64's four accumulators v1..v4 are the components of a 4-wide vector, so a page is read as consecutive
// 32-byte stripes exactly as XXH64 defines it.
ulong xxh_merge(ulong h, ulong v) {
    v *= P2;
    v = ROTL(v, 31UL);
    v *= P1;
    h ^= v;
    return h * P1 + P4;
}

ulong xxh64_finish(ulong4 v) {
    ulong h = ROTL(v.s0, 1UL) + ROTL(v.s1, 7UL) + ROTL(v.s2, 12UL) + ROTL(v.s3, 18UL);
    h = xxh_merge(h, v.s0);
    h = xxh_merge(h, v.s1);
    h = xxh_merge(h, v.s2);
    h = xxh_merge(h, v.s3);
    h += (ulong)(PAGE_WORDS * 8);
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

#define XXH_INIT ((ulong4)(P1 + P2, P2, 0UL, 0UL - P1))

ulong4 xxh_round4(ulong4 acc, ulong4 lane) {
    acc += lane * P2;                      // ulong arithmetic wraps mod 2^64, as XXH64 requires
    acc = ROTL(acc, (ulong4)(31UL));
    return acc * P1;
}

// One page per work-item, its four XXH64 lanes in one vector: the host launches a work-item per page, so a
// large GPU gets n work-items to schedule instead of n / 4 (the former four-pages-per-work-item layout left
// a large device's compute units idle on small batches).
ulong xxh64_page(__global const ulong *p) {
    __global const ulong4 *s = (__global const ulong4 *)p;
    ulong4 v = XXH_INIT;
    for (int i = 0; i < PAGE_WORDS / 4; ++i) {
        v = xxh_round4(v, s[i]);
    }
    return xxh64_finish(v);
}

// CPU devices: four pages per work-item, two pages' lanes sharing one 8-wide vector and two such vectors
// advancing together, so a CPU keeps two independent multiply chains in flight on full-width registers (1.5x
// the throughput of one page per work-item on PoCL/AVX-512; the host launches hash_all4/hash_list4 there).
ulong8 xxh_round8(ulong8 acc, ulong8 lane) {
    acc += lane * P2;
    acc = ROTL(acc, (ulong8)(31UL));
    return acc * P1;
}

void xxh64_pages4(__global const ulong *p0, __global const ulong *p1, __global const ulong *p2,
                  __global const ulong *p3, ulong *h) {
    __global const ulong4 *s0 = (__global const ulong4 *)p0;
    __global const ulong4 *s1 = (__global const ulong4 *)p1;
    __global const ulong4 *s2 = (__global const ulong4 *)p2;
    __global const ulong4 *s3 = (__global const ulong4 *)p3;
    ulong8 v = (ulong8)(XXH_INIT, XXH_INIT);
    ulong8 w = (ulong8)(XXH_INIT, XXH_INIT);
    for (int i = 0; i < PAGE_WORDS / 4; ++i) {
        v = xxh_round8(v, (ulong8)(s0[i], s1[i]));
        w = xxh_round8(w, (ulong8)(s2[i], s3[i]));
    }
    h[0] = xxh64_finish(v.lo);
    h[1] = xxh64_finish(v.hi);
    h[2] = xxh64_finish(w.lo);
    h[3] = xxh64_finish(w.hi);
}

// As hash_all, but work-item j does pages 4j..4j+3 (the host launches ceil(npages / 4) work-items). Past the
// end it rehashes the last page and discards the result, so every work-item runs the same code.
__kernel void hash_all4(__global const ulong *data, __global ulong *out, const long npages) {
    long k = 4 * get_global_id(0);
    if (k >= npages) {
        return;
    }
    long last = npages - 1;
    ulong h[4];
    xxh64_pages4(data + k * PAGE_WORDS, data + MINL(k + 1, last) * PAGE_WORDS, data + MINL(k + 2, last) * PAGE_WORDS,
                 data + MINL(k + 3, last) * PAGE_WORDS, h);
    for (int j = 0; j < 4 && k + j < npages; ++j) {
        out[k + j] = h[j];
    }
}

// As hash_list, four list entries per work-item as in hash_all4.
__kernel void hash_list4(__global const ulong *data, __global const long *pages, __global ulong *out, const long n) {
    long k = 4 * get_global_id(0);
    if (k >= n) {
        return;
    }
    long last = n - 1;
    ulong h[4];
    xxh64_pages4(data + pages[k] * PAGE_WORDS, data + pages[MINL(k + 1, last)] * PAGE_WORDS,
                 data + pages[MINL(k + 2, last)] * PAGE_WORDS, data + pages[MINL(k + 3, last)] * PAGE_WORDS, h);
    for (int j = 0; j < 4 && k + j < n; ++j) {
        out[k + j] = h[j];
    }
}

// out[k] = XXH64(page k of data), k < npages; work-item k does page k (the host launches npages work-items,
// rounded up to the work-group size).
__kernel void hash_all(__global const ulong *data, __global ulong *out, const long npages) {
    long k = get_global_id(0);
    if (k < npages) {
        out[k] = xxh64_page(data + k * PAGE_WORDS);
    }
}

// out[k] = XXH64(page pages[k] of data), k < n; one list entry per work-item as in hash_all.
__kernel void hash_list(__global const ulong *data, __global const long *pages, __global ulong *out, const long n) {
    long k = get_global_id(0);
    if (k < n) {
        out[k] = xxh64_page(data + pages[k] * PAGE_WORDS);
    }
}

// Every i < n with a[i] != b[i] lands in out[0..*count) in no particular order (the host sorts).
__kernel void compare(__global const ulong *a, __global const ulong *b, __global long *out,
                      volatile __global uint *count, const long n) {
    long i = get_global_id(0);
    if (i < n && a[i] != b[i]) {
        out[ATOMIC_INC(count)] = i;
    }
}

// Scatter: packed page k of src goes to page dst_pages[k] of dst, for k < n. One work-group per page,
// its work-items striding over the page's 16-byte words so loads and stores stay contiguous.
__kernel void scatter_pages(__global const ulong2 *src, __global ulong2 *dst, __global const long *dst_pages,
                            const long n) {
    long k = get_group_id(0);
    if (k >= n) {
        return;
    }
    __global const ulong2 *from = src + k * (PAGE_WORDS / 2);
    __global ulong2 *to = dst + dst_pages[k] * (PAGE_WORDS / 2);
    for (int i = get_local_id(0); i < PAGE_WORDS / 2; i += get_local_size(0)) {
        to[i] = from[i];
    }
}

// Gather-scatter within one pair of buffers at equal offsets: page pages[k] of src goes to page pages[k] of
// dst (zero-copy path: src is the host region itself, wrapped as a buffer on a host-unified device).
__kernel void copy_pages(__global const ulong2 *src, __global ulong2 *dst, __global const long *pages,
                         const long n) {
    long k = get_group_id(0);
    if (k >= n) {
        return;
    }
    long base = pages[k] * (PAGE_WORDS / 2);
    for (int i = get_local_id(0); i < PAGE_WORDS / 2; i += get_local_size(0)) {
        dst[base + i] = src[base + i];
    }
}
