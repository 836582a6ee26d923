// The CPU kernels, written once and compiled per ISA: kernels_generic.cpp and
// kernels_avx2.cpp include this file (no include guard on purpose) after defining CPO_NS
// and, for AVX2, a target pragma. All system headers are included by those files first.
//
// Math (docs/math.md, the per-token quantities and their gradient), per row z of length V with label y:
//   forward:  m = max z, s = sum e^(z-m), a = sum e^(z-m) (z-m)     (one pass, online in m)
//             lse = m + log s,  logp = z_y - lse,  H = lse - sum p z = log s - a / s
//   backward: dL/dz_v = G([v==y] - p_v) - E p_v (log p_v + H),  p_v = e^(z_v - lse)
// Entropy is accumulated relative to the running max so large logits do not cancel.
// Head transforms (HeadTf, docs/math.md 6.6) replace z by z' element by element as a chunk is
// read (into an L1 float32 buffer); the backward multiplies dL/dz' by dz'/dz before storing.
//
// Vectors are GCC/Clang vector extensions of VW floats (CPO_VW below): one ymm under AVX2,
// one zmm under AVX-512, two xmm registers on the baseline build. No -ffast-math: -inf logits and NaNs keep IEEE
// semantics; reductions are explicit lane-wise accumulators so nothing needs reassociation.

namespace cpo {
namespace CPO_NS {
namespace {

// CPO_VW: floats per vector (8: one ymm under AVX2, two xmm on the baseline build; 16: one
// zmm in the AVX-512 build). Every loop below steps by VW, so one source serves all widths.
#ifndef CPO_VW
#define CPO_VW 8
#endif
constexpr int VW = CPO_VW;
static_assert(VW == 8 || VW == 16, "CPO_VW must be 8 or 16");
// Hot vector helpers must inline: a call per vector spills the accumulators and reloads
// every constant (GCC 12 left exp_reduced out of line in the AVX2 build: about 2x slower).
#define CPO_HOT inline __attribute__((always_inline))
typedef float vf __attribute__((vector_size(4 * CPO_VW)));
typedef int32_t vi __attribute__((vector_size(4 * CPO_VW)));
typedef uint32_t vu __attribute__((vector_size(4 * CPO_VW)));
typedef uint16_t vh __attribute__((vector_size(2 * CPO_VW)));

constexpr int64_t kChunk = 1024;  // elements per chunk: L1-resident between the two sweeps
// Differences z - m (<= 0) are clamped below at kDMin before the kernel exp: it turns
// (-inf) - m into a finite number, so p * (z - m) is 0 * finite = 0, never NaN, and
// exp(kDMin) is exactly 0 in kexp (see there).
constexpr float kDMin = -88.f;

CPO_HOT vf splat(float x) {  // an initializer list folds to one broadcast (a loop did not)
#if CPO_VW == 16
  return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#else
  return vf{x, x, x, x, x, x, x, x};
#endif
}
CPO_HOT vf vmax(vf a, vf b) { return a > b ? a : b; }
// max(x, lo) that keeps a NaN x (so NaN logits give NaN results, not silently -150).
CPO_HOT vf clamp_lo(vf x, vf lo) { return lo > x ? lo : x; }  // = maxps(lo, x)
inline float fmax1(float a, float b) { return a > b ? a : b; }
CPO_HOT float hmax(vf v) {
  float r = v[0];
  for (int i = 1; i < VW; ++i) r = fmax1(r, v[i]);
  return r;
}
CPO_HOT float hsum(vf v) {  // fixed pairwise tree (halves folded): deterministic per width
  for (int w = VW / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) v[i] = v[i] + v[i + w];
  return v[0];
}

// The range reduction shared by both exps below: x = n ln2 + r with |r| <= ln2/2
// (Cody-Waite, ln2 in two parts) and Cephes' minimax polynomial for e^r. Returns e^r and
// sets t = n + 1.5 * 2^23, whose low mantissa bits hold the integer n.
CPO_HOT vf exp_reduce(vf x, vf& t) {  // returns r
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  t = x * splat(1.44269504088896341f) + magic;
  const vf n = t - magic;
  const vf r = x - n * splat(0.693359375f);
  return r - n * splat(-2.12194440e-4f);
}
CPO_HOT vf exp_reduced(vf x, vf& t) {
  const vf r = exp_reduce(x, t);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  return p * (r * r) + r + splat(1.f);
}

// exp(x) lane-wise: e^r from exp_reduced, then a scale by 2^n split in two halves so
// that results in the subnormal range (x down to about -103.97) round once, and overflow
// gives +inf. Measured error: within 2 ulp of the correctly rounded float32 result (tests
// sweep it). vexp_core needs x in [-150, 89] (or NaN); vexp clamps first.
CPO_HOT vf vexp_core(vf x) {
  vf t;
  const vf e = exp_reduced(x, t);
  const vi ni = (vi)t - (vi)splat(12582912.f);
  const vi n1 = ni >> 1;
  const vi n2 = ni - n1;
  const vf s1 = (vf)((n1 + 127) << 23);
  const vf s2 = (vf)((n2 + 127) << 23);
  return (e * s1) * s2;
}
CPO_HOT vf vexp(vf x) {
  x = clamp_lo(x, splat(-150.f));  // NaN fails both comparisons and propagates
  x = x > splat(89.f) ? splat(89.f) : x;
  return vexp_core(x);
}

// Minimax (relative error) coefficients of e^r ~ 1 + r + c2 r^2 + ... + c5 r^5 on
// |r| <= ln2/2, then tuned in float32 against the ulp sweep of the tests.
#define KEXP_C2 0.4999924302101135f
#define KEXP_C3 0.1666715145111084f
#define KEXP_C4 0.041890230029821396f
#define KEXP_C5 0.008312542922794819f
// The kernels' exp, for x in [kDMin, kSpecMax] = [-88, 30] (a log-probability, or a term
// of chunk_stats_one_sweep above its running max): one scale 2^n with n in [-127, 44],
// where n = -127 gives the bit pattern 0, i.e. exp(x) = 0 exactly for
// x < about -87.68 (a flush of results below 2^-126; they do not change a sum that holds
// a 1, and a gradient that small is 0 to within 1e-38). A shorter polynomial than vexp's,
// measured 2.2 ulp at worst for results >= 2^-126 (tested: <= 2.5).
CPO_HOT vf kexp(vf x) {
  // The same reduction, then a degree-5 polynomial (5 FMAs, against 8 operations for
  // exp_reduced's degree-7 form): relative error 1.05e-7 on |r| <= ln2/2, within 2.5 ulp
  // in all (tested; 2.2 measured), where exp_reduced's form gives 2.
  vf t;
  const vf r = exp_reduce(x, t);
  vf e = splat(KEXP_C5);
  e = e * r + splat(KEXP_C4);
  e = e * r + splat(KEXP_C3);
  e = e * r + splat(KEXP_C2);
  e = e * r + splat(1.f);
  e = e * r + splat(1.f);
  // bits(t) = bits(magic) + n: fold the exponent bias into one integer add
  const vi biased = (vi)t + (int32_t)(127u - 0x4b400000u);
  return e * (vf)(biased << 23);
}

// The backward's exp when the gradient is stored in bfloat16 (8 significant bits: its
// rounding alone is up to 2^-9 = 2e-3 relative). Minimax (relative error) cubic
// c0 + c1 r + c2 r^2 + c3 r^3 for e^r on |r| <= ln2/2 after a one-constant reduction:
// relative error 7.5e-5 (tested: <= 8e-5), 1/26 of the bfloat16 rounding, for 7 float
// operations against kexp's 10 (the bfloat16 backward is bound by them, not by memory).
// The polynomial's coefficients come premultiplied by a per-row factor f (Cubic below), so
// it returns f e^x with no extra multiply. Same domain and flush as kexp.
struct Cubic {
  float c0, c1, c2, c3;
};
constexpr Cubic kExp16 = {0.9999280571937561f, 1.0001641511917114f, 0.5049632787704468f,
                          0.16566842794418335f};
inline Cubic scaled(const Cubic& c, float f) { return {c.c0 * f, c.c1 * f, c.c2 * f, c.c3 * f}; }
CPO_HOT vf kexp16(vf x, const Cubic& c) {
  const vf magic = splat(12582912.f);
  const vf t = x * splat(1.44269504088896341f) + magic;
  const vf r = x - (t - magic) * splat(0.693147182464599609f);
  vf e = splat(c.c3);
  e = e * r + splat(c.c2);
  e = e * r + splat(c.c1);
  e = e * r + splat(c.c0);
  const vi biased = (vi)t + (int32_t)(127u - 0x4b400000u);
  return e * (vf)(biased << 23);
}

// ---- dtype conversion -------------------------------------------------------------------

inline float bits2f(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline uint32_t f2bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
}

// IEEE half <-> float (F. Giesen's exact conversions; round to nearest even).
inline float h2f(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (uint32_t)(h & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  float f;
  if (exp == shifted_exp) {  // inf / NaN
    o += (128u - 16u) << 23;
    f = bits2f(o);
  } else if (exp == 0) {  // zero / subnormal
    o += 1u << 23;
    f = bits2f(o) - bits2f(113u << 23);
  } else {
    f = bits2f(o);
  }
  return bits2f(f2bits(f) | ((uint32_t)(h & 0x8000u) << 16));
}
inline uint16_t f2h(float f) {
  uint32_t x = f2bits(f);
  const uint32_t sign = x & 0x80000000u;
  x ^= sign;
  uint16_t o;
  if (x >= 0x47800000u) {  // >= 65536: inf, or NaN
    o = x > 0x7f800000u ? 0x7e00 : 0x7c00;
  } else if (x < 0x38800000u) {  // below the smallest normal half: let the FPU round
    const float g = bits2f(x) + 0.5f;
    o = (uint16_t)(f2bits(g) - f2bits(0.5f));
  } else {
    const uint32_t mant_odd = (x >> 13) & 1u;
    x += ((uint32_t)(15 - 127) << 23) + 0xfffu;
    x += mant_odd;
    o = (uint16_t)(x >> 13);
  }
  return (uint16_t)(o | (sign >> 16));
}
inline float bf2f(uint16_t h) { return bits2f((uint32_t)h << 16); }

// The one float -> bfloat16 rounding (round to nearest even; a NaN stays a quiet NaN), for
// a float (F = float, U = uint32_t) or VW of them (F = vf, U = vu): the bf16 bits come
// back in the low 16 bits of each U.
template <class F, class U>
CPO_HOT U bf16_round(F v) {
  U u;
  __builtin_memcpy(&u, &v, sizeof(U));
  const U r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (v != v) ? U((u >> 16) | 0x40u) : r;
}
inline uint16_t f2bf(float f) { return (uint16_t)bf16_round<float, uint32_t>(f); }

template <int DT> struct Elem;
template <> struct Elem<kF32> { typedef float T; };
template <> struct Elem<kBF16> { typedef uint16_t T; };
template <> struct Elem<kF16> { typedef uint16_t T; };

template <int DT> inline float load1(const void* p, int64_t i);
template <> inline float load1<kF32>(const void* p, int64_t i) { return ((const float*)p)[i]; }
template <> inline float load1<kBF16>(const void* p, int64_t i) {
  return bf2f(((const uint16_t*)p)[i]);
}
template <> inline float load1<kF16>(const void* p, int64_t i) {
  return h2f(((const uint16_t*)p)[i]);
}
template <int DT> inline void store1(void* p, int64_t i, float v);
template <> inline void store1<kF32>(void* p, int64_t i, float v) { ((float*)p)[i] = v; }
template <> inline void store1<kBF16>(void* p, int64_t i, float v) {
  ((uint16_t*)p)[i] = f2bf(v);
}
template <> inline void store1<kF16>(void* p, int64_t i, float v) { ((uint16_t*)p)[i] = f2h(v); }

// VW contiguous elements starting at index i.
template <int DT> CPO_HOT vf loadv(const void* p, int64_t i);
template <> CPO_HOT vf loadv<kF32>(const void* p, int64_t i) {
  vf r;
  __builtin_memcpy(&r, (const float*)p + i, sizeof(vf));
  return r;
}
template <> CPO_HOT vf loadv<kBF16>(const void* p, int64_t i) {
  vh h;
  __builtin_memcpy(&h, (const uint16_t*)p + i, sizeof(vh));
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
template <> CPO_HOT vf loadv<kF16>(const void* p, int64_t i) {
  vf r;
  for (int j = 0; j < VW; ++j) r[j] = h2f(((const uint16_t*)p)[i + j]);
  return r;
}
template <int DT> CPO_HOT void storev(void* p, int64_t i, vf v);
template <> CPO_HOT void storev<kF32>(void* p, int64_t i, vf v) {
  __builtin_memcpy((float*)p + i, &v, sizeof(vf));
}
template <> CPO_HOT void storev<kBF16>(void* p, int64_t i, vf v) {
  const vh h = __builtin_convertvector((bf16_round<vf, vu>(v)), vh);
  __builtin_memcpy((uint16_t*)p + i, &h, sizeof(vh));
}
template <> CPO_HOT void storev<kF16>(void* p, int64_t i, vf v) {
  for (int j = 0; j < VW; ++j) ((uint16_t*)p)[i + j] = f2h(v[j]);
}
// The last cnt < VW elements, padded with pad.
template <int DT> inline vf load_tail(const void* p, int64_t i, int64_t cnt, float pad) {
  vf r = splat(pad);
  for (int64_t j = 0; j < cnt; ++j) r[j] = load1<DT>(p, i + j);
  return r;
}
template <int DT> inline void store_tail(void* p, int64_t i, int64_t cnt, vf v) {
  for (int64_t j = 0; j < cnt; ++j) store1<DT>(p, i + j, v[j]);
}

// 2 VW elements as two vectors, for loops that are order-agnostic per element as long as
// store16 puts each value back where load16 found it. bf16 uses the per-128-bit-lane
// unpack (vpunpck{l,h}wd with zeros) and its inverse, the per-lane pack (vpackusdw):
// one instruction each way instead of widening conversions plus cross-lane moves.
typedef uint16_t v2h __attribute__((vector_size(32)));
#if defined(__clang__)
#define CPO_SHUFFLE16(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define CPO_SHUFFLE16(a, b, ...) __builtin_shuffle(a, b, v2h{__VA_ARGS__})
#endif
template <int DT> CPO_HOT void load16(const void* p, int64_t i, vf& a, vf& b) {
  a = loadv<DT>(p, i);
  b = loadv<DT>(p, i + VW);
}
#if CPO_VW == 8  // AVX-512 (VW = 16): vpmovzxwd / vpmovdw are single instructions
template <> CPO_HOT void load16<kBF16>(const void* p, int64_t i, vf& a, vf& b) {
  v2h x;
  __builtin_memcpy(&x, (const uint16_t*)p + i, 32);
  const v2h z = {};
  a = (vf)CPO_SHUFFLE16(z, x, 0, 16, 1, 17, 2, 18, 3, 19, 8, 24, 9, 25, 10, 26, 11, 27);
  b = (vf)CPO_SHUFFLE16(z, x, 4, 20, 5, 21, 6, 22, 7, 23, 12, 28, 13, 29, 14, 30, 15, 31);
}
#endif
template <int DT> CPO_HOT void store16(void* p, int64_t i, vf a, vf b) {
  storev<DT>(p, i, a);
  storev<DT>(p, i + VW, b);
}
#if CPO_VW == 8
template <> CPO_HOT void store16<kBF16>(void* p, int64_t i, vf a, vf b) {
  const v2h ra = (v2h)bf16_round<vf, vu>(a), rb = (v2h)bf16_round<vf, vu>(b);
  const v2h x = CPO_SHUFFLE16(ra, rb, 0, 2, 4, 6, 16, 18, 20, 22, 8, 10, 12, 14, 24, 26, 28, 30);
  __builtin_memcpy((uint16_t*)p + i, &x, 32);
}
#endif

constexpr int64_t esize(int dt) { return dt == kF32 ? 4 : 2; }

// Streaming (non-temporal) stores, for the backward's gradient: written once and not read
// back here, so the cache line need not be read first (the read-for-ownership of a plain
// store is a third of the backward's traffic). Address aligned to the vector's bytes; the
// x86 builds define CPO_NT_STORES (baseline build: plain stores). Weakly ordered: the
// backward ends each thread's work with a store fence.
// Two vectors as store16 lays them out (bf16 under AVX2: the per-lane pack).
template <int DT> CPO_HOT void stream_store16(void* p, int64_t i, vf a, vf b) {
#if defined(CPO_NT_STORES)
  if (DT == kF32) {
#if CPO_VW == 16
    _mm512_stream_ps((float*)p + i, (__m512)a);
    _mm512_stream_ps((float*)p + i + VW, (__m512)b);
#else
    _mm256_stream_ps((float*)p + i, (__m256)a);
    _mm256_stream_ps((float*)p + i + VW, (__m256)b);
#endif
    return;
  }
  if (DT == kBF16) {
#if CPO_VW == 16
    const vh ha = __builtin_convertvector((bf16_round<vf, vu>(a)), vh);
    const vh hb = __builtin_convertvector((bf16_round<vf, vu>(b)), vh);
    _mm256_stream_si256((__m256i*)((uint16_t*)p + i), (__m256i)ha);
    _mm256_stream_si256((__m256i*)((uint16_t*)p + i + VW), (__m256i)hb);
#else
    const v2h ra = (v2h)bf16_round<vf, vu>(a), rb = (v2h)bf16_round<vf, vu>(b);
    const v2h x = CPO_SHUFFLE16(ra, rb, 0, 2, 4, 6, 16, 18, 20, 22, 8, 10, 12, 14, 24, 26, 28, 30);
    _mm256_stream_si256((__m256i*)((uint16_t*)p + i), (__m256i)x);
#endif
    return;
  }
#endif
  store16<DT>(p, i, a, b);
}
// The alignment stream_store16 needs: one float32 vector; 32 bytes for bf16 (one converted
// AVX-512 vector, or an AVX2 pair).
template <int DT> constexpr int64_t kStreamAlign = DT == kF32 ? 4 * VW : 32;
inline void store_fence() {
#if defined(CPO_NT_STORES)
  _mm_sfence();
#endif
}

// ---- head transforms (docs/math.md 6.6) -------------------------------------------------
// TF (HeadTf::kind): kTfNone runs the untransformed code unchanged; kTfScale z' = g z
// (dz = dz' g); kTfCap z' = c tanh(a z) (dz = dz' g (1 - tanh^2)). All in float32.
enum { kTfNone = 0, kTfScale = 1, kTfCap = 2 };

CPO_HOT vf vabs(vf x) { return (vf)((vu)x & 0x7fffffffu); }
// |mag| with the sign bit of x (mag >= 0).
CPO_HOT vf with_sign_of(vf mag, vf x) { return (vf)((vu)mag | ((vu)x & 0x80000000u)); }

// z' of VW raw logits (TF != kTfNone) and, with FAC, the factor dz'/dz into fac.
// tanh from e = exp(-2|x|) in (0, 1] (vexp: never overflows): tanh x = sign(x)(1-e)/(1+e)
// and 1 - tanh^2 = 4e/(1+e)^2. x = -inf gives e = 0, so z' = -c (finite) with factor 0;
// a NaN stays NaN in both.
template <int TF, bool FAC>
CPO_HOT vf tf_vec(vf z, const HeadTf& h, vf& fac) {
  if (TF == kTfScale) {
    if (FAC) fac = splat(h.g);
    return z * splat(h.g);
  }
  const vf x = z * splat(h.a);
  const vf e = vexp(splat(-2.f) * vabs(x));
  const vf q = splat(1.f) / (splat(1.f) + e);
  if (FAC) fac = splat(4.f * h.g) * e * (q * q);
  return splat(h.c) * with_sign_of((splat(1.f) - e) * q, x);
}
// One element, through the same vector code (bit-identical to the chunks' values).
template <int TF>
inline float tf1(float z, const HeadTf& h, float* fac) {
  vf f;
  const vf r = tf_vec<TF, true>(splat(z), h, f);
  if (fac) *fac = f[0];
  return r[0];
}

// Elements [off, off + len) of a contiguous row, transformed, into dst[0, len) as float32
// (dst may be src itself for DT = kF32, off = 0: each vector is read before it is written);
// with FAC also the factors into fac[0, len).
template <int DT, int TF, bool FAC>
inline void tf_chunk(const void* src, int64_t off, int64_t len, float* dst, float* fac,
                     const HeadTf& h) {
  const int64_t nfull = len & ~int64_t(VW - 1);
  vf f;
  for (int64_t i = 0; i < nfull; i += VW) {
    storev<kF32>(dst, i, tf_vec<TF, FAC>(loadv<DT>(src, off + i), h, f));
    if (FAC) storev<kF32>(fac, i, f);
  }
  if (len > nfull) {
    const vf z = tf_vec<TF, FAC>(load_tail<DT>(src, off + nfull, len - nfull, 0.f), h, f);
    store_tail<kF32>(dst, nfull, len - nfull, z);
    if (FAC) store_tail<kF32>(fac, nfull, len - nfull, f);
  }
}

// Chunk [c0, c0 + len) of a row with element stride sv into buf as float32 z' (gathered
// first when sv != 1); with FAC the factors into fac.
template <int DT, int TF, bool FAC>
inline void load_chunk(const void* row, int64_t c0, int64_t len, int64_t sv, float* buf,
                       float* fac, const HeadTf& h) {
  if (sv == 1) {
    tf_chunk<DT, TF, FAC>(row, c0, len, buf, fac, h);
    return;
  }
  for (int64_t j = 0; j < len; ++j) buf[j] = load1<DT>(row, (c0 + j) * sv);
  tf_chunk<kF32, TF, FAC>(buf, 0, len, buf, fac, h);
}

// ---- forward ----------------------------------------------------------------------------

struct Stats {
  float m, s, a;  // max, sum e^(z-m), sum e^(z-m)(z-m)
};

struct Acc {
  float m = -FLT_MAX;  // finite start: no (-inf) - (-inf) on the first rescale
  vf s0 = {}, s1 = {}, a0 = {}, a1 = {};
};

// The running max grows to cm > acc.m: the sums relative to the old max are rescaled,
// s <- c s and a <- c (a + s d) with d = m - cm and c = e^d (a = sum e (z - m) shifts by d).
template <bool ENT>
CPO_HOT void raise_max(Acc& acc, float cm) {
  const float d = fmax1(acc.m - cm, kDMin);
  const vf c = splat(expf(d)), dv = splat(d);
  if (ENT) {
    acc.a0 = c * (acc.a0 + acc.s0 * dv);
    acc.a1 = c * (acc.a1 + acc.s1 * dv);
  }
  acc.s0 *= c;
  acc.s1 *= c;
  acc.m = cm;
}

// One vector of terms d = z - m (clamped): s += e^d and, with ENT, a += e^d d. Returns e^d.
template <bool ENT>
CPO_HOT vf add_terms(vf& s, vf& a, vf d) {
  const vf e = kexp(d);
  s += e;
  if (ENT) a += e * d;
  return e;
}

// One chunk (contiguous, L1-resident): max sweep, rescale if the max grew, exp sweep.
// WRITE (float32 only, for the frozen-weight fused-linear forward): the exp sweep also
// stores e = exp(z - m) into e_out[off + i] (may be p itself: each element is read before
// its slot is written) and, with ENT, e (z - m) into ed_out[off + i], relative to the max
// of the whole chunk and of acc.m on entry, which is the max every stored value shares.
template <int DT, bool ENT, bool WRITE = false>
inline void chunk_stats(const void* p, int64_t off, int64_t len, Acc& acc_out,
                        float* e_out = nullptr, float* ed_out = nullptr) {
  static_assert(!WRITE || DT == kF32, "the written e buffers are float32 like the input");
  Acc acc = acc_out;  // a local copy: stores through p cannot alias it, so it stays in registers
  const int64_t nfull = len & ~int64_t(VW - 1);
  const vf tail = load_tail<DT>(p, off + nfull, len - nfull, -INFINITY);
  vf mx0 = splat(-FLT_MAX), mx1 = mx0;
  int64_t i = 0;
  for (; i + 2 * VW <= nfull; i += 2 * VW) {
    vf z0, z1;
    load16<DT>(p, off + i, z0, z1);
    mx0 = vmax(mx0, z0);
    mx1 = vmax(mx1, z1);
  }
  for (; i < nfull; i += VW) mx0 = vmax(mx0, loadv<DT>(p, off + i));
  const float cm = hmax(vmax(vmax(mx0, mx1), tail));
  if (cm > acc.m) raise_max<ENT>(acc, cm);
  const vf mm = splat(acc.m), dmin = splat(kDMin);
  i = 0;
  for (; i + 2 * VW <= nfull; i += 2 * VW) {
    vf z0, z1;
    load16<DT>(p, off + i, z0, z1);
    const vf d0 = clamp_lo(z0 - mm, dmin), d1 = clamp_lo(z1 - mm, dmin);
    const vf e0 = add_terms<ENT>(acc.s0, acc.a0, d0), e1 = add_terms<ENT>(acc.s1, acc.a1, d1);
    if (WRITE) {
      storev<kF32>(e_out, off + i, e0);
      storev<kF32>(e_out, off + i + VW, e1);
      if (ENT) {
        storev<kF32>(ed_out, off + i, e0 * d0);
        storev<kF32>(ed_out, off + i + VW, e1 * d1);
      }
    }
  }
  for (; i < nfull; i += VW) {
    const vf d0 = clamp_lo(loadv<DT>(p, off + i) - mm, dmin);
    const vf e0 = add_terms<ENT>(acc.s0, acc.a0, d0);
    if (WRITE) {
      storev<kF32>(e_out, off + i, e0);
      if (ENT) storev<kF32>(ed_out, off + i, e0 * d0);
    }
  }
  if (len > nfull) {
    const vf d1 = clamp_lo(tail - mm, dmin);  // -inf padding: e = 0, e * d = 0
    const vf e1 = add_terms<ENT>(acc.s1, acc.a1, d1);
    if (WRITE) {
      store_tail<kF32>(e_out, off + nfull, len - nfull, e1);
      if (ENT) store_tail<kF32>(ed_out, off + nfull, len - nfull, e1 * d1);
    }
  }
  acc_out = acc;
}

// A later chunk of a row (acc.m finite): one sweep instead of two. The exps are taken
// relative to the running max m on entry while the chunk's max is found in the same
// sweep; if that max exceeds m, the sums (this chunk's included) are rescaled after it
// (raise_max). A term e^(z - m) may then exceed 1, so a chunk whose max exceeds m by more
// than kSpecMax (e^30: no float32 sum can overflow) is dropped and redone max first. Rows
// rarely grow their max after their first chunks, so the redo is rare; the saving is the
// max sweep's loads (and bf16 widenings).
constexpr float kSpecMax = 30.f;
template <int DT, bool ENT>
inline void chunk_stats_one_sweep(const void* p, int64_t off, int64_t len, Acc& acc_out) {
  Acc acc = acc_out;
  const int64_t nfull = len & ~int64_t(VW - 1);
  const vf tail = load_tail<DT>(p, off + nfull, len - nfull, -INFINITY);
  const vf mm = splat(acc.m), dmin = splat(kDMin);
  vf mx0 = splat(-FLT_MAX), mx1 = mx0;
  int64_t i = 0;
  for (; i + 2 * VW <= nfull; i += 2 * VW) {
    vf z0, z1;
    load16<DT>(p, off + i, z0, z1);
    mx0 = vmax(mx0, z0);
    mx1 = vmax(mx1, z1);
    add_terms<ENT>(acc.s0, acc.a0, clamp_lo(z0 - mm, dmin));
    add_terms<ENT>(acc.s1, acc.a1, clamp_lo(z1 - mm, dmin));
  }
  for (; i < nfull; i += VW) {
    const vf z0 = loadv<DT>(p, off + i);
    mx0 = vmax(mx0, z0);
    add_terms<ENT>(acc.s0, acc.a0, clamp_lo(z0 - mm, dmin));
  }
  if (len > nfull) {
    mx1 = vmax(mx1, tail);
    add_terms<ENT>(acc.s1, acc.a1, clamp_lo(tail - mm, dmin));
  }
  const float cm = hmax(vmax(mx0, mx1));
  if (!(cm <= acc.m + kSpecMax)) {  // too far above m (or +inf): redo max first
    if (cm == cm) return chunk_stats<DT, ENT>(p, off, len, acc_out);
  } else if (cm > acc.m) {
    raise_max<ENT>(acc, cm);
  }
  acc_out = acc;
}

// Statistics of one row read once from memory: its first chunk is swept twice in L1 (max,
// then exps), later contiguous chunks once (chunk_stats_one_sweep).
// Rows with element stride sv != 1 are gathered chunk by chunk into buf (fp32); with a
// head transform (TF) every chunk goes to buf, transformed (h), whatever the stride.
template <int DT, bool ENT, int TF = kTfNone>
Stats row_stats(const void* row, int64_t V, int64_t sv, float* buf, const HeadTf* h = nullptr) {
  Acc acc;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t len = V - c0 < kChunk ? V - c0 : kChunk;
    if (TF != kTfNone) {
      load_chunk<DT, TF, false>(row, c0, len, sv, buf, nullptr, *h);
      chunk_stats<kF32, ENT>(buf, 0, len, acc);
    } else if (sv == 1) {
      if (acc.m > -FLT_MAX) {
        chunk_stats_one_sweep<DT, ENT>(row, c0, len, acc);
      } else {
        chunk_stats<DT, ENT>(row, c0, len, acc);
      }
    } else {
      for (int64_t j = 0; j < len; ++j) buf[j] = load1<DT>(row, (c0 + j) * sv);
      chunk_stats<kF32, ENT>(buf, 0, len, acc);
    }
  }
  return Stats{acc.m, hsum(acc.s0 + acc.s1), ENT ? hsum(acc.a0 + acc.a1) : 0.f};
}

inline const void* row_ptr(const View3& x, int64_t n) {
  const int64_t b = n / x.T, t = n - (n / x.T) * x.T;
  return (const char*)x.ptr + (b * x.sb + t * x.st) * esize(x.dtype);
}

template <int DT, bool ENT, int TF>
void forward_t(const FwdArgs& A) {
  const View3& x = A.x;
  const int64_t N = x.B * x.T, V = x.V;
#pragma omp parallel num_threads(A.nthreads)
  {
    float buf[kChunk];
#pragma omp for schedule(dynamic, 4)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t y = A.labels[n];
      if (y == A.ignore_index) {  // skipped: the row is not even read
        A.logp[n] = 0.f;
        A.lse[n] = 0.f;
        if (ENT) A.entropy[n] = 0.f;
        continue;
      }
      const void* row = row_ptr(x, n);
      const Stats st = row_stats<DT, ENT, TF>(row, V, x.sv, buf, &A.tf);
      const float ls = logf(st.s);
      const float lse = st.m + ls;
      // Out-of-range labels were rejected in Python; never read out of bounds regardless.
      float zy = (y >= 0 && y < V) ? load1<DT>(row, y * x.sv) : NAN;
      if (TF != kTfNone) zy = tf1<TF>(zy, A.tf, nullptr);
      A.logp[n] = zy - lse;
      A.lse[n] = lse;
      if (ENT) A.entropy[n] = ls - st.a / st.s;
    }
  }
}

template <int DT, bool ENT>
void forward_tf(const FwdArgs& A) {
  switch (A.tf.kind) {
    case kTfScale: return forward_t<DT, ENT, kTfScale>(A);
    case kTfCap: return forward_t<DT, ENT, kTfCap>(A);
    default: return forward_t<DT, ENT, kTfNone>(A);
  }
}

void forward(const FwdArgs& A) {
  const bool ent = A.entropy != nullptr;
  switch (A.x.dtype) {
    case kF32: return ent ? forward_tf<kF32, true>(A) : forward_tf<kF32, false>(A);
    case kBF16: return ent ? forward_tf<kBF16, true>(A) : forward_tf<kBF16, false>(A);
    default: return ent ? forward_tf<kF16, true>(A) : forward_tf<kF16, false>(A);
  }
}

// Fused-linear helper: merge one fp32 block of columns into each row's running statistics.
// With a head transform (TF) the block's chunks are transformed as they are read (into an
// L1 buffer, as in forward_t); the block itself is left as it is.
template <bool ENT, int TF>
void block_forward_t(const BlockFwdArgs& A) {
#pragma omp parallel num_threads(A.nthreads)
  {
    float buf[TF != kTfNone ? kChunk : 1];
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < A.rows; ++r) {
      const int64_t y = A.labels[r];
      if (y == A.ignore_index) continue;
      const float* row = A.buf + r * A.ld;
      const Stats st = row_stats<kF32, ENT, TF>(row, A.cols, 1, buf, &A.tf);
      const float M = fmax1(A.m[r], st.m);
      const float d1 = fmax1(A.m[r] - M, kDMin), d2 = fmax1(st.m - M, kDMin);
      const float c1 = expf(d1), c2 = expf(d2);
      if (ENT) A.a[r] = c1 * (A.a[r] + A.s[r] * d1) + c2 * (st.a + st.s * d2);
      A.s[r] = c1 * A.s[r] + c2 * st.s;
      A.m[r] = M;
      const int64_t yl = y - A.col0;
      if (yl >= 0 && yl < A.cols)
        A.zy[r] = TF != kTfNone ? tf1<TF>(row[yl], A.tf, nullptr) : row[yl];
    }
  }
}

// The block kernels' one switch on (entropy, head transform), outside the row loops: calls
// fn(TfTag<ENT, TF>{}) with the matching compile-time pair.
template <bool E, int T>
struct TfTag {
  static constexpr bool ent = E;
  static constexpr int tf = T;
};
template <class Fn>
void with_tf(bool ent, int kind, Fn fn) {
  switch (kind) {
    case kTfScale: return ent ? fn(TfTag<true, kTfScale>{}) : fn(TfTag<false, kTfScale>{});
    case kTfCap: return ent ? fn(TfTag<true, kTfCap>{}) : fn(TfTag<false, kTfCap>{});
    default: return ent ? fn(TfTag<true, kTfNone>{}) : fn(TfTag<false, kTfNone>{});
  }
}

void block_forward(const BlockFwdArgs& A) {
  with_tf(A.with_entropy, A.tf.kind, [&](auto t) { block_forward_t<t.ent, t.tf>(A); });
}

// Frozen-weight fused-linear forward: the same running-statistics update as
// block_forward, and the block is turned in place into e = exp(z - m_new) (plus
// ed = e (z - m_new) with entropy) so that Python can accumulate sum_v e_v W_v with one
// matrix product per block, after rescaling the previous sums by alpha = exp(m_old - m_new)
// (and, for the entropy sum, adding dm = m_old - m_new times the plain sum first).
// The whole block row is one chunk: every stored e must be relative to the same max. A head
// transform (TF) first replaces the row by z' in place (the row is L1/L2-resident).
template <bool ENT, int TF>
void block_forward_frozen_t(const BlockFwdFrozenArgs& F) {
  const BlockFwdArgs& A = F.base;
#pragma omp parallel for schedule(dynamic, 4) num_threads(A.nthreads)
  for (int64_t r = 0; r < A.rows; ++r) {
    float* row = F.buf + r * A.ld;
    float* ed = ENT ? F.ed + r * F.ld_ed : nullptr;
    const int64_t y = A.labels[r];
    if (y == A.ignore_index) {  // no contribution: the row's sums stay 0
      __builtin_memset(row, 0, A.cols * sizeof(float));
      if (ENT) __builtin_memset(ed, 0, A.cols * sizeof(float));
      F.alpha[r] = 1.f;
      F.dm[r] = 0.f;
      continue;
    }
    if (TF != kTfNone) tf_chunk<kF32, TF, false>(row, 0, A.cols, row, nullptr, A.tf);
    const int64_t yl = y - A.col0;
    if (yl >= 0 && yl < A.cols) A.zy[r] = row[yl];  // before the row is overwritten
    const float m_old = A.m[r];
    Acc acc;
    acc.m = m_old;
    acc.s0[0] = A.s[r];
    if (ENT) acc.a0[0] = A.a[r];
    chunk_stats<kF32, ENT, true>(row, 0, A.cols, acc, row, ed);
    // the rescale chunk_stats applied to (s, a), for Python's sums (same expression)
    const bool grew = acc.m > m_old;
    const float d = grew ? fmax1(m_old - acc.m, kDMin) : 0.f;
    F.alpha[r] = grew ? expf(d) : 1.f;
    F.dm[r] = d;
    A.m[r] = acc.m;
    A.s[r] = hsum(acc.s0 + acc.s1);
    if (ENT) A.a[r] = hsum(acc.a0 + acc.a1);
  }
}

void block_forward_frozen(const BlockFwdFrozenArgs& F) {
  with_tf(F.base.with_entropy, F.base.tf.kind,
          [&](auto t) { block_forward_frozen_t<t.ent, t.tf>(F); });
}

// ---- backward ---------------------------------------------------------------------------

struct RowGrad {
  float lse, G, E, H;
  // kexp16's coefficients for a bfloat16 gradient: times -G (the whole gradient without
  // entropy), or plain (with entropy, whose factor varies per element)
  Cubic c16;
  RowGrad(float lse_, float G_, float E_, float H_, bool ent)
      : lse(lse_), G(G_), E(E_), H(H_), c16(ent ? kExp16 : scaled(kExp16, -G_)) {}
};

template <int IDT, int ODT, bool ENT>
CPO_HOT vf grad_vec(vf z, const RowGrad& g) {
  const vf d = clamp_lo(z - splat(g.lse), splat(kDMin));  // log p, clamped: p = 0 below
  if (ODT == kBF16) {
    if (ENT) return kexp16(d, g.c16) * (d * splat(-g.E) - splat(g.G + g.E * g.H));
    return kexp16(d, g.c16);  // -G p
  }
  const vf p = kexp(d);
  if (ENT) return -p * (splat(g.G) + splat(g.E) * (d + splat(g.H)));
  return -p * splat(g.G);
}

// Gradient of one contiguous chunk, every element read before its own slot is written.
// NT: streaming stores for the pairs of vectors (out + off aligned to 2 VW elements).
template <int IDT, int ODT, bool ENT, bool NT = false>
inline void chunk_grad(const void* in, void* out, int64_t off, int64_t len, const RowGrad& g) {
  const int64_t nfull = len & ~int64_t(VW - 1);
  int64_t i = 0;
  for (; i + 2 * VW <= nfull; i += 2 * VW) {
    vf z0, z1;
    load16<IDT>(in, off + i, z0, z1);
    static_assert(IDT == ODT, "load16/store16 orders must match");
    const vf g0 = grad_vec<IDT, ODT, ENT>(z0, g), g1 = grad_vec<IDT, ODT, ENT>(z1, g);
    if (NT) {
      stream_store16<ODT>(out, off + i, g0, g1);
    } else {
      store16<ODT>(out, off + i, g0, g1);
    }
  }
  for (; i < nfull; i += VW)
    storev<ODT>(out, off + i, grad_vec<IDT, ODT, ENT>(loadv<IDT>(in, off + i), g));
  if (len > nfull) {
    const vf z = load_tail<IDT>(in, off + nfull, len - nfull, 0.f);
    store_tail<ODT>(out, off + nfull, len - nfull, grad_vec<IDT, ODT, ENT>(z, g));
  }
}

// out[c0, c0 + len) (element stride sv, dtype DT) = dz'[j] times the factor (fac[j] under
// a softcap, the constant g otherwise).
template <int DT, int TF>
inline void store_scaled(void* out, int64_t c0, int64_t len, int64_t sv, const float* dz,
                         const float* fac, const HeadTf& h) {
  const int64_t nfull = len & ~int64_t(VW - 1);
  if (sv == 1) {
    auto f = [&](int64_t i) { return TF == kTfCap ? loadv<kF32>(fac, i) : splat(h.g); };
    for (int64_t i = 0; i < nfull; i += VW) storev<DT>(out, c0 + i, loadv<kF32>(dz, i) * f(i));
    if (len > nfull) {
      const int64_t cnt = len - nfull;
      const vf fv = TF == kTfCap ? load_tail<kF32>(fac, nfull, cnt, 0.f) : splat(h.g);
      store_tail<DT>(out, c0 + nfull, cnt, load_tail<kF32>(dz, nfull, cnt, 0.f) * fv);
    }
    return;
  }
  for (int64_t j = 0; j < len; ++j)
    store1<DT>(out, (c0 + j) * sv, dz[j] * (TF == kTfCap ? fac[j] : h.g));
}

template <int DT, bool ENT, int TF>
void backward_t(const BwdArgs& A) {
  const View3& x = A.x;
  const View3& o = A.out;
  const int64_t N = x.B * x.T, V = x.V;
#pragma omp parallel num_threads(A.nthreads)
  {
    float buf[kChunk];
    float fbuf[TF == kTfCap ? kChunk : 1];
#pragma omp for schedule(dynamic, 4)
    for (int64_t n = 0; n < N; ++n) {
      const void* in = row_ptr(x, n);
      void* out = const_cast<void*>(row_ptr(o, n));
      const int64_t y = A.labels[n];
      if (y == A.ignore_index) {
        if (o.sv == 1) {
          __builtin_memset(out, 0, V * esize(DT));  // +0.0 is all-zero bits in every dtype
        } else {
          for (int64_t v = 0; v < V; ++v) store1<DT>(out, v * o.sv, 0.f);
        }
        continue;
      }
      const RowGrad g(A.lse[n], A.grad_logp[n], ENT ? A.grad_entropy[n] : 0.f,
                      ENT ? A.entropy[n] : 0.f, ENT);
      const int64_t yl = y - A.label_offset;
      const bool has_y = yl >= 0 && yl < V;
      float zy = has_y ? load1<DT>(in, yl * x.sv) : 0.f;  // read before any write
      float fy = 1.f;  // the label's factor dz'/dz
      if (TF != kTfNone) zy = tf1<TF>(zy, A.tf, &fy);
      for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
        const int64_t len = V - c0 < kChunk ? V - c0 : kChunk;
        if (TF != kTfNone) {  // z' and the factors in L1, dz' over z', then dz = dz' factor
          load_chunk<DT, TF, TF == kTfCap>(in, c0, len, x.sv, buf, fbuf, A.tf);
          chunk_grad<kF32, kF32, ENT>(buf, buf, 0, len, g);
          store_scaled<DT, TF>(out, c0, len, o.sv, buf, fbuf, A.tf);
        } else if (x.sv == 1 && o.sv == 1) {
          // streaming stores where every store of the chunk is aligned (a 64-byte aligned
          // buffer with rows a multiple of 64 bytes long: the common case)
          if (((uintptr_t)out + c0 * esize(DT)) % kStreamAlign<DT> == 0) {
            chunk_grad<DT, DT, ENT, true>(in, out, c0, len, g);
          } else {
            chunk_grad<DT, DT, ENT>(in, out, c0, len, g);
          }
        } else {
          for (int64_t j = 0; j < len; ++j) buf[j] = load1<DT>(in, (c0 + j) * x.sv);
          chunk_grad<kF32, kF32, ENT>(buf, buf, 0, len, g);
          for (int64_t j = 0; j < len; ++j) store1<DT>(out, (c0 + j) * o.sv, buf[j]);
        }
      }
      if (has_y) {  // the label's slot, exactly: G (1 - p_y) with 1 - p_y = -expm1(log p_y)
        const float d = fmax1(zy - g.lse, kDMin);
        const float p = expf(d);
        float gy = -g.G * expm1f(d);
        if (ENT) gy -= g.E * p * (d + g.H);
        if (TF != kTfNone) gy *= fy;
        store1<DT>(out, yl * o.sv, gy);
      }
    }
    store_fence();  // this thread's streaming stores are visible before the region ends
  }
}

template <int DT, bool ENT>
void backward_tf(const BwdArgs& A) {
  switch (A.tf.kind) {
    case kTfScale: return backward_t<DT, ENT, kTfScale>(A);
    case kTfCap: return backward_t<DT, ENT, kTfCap>(A);
    default: return backward_t<DT, ENT, kTfNone>(A);
  }
}

void backward(const BwdArgs& A) {
  const bool ent = A.grad_entropy != nullptr;
  switch (A.x.dtype) {
    case kF32: return ent ? backward_tf<kF32, true>(A) : backward_tf<kF32, false>(A);
    case kBF16: return ent ? backward_tf<kBF16, true>(A) : backward_tf<kBF16, false>(A);
    default: return ent ? backward_tf<kF16, true>(A) : backward_tf<kF16, false>(A);
  }
}

// ---- exp, exposed for the accuracy test ---------------------------------------------------

// variant 0: vexp; 1: the kernels' kexp; 2: kexp16 (unscaled). 1 and 2 clamp the inputs to
// the domain the kernels give them: [kDMin, kSpecMax] for kexp (the one-sweep forward takes
// it above 0), [kDMin, 0] for kexp16.
void exp_f32(const float* x, float* y, int64_t n, int variant) {
  const int64_t nfull = n & ~int64_t(VW - 1);
  auto f = [variant](vf v) {
    if (variant == 0) return vexp(v);
    v = clamp_lo(v, splat(kDMin));
    const vf hi = splat(variant == 1 ? kSpecMax : 0.f);
    v = v > hi ? hi : v;
    return variant == 1 ? kexp(v) : kexp16(v, kExp16);
  };
  for (int64_t i = 0; i < nfull; i += VW) storev<kF32>(y, i, f(loadv<kF32>(x, i)));
  if (n > nfull)
    store_tail<kF32>(y, nfull, n - nfull, f(load_tail<kF32>(x, nfull, n - nfull, 0.f)));
}

}  // namespace
}  // namespace CPO_NS
}  // namespace cpo
