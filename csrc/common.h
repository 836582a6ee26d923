// Plain-data interface between the pybind11 module and the per-ISA kernel builds.
// No torch here: Python passes raw pointers, shapes, element strides and dtype codes.
#pragma once
#include <cstdint>

namespace cpo {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// A [B, T, V] view: element (b, t, v) lives at ptr + b*sb + t*st + v*sv (element strides).
struct View3 {
  void* ptr;
  int dtype;
  int64_t B, T, V;
  int64_t sb, st, sv;
};

// Head transform applied per element inside the token_logprobs kernels (docs/math.md 6.6):
// kind 0: identity (the untransformed code path); 1: z' = g z; 2 (softcap):
// z' = c tanh(a z), dz = dz' g (1 - tanh(a z)^2). With pre = logit_scale, post =
// 1 / temperature and cap = softcap: g = pre post, a = pre / cap, c = cap post.
struct HeadTf {
  int kind = 0;
  float g = 1.f, a = 1.f, c = 1.f;
};

struct FwdArgs {
  View3 x;
  const int64_t* labels;  // [B*T]
  int64_t ignore_index;
  float* logp;            // [B*T]
  float* entropy;         // [B*T] or nullptr
  float* lse;             // [B*T]
  int nthreads;
  HeadTf tf;              // identity by default
};

struct BwdArgs {
  View3 x;                 // logits (read)
  View3 out;               // gradient (written; may alias x with the same strides)
  const int64_t* labels;   // [B*T]
  int64_t label_offset;    // label y sits at column y - label_offset (fused-linear blocks)
  int64_t ignore_index;
  const float* lse;        // [B*T]
  const float* entropy;    // [B*T] or nullptr when grad_entropy is nullptr
  const float* grad_logp;  // [B*T]
  const float* grad_entropy;  // [B*T] or nullptr
  int nthreads;
  HeadTf tf;               // identity by default; the gradient is with respect to raw z
};

// Online-logsumexp update over an fp32 block [rows, cols] (row stride ld) of a wider
// logits matrix whose columns start at col0: merges the block into running (m, s, a) per row
// and picks the label's logit when it falls inside the block.
struct BlockFwdArgs {
  const float* buf;
  int64_t rows, cols, ld, col0;
  const int64_t* labels;  // [rows]
  int64_t ignore_index;
  bool with_entropy;
  float* m;   // running max            [rows]
  float* s;   // sum exp(z - m)         [rows]
  float* a;   // sum exp(z - m)(z - m)  [rows] (entropy only)
  float* zy;  // label logit            [rows]
  int nthreads;
  HeadTf tf;  // applied to each element as it is read; m, s, a, zy are those of z'
};

// The frozen-weight variant (see block_forward_frozen in kernels_impl.h): base.buf is
// written in place with e = exp(z' - m_new); ed (with entropy) gets e (z' - m_new).
struct BlockFwdFrozenArgs {
  BlockFwdArgs base;
  float* buf;     // = base.buf, writable
  float* ed;      // [rows, ld_ed] or nullptr without entropy
  int64_t ld_ed;
  float* alpha;   // [rows] exp(m_old - m_new): the factor for the previous sums
  float* dm;      // [rows] m_old - m_new (clamped at -88; 0 when the max did not grow)
};

struct Kernels {
  const char* name;
  void (*forward)(const FwdArgs&);
  void (*backward)(const BwdArgs&);
  void (*block_forward)(const BlockFwdArgs&);
  void (*block_forward_frozen)(const BlockFwdFrozenArgs&);
  void (*exp_f32)(const float* x, float* y, int64_t n, int variant);
};

extern const Kernels kernels_generic;
#if defined(__x86_64__) || defined(_M_X64)
extern const Kernels kernels_avx2;
extern const Kernels kernels_avx512;
#endif

}  // namespace cpo
