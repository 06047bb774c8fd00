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

#define FULL_MASK 0xffffffffu
#define PAGES_PER_WARP 8  // 4 lanes per page (one per XXH64 accumulator) x 8 pages = 32 lanes

// XXH64, seed 0, of one page, computed by a quad of lanes (lane j = 0..3 of the quad keeps accumulator v{j+1}).
// Stripe s of the page is words 4s..4s+3 and lane j consumes word 4s+j, so the quad reads each stripe as one
// 32-byte sector and a warp load touches 8 whole sectors (coalesced: every byte fetched is used), where one
// thread per page read 8-16 bytes of a different page per lane. The four accumulator chains are sequential by
// definition of XXH64; running them on four lanes is the parallelism a page has. Every lane returns the hash.
// All 32 lanes of the warp must call this together (the shuffles take the full mask).
__device__ __forceinline__ u64 xxh64_quad(const u64 *__restrict__ page, int j) {
    u64 v = j == 0 ? P1 + P2 : j == 1 ? P2 : j == 2 ? 0ULL : 0ULL - P1;
#pragma unroll 8
    for (int s = 0; s < PAGE_WORDS / 4; ++s) {
        v = xxh_round(v, page[4 * s + j]);
    }
    u64 v1 = __shfl_sync(FULL_MASK, v, 0, 4);  // width 4: lane 0..3 of this quad
    u64 v2 = __shfl_sync(FULL_MASK, v, 1, 4);
    u64 v3 = __shfl_sync(FULL_MASK, v, 2, 4);
    u64 v4 = __shfl_sync(FULL_MASK, v, 3, 4);
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

// Hash launches: blockDim.x a multiple of 32; any grid (each warp takes PAGES_PER_WARP pages per pass and
// grid-strides over the rest, so a grid sized from the SM count covers any page count). The loop condition is
// the same for the whole warp, so all its lanes reach every shuffle.
#define WARP_PAGES_LOOP(npages)                                                                  \
    const int lane = threadIdx.x & 31, quad_lane = lane & 3;                                    \
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;                         \
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;                                       \
    for (i64 first = warp * PAGES_PER_WARP; first < (npages); first += warps * PAGES_PER_WARP)

// out[k] = XXH64(page k of data), k < npages.
extern "C" __global__ void hash_all(const u64 *__restrict__ data, u64 *__restrict__ out, i64 npages) {
    WARP_PAGES_LOOP(npages) {
        const i64 k = first + (lane >> 2);
        const bool live = k < npages;  // a partial last group hashes its first page again, and drops it
        const u64 h = xxh64_quad(data + (live ? k : first) * PAGE_WORDS, quad_lane);
        if (live && quad_lane == 0) {
            out[k] = h;
        }
    }
}

// out[k] = XXH64(page pages[k] of data), k < n.
extern "C" __global__ void hash_list(const u64 *__restrict__ data, const i64 *__restrict__ pages,
                                     u64 *__restrict__ out, i64 n) {
    WARP_PAGES_LOOP(n) {
        const i64 k = first + (lane >> 2);
        const bool live = k < n;
        const u64 h = xxh64_quad(data + pages[live ? k : first] * PAGE_WORDS, quad_lane);
        if (live && quad_lane == 0) {
            out[k] = h;
        }
    }
}

// Every i < n with a[i] != b[i] lands in out[0..*count) in no particular order (the host sorts). Grid-stride.
extern "C" __global__ void compare(const u64 *__restrict__ a, const u64 *__restrict__ b, i64 *__restrict__ out,
                                   unsigned int *count, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        if (a[i] != b[i]) {
            out[atomicAdd(count, 1U)] = i;
        }
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
