// See buffer_pool.h. POSIX mmap; on Linux also MADV_HUGEPAGE (a hint: with transparent huge
// pages off it changes nothing but the alignment).
#include "buffer_pool.h"

#include <sys/mman.h>

#include <cstdint>
#include <deque>
#include <mutex>
#include <new>

namespace cpo {
namespace {

constexpr size_t kHuge = size_t(1) << 21;

std::mutex g_mu;
std::deque<Region> g_cache;  // most recently released first
size_t g_limit = 2;
size_t g_hits = 0, g_misses = 0;

Region map_region(size_t bytes) {
  const size_t size = (bytes + kHuge - 1) & ~(kHuge - 1);
  // Over-map by 2 MiB and cut the unaligned ends off, so the region is huge-page aligned.
  void* raw = mmap(nullptr, size + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t lo = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t start = (lo + kHuge - 1) & ~(uintptr_t(kHuge) - 1);
  if (start > lo) munmap(raw, start - lo);
  const uintptr_t end = lo + size + kHuge;
  if (end > start + size) munmap(reinterpret_cast<void*>(start + size), end - start - size);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(reinterpret_cast<void*>(start), size, MADV_HUGEPAGE);
#endif
  return Region{reinterpret_cast<void*>(start), size};
}

}  // namespace

Region pool_acquire(size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto best = g_cache.end();
    for (auto it = g_cache.begin(); it != g_cache.end(); ++it)
      if (it->bytes >= bytes && it->bytes / 2 <= bytes &&
          (best == g_cache.end() || it->bytes < best->bytes))
        best = it;
    if (best != g_cache.end()) {
      const Region r = *best;
      g_cache.erase(best);
      ++g_hits;
      return r;
    }
    ++g_misses;
  }
  return map_region(bytes);
}

void pool_release(Region r) {
  if (!r.ptr) return;
  std::deque<Region> drop;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    g_cache.push_front(r);
    while (g_cache.size() > g_limit) {
      drop.push_back(g_cache.back());
      g_cache.pop_back();
    }
  }
  for (const Region& d : drop) munmap(d.ptr, d.bytes);
}

void pool_set_limit(size_t regions) {
  std::deque<Region> drop;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    g_limit = regions;
    while (g_cache.size() > g_limit) {
      drop.push_back(g_cache.back());
      g_cache.pop_back();
    }
  }
  for (const Region& d : drop) munmap(d.ptr, d.bytes);
}

size_t pool_trim() {
  std::deque<Region> drop;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    drop.swap(g_cache);
  }
  size_t n = 0;
  for (const Region& d : drop) {
    munmap(d.ptr, d.bytes);
    n += d.bytes;
  }
  return n;
}

PoolStats pool_stats() {
  std::lock_guard<std::mutex> lock(g_mu);
  size_t b = 0;
  for (const Region& r : g_cache) b += r.bytes;
  return PoolStats{g_cache.size(), b, g_hits, g_misses};
}

}  // namespace cpo
