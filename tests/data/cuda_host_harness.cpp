// Runs the kernels of kernels/devrep.cu on the CPU so their arithmetic and indexing are checked bit-for-bit on
// machines without a GPU (tests/test_kernels_build.py). The shims below stand in for the CUDA built-ins the
// kernels use; nothing else of the kernel source is changed. Thread-independent kernels run one emulated thread
// at a time; the warp kernels (hash_all, hash_list: __shfl_sync) run each warp as 32 host threads in lockstep,
// a barrier on each side of every shuffle, as a GPU warp executes them.
//
// usage: harness DATA NPAGES OUT   (DATA: NPAGES pages; OUT gets hash_all, hash_list, compare, scatter results)
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
struct ulonglong2 { unsigned long long x, y; };
struct uint3_ { unsigned x, y, z; };
static thread_local uint3_ blockIdx, threadIdx;
static uint3_ blockDim, gridDim;
static unsigned atomicAdd(unsigned *p, unsigned v) { unsigned old = *p; *p += v; return old; }

struct Warp {
    std::barrier<> bar{32};
    unsigned long long slot[32];
    unsigned masks[32];
};
static thread_local Warp *warp_of_this_thread = nullptr;
static int shuffles_checked = 0;  // shuffles whose mask and width were checked (reported on stderr)

// __shfl_sync(mask, v, src, width): every lane publishes v, then reads lane (own segment base + src % width).
// Checks what CUDA requires: all 32 lanes named in the mask take part (the kernels use the full mask).
static unsigned long long __shfl_sync(unsigned mask, unsigned long long v, int src, int width = 32) {
    Warp *w = warp_of_this_thread;
    if (w == nullptr) { fprintf(stderr, "__shfl_sync outside a warp launch\n"); std::abort(); }
    const int lane = threadIdx.x & 31;
    w->slot[lane] = v;
    w->masks[lane] = mask;
    w->bar.arrive_and_wait();
    for (int l = 0; l < 32; ++l)
        if (w->masks[l] != 0xffffffffu || mask != 0xffffffffu) { fprintf(stderr, "partial shuffle mask\n"); std::abort(); }
    const unsigned long long got = w->slot[(lane & ~(width - 1)) + (src & (width - 1))];
    w->bar.arrive_and_wait();
    if (lane == 0) ++shuffles_checked;
    return got;
}

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

// Each warp of each block as 32 host threads (block must be a multiple of 32, as the backend launches it).
template <typename F> static void launch_warps(unsigned grid, unsigned block, F f) {
    if (block % 32) { fprintf(stderr, "block %u is not a multiple of 32\n", block); std::abort(); }
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; ++b)
        for (unsigned w0 = 0; w0 < block; w0 += 32) {
            Warp warp;
            std::vector<std::thread> lanes;
            for (unsigned l = 0; l < 32; ++l)
                lanes.emplace_back([&, l] {
                    blockIdx = {b, 0, 0};
                    threadIdx = {w0 + l, 0, 0};
                    warp_of_this_thread = &warp;
                    f();
                });
            for (auto &t : lanes) t.join();
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
    // hash_all over every page: 2 blocks of 64 threads (4 warps x 8 pages per pass), so the grid-stride loop
    // and a partial last group of 8 run; then the geometry the backend and run_gpu.sh use must agree with it
    std::vector<u64> h(n), h2(n);
    launch_warps(2, 64, [&] { hash_all(data.data(), h.data(), n); });
    launch_warps((n + 255) / 256, 256, [&] { hash_all(data.data(), h2.data(), n); });
    if (h != h2) { fprintf(stderr, "hash_all differs between launch geometries\n"); return 4; }
    fwrite(h.data(), 8, n, out);
    // hash_list over the pages in reverse order
    std::vector<i64> pages(n);
    for (long long k = 0; k < n; ++k) pages[k] = n - 1 - k;
    std::vector<u64> hl(n);
    launch_warps(3, 32, [&] { hash_list(data.data(), pages.data(), hl.data(), n); });
    fwrite(hl.data(), 8, n, out);
    fprintf(stderr, "warp shuffles checked: %d\n", shuffles_checked);
    // compare: h against h with every third entry changed
    std::vector<u64> other(h);
    for (long long k = 0; k < n; k += 3) other[k] ^= 1;
    std::vector<i64> diff(n);
    unsigned count = 0;
    launch(2, 32, [&] { compare(h.data(), other.data(), diff.data(), &count, n); });  // grid-stride
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
