// Large, reusable, huge-page-backed buffers for the gradients the CPU ops hand back (N x V
// logits gradients). A fresh buffer from the system allocator is mapped anew on every step,
// and first-touching its pages (the kernel zeroes each) cost about as much as the whole
// backward kernel on the 2-core VMs (docs/benchmarks.md). Regions here are 2 MiB aligned,
// advised MADV_HUGEPAGE, and a released region is kept mapped (up to a limit) for the next
// request of a similar size, so a training loop faults its gradient buffer in once.
#pragma once
#include <cstddef>

namespace cpo {

struct Region {
  void* ptr = nullptr;
  size_t bytes = 0;  // mapped size (a multiple of 2 MiB)
};

struct PoolStats {
  size_t cached_regions, cached_bytes, hits, misses;
};

// A region of at least `bytes` bytes: a cached one of at most twice the size if any, else a
// new mapping. Throws std::bad_alloc when the system has no memory.
Region pool_acquire(size_t bytes);
// Give a region back: cached (most recent first) while fewer than the limit are cached, else
// unmapped. Thread-safe.
void pool_release(Region r);
// Keep at most `regions` released regions mapped (0: unmap every region on release).
void pool_set_limit(size_t regions);
// Unmap every cached region; returns the bytes given back to the system.
size_t pool_trim();
PoolStats pool_stats();

}  // namespace cpo
