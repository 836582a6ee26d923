// pybind11 front of the CPU kernels (cpo_fast._C). Tensors cross as raw addresses, shapes,
// element strides and dtype codes, so nothing here links against libtorch. The Python side
// (cpo_fast/_cpu.py) validates dtypes, shapes and contiguity before calling in.
#include <pybind11/pybind11.h>

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common.h"

namespace py = pybind11;
using namespace cpo;

namespace {

const Kernels* pick_best() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &kernels_avx2;
#endif
  return &kernels_generic;
}

const Kernels* g_kernels = nullptr;

const Kernels& K() {
  if (!g_kernels) {
    const char* env = std::getenv("CPO_FAST_CPU_ISA");
    g_kernels = (env && std::strcmp(env, "generic") == 0) ? &kernels_generic : pick_best();
  }
  return *g_kernels;
}

void set_isa(const std::string& name) {
  if (name == "generic") {
    g_kernels = &kernels_generic;
  } else if (name == "best") {
    g_kernels = pick_best();
  } else {
    throw std::invalid_argument("set_isa: name must be 'generic' or 'best', got '" + name + "'");
  }
}

void check_dtype(int dt) {
  if (dt != kF32 && dt != kBF16 && dt != kF16)
    throw std::invalid_argument("dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16)");
}

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

View3 view(uintptr_t p, int dt, int64_t B, int64_t T, int64_t V, int64_t sb, int64_t st,
           int64_t sv) {
  check_dtype(dt);
  if (B < 0 || T < 0 || V < 1) throw std::invalid_argument("shape must be [B>=0, T>=0, V>=1]");
  return View3{ptr<void>(p), dt, B, T, V, sb, st, sv};
}

int threads(int n) { return n < 1 ? 1 : n; }

// A fresh gradient buffer is first touched by the backward kernel, and on virtual machines
// the 4 KiB page faults of that first touch can cost more than the kernel itself (about
// 2 ns per float32 element measured on the 2-core CI VM). Asking for transparent huge pages
// on the 2 MiB-aligned interior of the output (Linux, THP in "madvise" or "always" mode)
// makes those faults 512x fewer. It is only a hint: pages already present are unaffected,
// and nothing changes where THP is off or unsupported.
void advise_hugepages(const View3& o) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t es = o.dtype == kF32 ? 4 : 2;
  const int64_t extent = ((o.B - 1) * o.sb + (o.T - 1) * o.st + (o.V - 1) * o.sv + 1) * es;
  const uintptr_t huge = uintptr_t(1) << 21;
  if (o.B <= 0 || o.T <= 0 || extent < int64_t(4 * huge)) return;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(o.ptr) + huge - 1) & ~(huge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(o.ptr) + uintptr_t(extent)) & ~(huge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)o;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cpo_fast C++ CPU core (OpenMP + SIMD); see cpo_fast/_cpu.py for the contract.";

  m.def("isa", [] { return std::string(K().name); }, "Name of the kernel build in use.");
  m.def("set_isa", &set_isa, py::arg("name"),
        "'generic' forces the baseline build, 'best' the fastest the CPU supports.");

  m.def(
      "token_logprobs_forward",
      [](uintptr_t x, int dt, int64_t B, int64_t T, int64_t V, int64_t sb, int64_t st,
         int64_t sv, uintptr_t labels, int64_t ignore_index, uintptr_t logp, uintptr_t ent,
         uintptr_t lse, int nthreads) {
        FwdArgs a{view(x, dt, B, T, V, sb, st, sv), ptr<const int64_t>(labels), ignore_index,
                  ptr<float>(logp), ent ? ptr<float>(ent) : nullptr, ptr<float>(lse),
                  threads(nthreads)};
        py::gil_scoped_release nogil;
        K().forward(a);
      },
      "Forward over a [B,T,V] view; ent = 0 for no entropy.");

  m.def(
      "token_logprobs_backward",
      [](uintptr_t x, int dt, int64_t B, int64_t T, int64_t V, int64_t sb, int64_t st,
         int64_t sv, uintptr_t out, int64_t osb, int64_t ost, int64_t osv, uintptr_t labels,
         int64_t label_offset, int64_t ignore_index, uintptr_t lse, uintptr_t ent,
         uintptr_t grad_logp, uintptr_t grad_ent, int nthreads) {
        BwdArgs a{view(x, dt, B, T, V, sb, st, sv), view(out, dt, B, T, V, osb, ost, osv),
                  ptr<const int64_t>(labels), label_offset, ignore_index, ptr<const float>(lse),
                  ent ? ptr<const float>(ent) : nullptr, ptr<const float>(grad_logp),
                  grad_ent ? ptr<const float>(grad_ent) : nullptr, threads(nthreads)};
        if (a.grad_entropy && !a.entropy)
          throw std::invalid_argument("grad_entropy given without the saved entropy");
        py::gil_scoped_release nogil;
        if (out != x) advise_hugepages(a.out);
        K().backward(a);
      },
      "Backward into out (may alias x); grad_ent = 0 when the entropy has no gradient.");

  m.def(
      "block_forward",
      [](uintptr_t buf, int64_t rows, int64_t cols, int64_t ld, int64_t col0, uintptr_t labels,
         int64_t ignore_index, bool with_entropy, uintptr_t m, uintptr_t s, uintptr_t a,
         uintptr_t zy, int nthreads) {
        if (rows < 0 || cols < 1 || ld < cols)
          throw std::invalid_argument("block_forward: need rows >= 0, cols >= 1, ld >= cols");
        BlockFwdArgs args{ptr<const float>(buf), rows, cols, ld, col0,
                          ptr<const int64_t>(labels), ignore_index, with_entropy, ptr<float>(m),
                          ptr<float>(s), ptr<float>(a), ptr<float>(zy), threads(nthreads)};
        py::gil_scoped_release nogil;
        K().block_forward(args);
      },
      "Merge an fp32 [rows, cols] block (row stride ld, first column col0) into running "
      "per-row (max, sum, entropy accumulator, label logit).");

  m.def(
      "block_forward_frozen",
      [](uintptr_t buf, int64_t rows, int64_t cols, int64_t ld, int64_t col0, uintptr_t labels,
         int64_t ignore_index, bool with_entropy, uintptr_t m, uintptr_t s, uintptr_t a,
         uintptr_t zy, uintptr_t alpha, uintptr_t dm, uintptr_t ed, int64_t ld_ed,
         int nthreads) {
        if (rows < 0 || cols < 1 || ld < cols)
          throw std::invalid_argument(
              "block_forward_frozen: need rows >= 0, cols >= 1, ld >= cols");
        if (with_entropy && (!ed || ld_ed < cols))
          throw std::invalid_argument(
              "block_forward_frozen: with_entropy needs an ed buffer with ld_ed >= cols");
        BlockFwdArgs base{ptr<const float>(buf), rows, cols, ld, col0,
                          ptr<const int64_t>(labels), ignore_index, with_entropy, ptr<float>(m),
                          ptr<float>(s), ptr<float>(a), ptr<float>(zy), threads(nthreads)};
        BlockFwdFrozenArgs args{base, ptr<float>(buf), with_entropy ? ptr<float>(ed) : nullptr,
                                ld_ed, ptr<float>(alpha), ptr<float>(dm)};
        py::gil_scoped_release nogil;
        K().block_forward_frozen(args);
      },
      "block_forward, and the fp32 block is overwritten with e = exp(z - m_new) (ed gets "
      "e (z - m_new) with entropy); alpha = exp(m_old - m_new), dm = m_old - m_new per row.");

  m.def(
      "exp_f32",
      [](uintptr_t x, uintptr_t y, int64_t n, bool kernel) {
        py::gil_scoped_release nogil;
        K().exp_f32(ptr<const float>(x), ptr<float>(y), n, kernel);
      },
      py::arg("x"), py::arg("y"), py::arg("n"), py::arg("kernel") = false,
      "The vectorized exp over n contiguous float32 (exposed for the accuracy test); "
      "kernel=True: the kernels' variant, inputs clamped to [-88, 0], flush below 2^-126.");
}
