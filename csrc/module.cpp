// pybind11 front of the CPU kernels (cpo_fast._C). Tensors cross as raw addresses, shapes,
// element strides and a DType (an enum exposed to Python as cpo_fast._C.DType), so nothing
// here links against libtorch. Every function takes named arguments (py::arg) and the
// Python side (cpo_fast/cpu/*.py) calls them by keyword, after validating dtypes, shapes
// and contiguity. Per-row arrays (labels, lse, entropy, gradients, running statistics)
// are passed as the address of row 0 plus a row_offset in rows, never a byte offset.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sys/mman.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "buffer_pool.h"
#include "common.h"

namespace py = pybind11;
using namespace cpo;

namespace {

// The builds this CPU can run, best first. __builtin_cpu_supports also checks that the OS
// saves the wider registers (XGETBV), so a listed build never faults.
std::vector<const Kernels*> usable() {
  std::vector<const Kernels*> out;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    out.push_back(&kernels_avx512);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.push_back(&kernels_avx2);
#endif
  out.push_back(&kernels_generic);
  return out;
}

// "best" or a build's name; an unknown name or one this CPU cannot run is an error.
const Kernels* find_isa(const std::string& name, const char* origin) {
  const std::vector<const Kernels*> ks = usable();
  if (name == "best") return ks.front();
  std::string names;
  for (const Kernels* k : ks) {
    if (name == k->name) return k;
    names += std::string(names.empty() ? "" : ", ") + "'" + k->name + "'";
  }
  throw std::invalid_argument(std::string(origin) + ": '" + name +
                              "' is not a kernel build this CPU can run; use 'best' or one of " +
                              names);
}

const Kernels* g_kernels = nullptr;

const Kernels& K() {
  if (!g_kernels) {
    // CPO_FAST_CPU_ISA = best | avx512 | avx2 | generic forces a build (tests, comparisons).
    const char* env = std::getenv("CPO_FAST_CPU_ISA");
    g_kernels = find_isa(env && *env ? env : "best", "CPO_FAST_CPU_ISA");
  }
  return *g_kernels;
}

void set_isa(const std::string& name) { g_kernels = find_isa(name, "set_isa(name)"); }

void check_dtype(DType dt) {
  if (dt != kF32 && dt != kBF16 && dt != kF16)
    throw std::invalid_argument("dtype must be DType.float32, DType.bfloat16 or DType.float16");
}

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// Row r0 of a per-row array of T starting at address p (nullptr stays nullptr).
template <class T>
T* row(uintptr_t p, int64_t r0) {
  return p ? reinterpret_cast<T*>(p) + r0 : nullptr;
}

void check_row_offset(int64_t r0) {
  if (r0 < 0) throw std::invalid_argument("row_offset must be >= 0");
}

View3 view(uintptr_t p, DType dt, int64_t B, int64_t T, int64_t V, int64_t sb, int64_t st,
           int64_t sv) {
  check_dtype(dt);
  if (B < 0 || T < 0 || V < 1) throw std::invalid_argument("shape must be [B>=0, T>=0, V>=1]");
  return View3{ptr<void>(p), dt, B, T, V, sb, st, sv};
}

int threads(int n) { return n < 1 ? 1 : n; }

// The kernels' head transform (common.h HeadTf) from pre = logit_scale, post = 1 / temperature
// and softcap (0 = none): z' = (softcap tanh(pre z / softcap) if softcap else pre z) post.
// Products are formed in double and rounded once; a scale of exactly 1 is the identity.
HeadTf head_tf(double pre, double post, double softcap) {
  if (!std::isfinite(pre) || !std::isfinite(post) || !std::isfinite(softcap) || softcap < 0)
    throw std::invalid_argument("pre and post must be finite and softcap finite and >= 0");
  HeadTf h;
  h.g = float(pre * post);
  if (softcap > 0) {
    h.kind = 2;
    h.a = float(pre / softcap);
    h.c = float(softcap * post);
  } else if (h.g != 1.f) {
    h.kind = 1;
  }
  return h;
}

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

// A pooled region exposed through the buffer protocol (torch.frombuffer wraps it without a
// copy and keeps this object alive as long as any view of it): when the last view dies, the
// region goes back to the pool instead of to the system.
struct PoolBuffer {
  Region r;
  size_t nbytes;
  explicit PoolBuffer(size_t n) : r(pool_acquire(n)), nbytes(n) {}
  PoolBuffer(const PoolBuffer&) = delete;
  PoolBuffer& operator=(const PoolBuffer&) = delete;
  ~PoolBuffer() { pool_release(r); }
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cpo_fast C++ CPU core (OpenMP + SIMD); see cpo_fast/cpu/ for the contract.";

  py::enum_<DType>(m, "DType", "Element type of a logits / gradient buffer.")
      .value("float32", kF32)
      .value("bfloat16", kBF16)
      .value("float16", kF16);

  m.def("isa", [] { return std::string(K().name); }, "Name of the kernel build in use.");
  m.def("set_isa", &set_isa, py::arg("name"),
        "Force a kernel build: 'best' (the fastest this CPU supports), 'avx512', 'avx2' or "
        "'generic'; one the CPU cannot run raises ValueError.");
  m.def(
      "isas",
      [] {
        std::vector<std::string> names;
        for (const Kernels* k : usable()) names.push_back(k->name);
        return names;
      },
      "The kernel builds this CPU can run, best first.");

  m.def(
      "token_logprobs_forward",
      [](uintptr_t logits, DType dtype, int64_t B, int64_t T, int64_t V, int64_t stride_b,
         int64_t stride_t, int64_t stride_v, uintptr_t labels, int64_t ignore_index,
         uintptr_t logp, uintptr_t entropy, uintptr_t lse, int nthreads, double pre,
         double post, double softcap) {
        FwdArgs a{view(logits, dtype, B, T, V, stride_b, stride_t, stride_v),
                  ptr<const int64_t>(labels), ignore_index, ptr<float>(logp),
                  entropy ? ptr<float>(entropy) : nullptr, ptr<float>(lse), threads(nthreads),
                  head_tf(pre, post, softcap)};
        py::gil_scoped_release nogil;
        K().forward(a);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"),
      py::arg("stride_b"), py::arg("stride_t"), py::arg("stride_v"), py::arg("labels"),
      py::arg("ignore_index"), py::arg("logp"), py::arg("entropy"), py::arg("lse"),
      py::arg("nthreads"), py::arg("pre") = 1.0, py::arg("post") = 1.0,
      py::arg("softcap") = 0.0,
      "Forward over a [B,T,V] view (element strides); entropy = 0 for no entropy. "
      "labels, logp, entropy, lse: [B*T] (int64 / float32). Head transform, per element in "
      "float32: z' = (softcap tanh(pre z / softcap) if softcap else pre z) post (pre = "
      "logit_scale, post = 1 / temperature, softcap = 0: none; the defaults: identity).");

  m.def(
      "token_logprobs_backward",
      [](uintptr_t logits, DType dtype, int64_t B, int64_t T, int64_t V, int64_t stride_b,
         int64_t stride_t, int64_t stride_v, uintptr_t grad_out, int64_t out_stride_b,
         int64_t out_stride_t, int64_t out_stride_v, uintptr_t labels, int64_t label_offset,
         int64_t ignore_index, uintptr_t lse, uintptr_t entropy, uintptr_t grad_logp,
         uintptr_t grad_entropy, int64_t row_offset, int nthreads, double pre, double post,
         double softcap) {
        check_row_offset(row_offset);
        const int64_t r0 = row_offset;
        BwdArgs a{view(logits, dtype, B, T, V, stride_b, stride_t, stride_v),
                  view(grad_out, dtype, B, T, V, out_stride_b, out_stride_t, out_stride_v),
                  row<const int64_t>(labels, r0), label_offset, ignore_index,
                  row<const float>(lse, r0), row<const float>(entropy, r0),
                  row<const float>(grad_logp, r0), row<const float>(grad_entropy, r0),
                  threads(nthreads), head_tf(pre, post, softcap)};
        if (a.grad_entropy && !a.entropy)
          throw std::invalid_argument("grad_entropy given without the saved entropy");
        py::gil_scoped_release nogil;
        if (grad_out != logits) advise_hugepages(a.out);
        K().backward(a);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("B"), py::arg("T"), py::arg("V"),
      py::arg("stride_b"), py::arg("stride_t"), py::arg("stride_v"), py::arg("grad_out"),
      py::arg("out_stride_b"), py::arg("out_stride_t"), py::arg("out_stride_v"),
      py::arg("labels"), py::arg("label_offset"), py::arg("ignore_index"), py::arg("lse"),
      py::arg("entropy"), py::arg("grad_logp"), py::arg("grad_entropy"),
      py::arg("row_offset") = 0, py::arg("nthreads") = 1, py::arg("pre") = 1.0,
      py::arg("post") = 1.0, py::arg("softcap") = 0.0,
      "Backward into grad_out (may alias logits); grad_entropy = 0 when the entropy has no "
      "gradient. Label y sits at column y - label_offset (fused-linear blocks); the per-row "
      "arrays are read from row row_offset on. pre, post, softcap: the forward's head "
      "transform; the gradient is then dL/dz' times dz'/dz, with respect to the raw logits.");

  m.def(
      "block_forward",
      [](uintptr_t block, int64_t rows, int64_t cols, int64_t ld, int64_t col0,
         uintptr_t labels, int64_t ignore_index, bool with_entropy, uintptr_t m, uintptr_t s,
         uintptr_t a, uintptr_t zy, int64_t row_offset, int nthreads, double pre, double post,
         double softcap) {
        if (rows < 0 || cols < 1 || ld < cols)
          throw std::invalid_argument("block_forward: need rows >= 0, cols >= 1, ld >= cols");
        check_row_offset(row_offset);
        const int64_t r0 = row_offset;
        BlockFwdArgs args{ptr<const float>(block), rows, cols, ld, col0,
                          row<const int64_t>(labels, r0), ignore_index, with_entropy,
                          row<float>(m, r0), row<float>(s, r0), row<float>(a, r0),
                          row<float>(zy, r0), threads(nthreads),
                          head_tf(pre, post, softcap)};
        py::gil_scoped_release nogil;
        K().block_forward(args);
      },
      py::arg("block"), py::arg("rows"), py::arg("cols"), py::arg("ld"), py::arg("col0"),
      py::arg("labels"), py::arg("ignore_index"), py::arg("with_entropy"), py::arg("m"),
      py::arg("s"), py::arg("a"), py::arg("zy"), py::arg("row_offset") = 0,
      py::arg("nthreads") = 1, py::arg("pre") = 1.0, py::arg("post") = 1.0,
      py::arg("softcap") = 0.0,
      "Merge an fp32 [rows, cols] block (row stride ld, first column col0) into running "
      "per-row (max m, sum s, entropy accumulator a, label logit zy), rows row_offset on. "
      "pre, post, softcap: the head transform of token_logprobs_forward, applied to each "
      "element as it is read (the statistics are those of z'; the block is not written).");

  m.def(
      "block_forward_frozen",
      [](uintptr_t block, int64_t rows, int64_t cols, int64_t ld, int64_t col0,
         uintptr_t labels, int64_t ignore_index, bool with_entropy, uintptr_t m, uintptr_t s,
         uintptr_t a, uintptr_t zy, uintptr_t alpha, uintptr_t dm, uintptr_t ed, int64_t ld_ed,
         int64_t row_offset, int nthreads, double pre, double post, double softcap) {
        if (rows < 0 || cols < 1 || ld < cols)
          throw std::invalid_argument(
              "block_forward_frozen: need rows >= 0, cols >= 1, ld >= cols");
        if (with_entropy && (!ed || ld_ed < cols))
          throw std::invalid_argument(
              "block_forward_frozen: with_entropy needs an ed buffer with ld_ed >= cols");
        check_row_offset(row_offset);
        const int64_t r0 = row_offset;
        BlockFwdArgs base{ptr<const float>(block), rows, cols, ld, col0,
                          row<const int64_t>(labels, r0), ignore_index, with_entropy,
                          row<float>(m, r0), row<float>(s, r0), row<float>(a, r0),
                          row<float>(zy, r0), threads(nthreads),
                          head_tf(pre, post, softcap)};
        BlockFwdFrozenArgs args{base, ptr<float>(block),
                                with_entropy ? ptr<float>(ed) : nullptr, ld_ed,
                                row<float>(alpha, r0), row<float>(dm, r0)};
        py::gil_scoped_release nogil;
        K().block_forward_frozen(args);
      },
      py::arg("block"), py::arg("rows"), py::arg("cols"), py::arg("ld"), py::arg("col0"),
      py::arg("labels"), py::arg("ignore_index"), py::arg("with_entropy"), py::arg("m"),
      py::arg("s"), py::arg("a"), py::arg("zy"), py::arg("alpha"), py::arg("dm"),
      py::arg("ed"), py::arg("ld_ed"), py::arg("row_offset") = 0, py::arg("nthreads") = 1,
      py::arg("pre") = 1.0, py::arg("post") = 1.0, py::arg("softcap") = 0.0,
      "block_forward, and the fp32 block is overwritten with e = exp(z' - m_new) (ed gets "
      "e (z' - m_new) with entropy); alpha = exp(m_old - m_new), dm = m_old - m_new per row. "
      "With a head transform the block first becomes z' in place.");

  py::class_<PoolBuffer>(m, "PoolBuffer", py::buffer_protocol(),
                         "nbytes writable bytes from the gradient-buffer pool (buffer_pool.h); "
                         "wrap with torch.frombuffer. Contents are undefined (reused memory).")
      .def(py::init([](int64_t nbytes) {
             if (nbytes < 1) throw std::invalid_argument("PoolBuffer: nbytes must be >= 1");
             return new PoolBuffer(size_t(nbytes));
           }),
           py::arg("nbytes"))
      .def_property_readonly("address", [](const PoolBuffer& b) {
        return reinterpret_cast<uintptr_t>(b.r.ptr);
      })
      .def_buffer([](PoolBuffer& b) {
        return py::buffer_info(b.r.ptr, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {py::ssize_t(b.nbytes)}, {py::ssize_t(1)}, false);
      });
  m.def("pool_set_limit", [](int64_t n) { pool_set_limit(size_t(n < 0 ? 0 : n)); },
        py::arg("regions"), "Keep at most this many released regions mapped (0: none).");
  m.def("pool_trim", [] { return pool_trim(); },
        "Unmap every cached region; returns the bytes given back.");
  m.def(
      "pool_stats",
      [] {
        const PoolStats s = pool_stats();
        py::dict d;
        d["cached_regions"] = s.cached_regions;
        d["cached_bytes"] = s.cached_bytes;
        d["hits"] = s.hits;
        d["misses"] = s.misses;
        return d;
      },
      "Pool counters: cached_regions, cached_bytes, hits, misses.");

  m.def(
      "exp_f32",
      [](uintptr_t x, uintptr_t y, int64_t n, int variant) {
        if (variant < 0 || variant > 2)
          throw py::value_error("variant must be 0 (exp), 1 (kernel exp) or 2 (bf16 exp)");
        py::gil_scoped_release nogil;
        K().exp_f32(ptr<const float>(x), ptr<float>(y), n, variant);
      },
      py::arg("x"), py::arg("y"), py::arg("n"), py::arg("variant") = 0,
      "The vectorized exps over n contiguous float32 (exposed for the accuracy tests): "
      "variant 0 the general exp; 1 the kernels' exp and 2 the bfloat16 backward's, both "
      "with inputs clamped to [-88, 0] and a flush below 2^-126.");
}
