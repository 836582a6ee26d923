// AVX2+FMA build of the same kernels, chosen at run time when the CPU has them, so the
// extension builds and runs on any x86-64 while using 256-bit vectors where available.
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <omp.h>

#include "common.h"

#if defined(__x86_64__) || defined(_M_X64)
// Every system header is included above, so only our own code gets the wider target (no
// AVX2 copies of shared inline functions can leak into the generic build via the linker).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif
#define CPO_NS avx2
#include "kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif

namespace cpo {
const Kernels kernels_avx2 = {"avx2", avx2::forward, avx2::backward, avx2::block_forward,
                              avx2::block_forward_frozen,
                              avx2::exp_f32};
}
#endif
