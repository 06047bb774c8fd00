// devrep device kernels, CUDA C++ (NVRTC via cupy.RawModule; nvcc in CI). Mirrors kernels/devrep.cl; the
// spec is kernels/README.md. No #include: NVRTC compiles this without the CUDA headers.
//
// PAGE_WORDS (8-byte words per page) is passed by the host as -DPAGE_WORDS=512 for 4 KiB pages.

#ifndef PAGE_WORDS
#define PAGE_WORDS 512
#endif

typedef unsigned long long u64;
typedef long long i64;

#define P1 11400714785074694791ULL
#define P2 14029467366897019727ULL
#define P3 1609587929392839161ULL
#define P4 9650029242287828579ULL

__device__ __forceinline__ u64 rotl64(u64 x, int r) { return (x << r) | (x >> (64 - r)); }

__device__ __forceinline__ u64 xxh_round(u64 acc, u64 lane) {
    acc += lane * P2;  // unsigned arithmetic wraps mod 2^64, as XXH64 requires
    acc = rotl64(acc, 31);
    return acc * P1;
}

__device__ __forceinline__ u64 xxh_merge(u64 h, u64 v) {
    h ^= xxh_round(0, v);
    return h * P1 + P4;
}

// XXH64, seed 0, of one page: the four lanes v1..v4 read consecutive 32-byte stripes.
__device__ u64 xxh64_page(const u64 *__restrict__ page) {
    u64 v1 = P1 + P2, v2 = P2, v3 = 0, v4 = 0ULL - P1;
    const ulonglong2 *s = reinterpret_cast<const ulonglong2 *>(page);
#pragma unroll 4
    for (int i = 0; i < PAGE_WORDS / 2; i += 2) {
        ulonglong2 a = s[i];
        ulonglong2 b = s[i + 1];
        v1 = xxh_round(v1, a.x);
        v2 = xxh_round(v2, a.y);
        v3 = xxh_round(v3, b.x);
        v4 = xxh_round(v4, b.y);
    }
    u64 h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
    h = xxh_merge(h, v1);
    h = xxh_merge(h, v2);
    h = xxh_merge(h, v3);
    h = xxh_merge(h, v4);
    h += (u64)(PAGE_WORDS * 8);
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

// out[k] = XXH64(page k of data), k < npages.
extern "C" __global__ void hash_all(const u64 *__restrict__ data, u64 *__restrict__ out, i64 npages) {
    i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (k < npages) {
        out[k] = xxh64_page(data + k * PAGE_WORDS);
    }
}

// out[k] = XXH64(page pages[k] of data), k < n.
extern "C" __global__ void hash_list(const u64 *__restrict__ data, const i64 *__restrict__ pages,
                                     u64 *__restrict__ out, i64 n) {
    i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (k < n) {
        out[k] = xxh64_page(data + pages[k] * PAGE_WORDS);
    }
}

// Every i < n with a[i] != b[i] lands in out[0..*count) in no particular order (the host sorts).
extern "C" __global__ void compare(const u64 *__restrict__ a, const u64 *__restrict__ b, i64 *__restrict__ out,
                                   unsigned int *count, i64 n) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && a[i] != b[i]) {
        out[atomicAdd(count, 1U)] = i;
    }
}

// Scatter: packed page k of src goes to page dst_pages[k] of dst, k < n. One block per page (grid-stride
// over pages when the grid is smaller), its threads striding over the page's 16-byte words.
extern "C" __global__ void scatter_pages(const ulonglong2 *__restrict__ src, ulonglong2 *__restrict__ dst,
                                         const i64 *__restrict__ dst_pages, i64 n) {
    for (i64 k = blockIdx.x; k < n; k += gridDim.x) {
        const ulonglong2 *from = src + k * (PAGE_WORDS / 2);
        ulonglong2 *to = dst + dst_pages[k] * (PAGE_WORDS / 2);
        for (int i = threadIdx.x; i < PAGE_WORDS / 2; i += blockDim.x) {
            to[i] = from[i];
        }
    }
}

// Page pages[k] of src goes to page pages[k] of dst (fan-out between two replicas on one device).
extern "C" __global__ void copy_pages(const ulonglong2 *__restrict__ src, ulonglong2 *__restrict__ dst,
                                      const i64 *__restrict__ pages, i64 n) {
    for (i64 k = blockIdx.x; k < n; k += gridDim.x) {
        i64 base = pages[k] * (PAGE_WORDS / 2);
        for (int i = threadIdx.x; i < PAGE_WORDS / 2; i += blockDim.x) {
            dst[base + i] = src[base + i];
        }
    }
}
