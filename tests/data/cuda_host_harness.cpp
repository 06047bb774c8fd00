// Runs the kernels of kernels/devrep.cu on the CPU, one emulated thread at a time, so their arithmetic and
// indexing are checked bit-for-bit on machines without a GPU (tests/test_kernels_build.py). The shims below
// stand in for the CUDA built-ins the kernels use; nothing else of the kernel source is changed.
//
// usage: harness DATA NPAGES OUT   (DATA: NPAGES pages; OUT gets hash_all, hash_list, compare, scatter results)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
struct ulonglong2 { unsigned long long x, y; };
struct uint3_ { unsigned x, y, z; };
static uint3_ blockIdx, threadIdx, blockDim, gridDim;
static unsigned atomicAdd(unsigned *p, unsigned v) { unsigned old = *p; *p += v; return old; }

#include "devrep.cu"

template <typename F> static void launch(unsigned grid, unsigned block, F f) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; ++b)
        for (unsigned t = 0; t < block; ++t) {
            blockIdx = {b, 0, 0};
            threadIdx = {t, 0, 0};
            f();
        }
}

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    long long n = atoll(argv[2]);
    std::vector<u64> data(n * PAGE_WORDS);
    FILE *in = fopen(argv[1], "rb");
    if (!in || fread(data.data(), 8, data.size(), in) != data.size()) return 3;
    fclose(in);
    FILE *out = fopen(argv[3], "wb");
    // hash_all over every page, 128 threads a block (as the backend launches it)
    std::vector<u64> h(n);
    launch((n + 127) / 128, 128, [&] { hash_all(data.data(), h.data(), n); });
    fwrite(h.data(), 8, n, out);
    // hash_list over the pages in reverse order
    std::vector<i64> pages(n);
    for (long long k = 0; k < n; ++k) pages[k] = n - 1 - k;
    std::vector<u64> hl(n);
    launch((n + 127) / 128, 128, [&] { hash_list(data.data(), pages.data(), hl.data(), n); });
    fwrite(hl.data(), 8, n, out);
    // compare: h against h with every third entry changed
    std::vector<u64> other(h);
    for (long long k = 0; k < n; k += 3) other[k] ^= 1;
    std::vector<i64> diff(n);
    unsigned count = 0;
    launch((n + 127) / 128, 128, [&] { compare(h.data(), other.data(), diff.data(), &count, n); });
    long long c = count;
    fwrite(&c, 8, 1, out);
    fwrite(diff.data(), 8, count, out);
    // scatter the packed pages into reverse order, then copy_pages every other page back into a zero buffer;
    // 3 blocks of 32 threads, so the grid-stride loops run too
    std::vector<u64> scattered(data.size()), copied(data.size());
    launch(3, 32, [&] { scatter_pages((const ulonglong2 *)data.data(), (ulonglong2 *)scattered.data(), pages.data(), n); });
    std::vector<i64> evens;
    for (long long k = 0; k < n; k += 2) evens.push_back(k);
    launch(3, 32, [&] { copy_pages((const ulonglong2 *)data.data(), (ulonglong2 *)copied.data(), evens.data(),
                                   (i64)evens.size()); });
    fwrite(scattered.data(), 8, scattered.size(), out);
    fwrite(copied.data(), 8, copied.size(), out);
    fclose(out);
    return 0;
}
