// AVX-512 build (F, BW, DQ, VL) of the same kernels with 16-float vectors (CPO_VW = 16), chosen
// at run time when the CPU and the OS (zmm state enabled) support it; see kernels_avx2.cpp.
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <omp.h>

#include "common.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>  // streaming stores (the intrinsics carry their own target attributes)
#define CPO_NT_STORES 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#endif
#define CPO_NS avx512
#define CPO_VW 16
#include "kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif

namespace cpo {
const Kernels kernels_avx512 = {"avx512", avx512::forward, avx512::backward,
                                avx512::block_forward, avx512::block_forward_frozen,
                                avx512::exp_f32};
}
#endif
