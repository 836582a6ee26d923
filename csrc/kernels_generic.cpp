// Portable build of the kernels (baseline ISA: SSE2 on x86-64, NEON/whatever elsewhere).
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <omp.h>

#include "common.h"

#define CPO_NS generic
#include "kernels_impl.h"

namespace cpo {
const Kernels kernels_generic = {"generic", generic::forward, generic::backward,
                                 generic::block_forward,
                                 generic::block_forward_frozen, generic::exp_f32};
}
