// Torch-free fp32 math written so that GCC auto-vectorizes loops calling it: every function is
// branch-free (selects only), uses no libm calls and reinterprets bits with memcpy.
//
// The functions live in momoe::<MOMOE_ISA_NS>::simd. A translation unit compiled for one
// instruction set (e.g. under `#pragma GCC target("avx512f,...")`) defines MOMOE_ISA_NS to a
// name of its own before including this header, so that the inline functions of different
// instruction sets never merge at link time (which would run AVX-512 code on CPUs without it).
#pragma once
#include <cstdint>
#include <cstring>

#ifndef MOMOE_ISA_NS
#define MOMOE_ISA_NS generic
#endif

namespace momoe {
namespace MOMOE_ISA_NS {
namespace simd {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// exp(x) for the hot loops: Cody-Waite range reduction x = k*ln2 + r, |r| <= ln2/2, and a degree-7
// polynomial for exp(r) (Cephes' expf coefficients), within 2 ulp, with the argument clamped to
// [log(FLT_MIN), 88.3] (so x -> -inf gives FLT_MIN ~ 1.2e-38 instead of 0 and x > 88.3
// gives exp(88.3)); NaN propagates. The clamps compile to a min and a max, with no selects.
inline float exp_clamped(float x) {
  const float hi = 88.3f;
  const float lo = -87.33654475f;
  float xc = x > hi ? hi : x;    // minps(hi, x): keeps a NaN x
  xc = lo > xc ? lo : xc;        // maxps(lo, xc)
  const float magic = 12582912.0f;
  float t = xc * 1.44269504088896341f + magic;
  float k = t - magic;
  int32_t ki = static_cast<int32_t>(float_to_bits(t)) - static_cast<int32_t>(0x4B400000u);
  float r = xc - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return p * bits_to_float(static_cast<uint32_t>(ki + 127) << 23);
}

// exp(x): exp_clamped without the clamps' effect at the ends: results below the smallest normal
// float flush to 0 and x > 88.3 gives +inf (exp(88.3) is ~2.2e38); NaN propagates.
inline float exp(float x) {
  float y = exp_clamped(x);
  y = x > 88.3f ? bits_to_float(0x7F800000u) : y;
  y = x < -87.33654475f ? 0.0f : y;
  return y;
}

#if defined(MOMOE_SCAN_AVX512)
// 2^t of 16 lanes with AVX-512 (the caller includes <immintrin.h> and compiles for AVX-512):
// t clamped to [-126, 127.39] (the exponents of exp_clamped's range), t = k + f with k an integer
// and |f| <= 1/2, a degree-6 polynomial for 2^f (near-minimax, fitted for this range: within
// 1 ulp), and the 2^k scaling by vscalefps. NaN propagates (min/max return their second operand
// for a NaN). exp(x) as 2^(x log2 e), as mamba-ssm's CUDA kernels do, rounds x log2 e first: a
// relative error of about |x| * 6e-8.
inline __m512 exp2_16(__m512 t) {
  t = _mm512_min_ps(_mm512_set1_ps(127.39f), t);
  t = _mm512_max_ps(_mm512_set1_ps(-126.0f), t);
  const __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, k);
  __m512 p = _mm512_set1_ps(1.534581097e-04f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339993090e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618489072e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550328642e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264625e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471825e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

constexpr float kLog2e = 1.44269504088896341f;

// sigmoid(x) and x * sigmoid(x) of 16 lanes.
inline __m512 sigmoid16(__m512 x) {
  const __m512 e = exp2_16(_mm512_mul_ps(x, _mm512_set1_ps(-kLog2e)));
  return _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

inline __m512 silu16(__m512 x) { return _mm512_mul_ps(x, sigmoid16(x)); }

// 1 / d of 16 lanes: rcp14 and one Newton step (relative error ~2^-28).
inline __m512 recip16(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_fmadd_ps(_mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.0f)), r, r);
}

// mamba-ssm's softplus of 16 lanes as max(x, 0) + log1p(e), e = exp(-|x|) in (0, 1] (returned in
// *e for the caller's sigmoid). log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3, by its odd series
// to s^13 (relative error < 2e-8): no rounding of 1 + e, no division.
inline __m512 softplus16(__m512 x, __m512* e) {
  const __m512 ax = _mm512_andnot_ps(_mm512_set1_ps(-0.0f), x);
  *e = exp2_16(_mm512_mul_ps(ax, _mm512_set1_ps(-kLog2e)));
  const __m512 sv = _mm512_mul_ps(*e, recip16(_mm512_add_ps(_mm512_set1_ps(2.0f), *e)));
  const __m512 s2 = _mm512_mul_ps(sv, sv);
  __m512 p = _mm512_set1_ps(1.0f / 13.0f);
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 11.0f));
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 9.0f));
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 7.0f));
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 5.0f));
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 3.0f));
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f));
  const __m512 log1p_e = _mm512_mul_ps(_mm512_add_ps(sv, sv), p);
  return _mm512_add_ps(_mm512_max_ps(x, _mm512_setzero_ps()), log1p_e);
}
#endif

// Natural log for x >= FLT_MIN (Cephes' logf polynomial): within 2 ulp.
inline float log(float x) {
  uint32_t ix = float_to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>((ix >> 23) & 0xFFu) - 126);
  float m = bits_to_float((ix & 0x007FFFFFu) | 0x3F000000u);  // in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  // Both arms are computed before selecting: GCC does not if-convert arms that may trap.
  const float e_small = e - 1.0f;
  const float f_small = m + m - 1.0f;
  const float f_big = m - 1.0f;
  e = small ? e_small : e;
  float f = small ? f_small : f_big;
  float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  float res = f + y;
  res = res + e * 0.693359375f;
  return res;
}

// log(1 + x) for x >= 0, accurate also for tiny x (the log(u) * x / (u - 1) correction).
inline float log1p_pos(float x) {
  float u = 1.0f + x;
  float d = u - 1.0f;
  float l = log(u);
  float dsafe = d == 0.0f ? 1.0f : d;
  float corrected = l * (x / dsafe);
  return d == 0.0f ? x : corrected;
}

// mamba-ssm's softplus, log1p(exp(x)) and x itself when x > 20, computed as
// max(x, 0) + log1p(exp(-|x|)): the same function (above 20 the second term is below half an ulp
// of x), without a select between two expensive arms (which GCC turns into a branch).
// GCC 12 does not if-convert exp feeding log inside one loop body, so vectorized callers split it
// in two loops: e[i] = softplus_exp(x[i]); then y[i] = softplus_finish(x[i], e[i]).
inline float softplus_exp(float x) { return exp_clamped(x < 0.0f ? x : -x); }
inline float softplus_finish(float x, float e) { return (x > 0.0f ? x : 0.0f) + log1p_pos(e); }
inline float softplus(float x) { return softplus_finish(x, softplus_exp(x)); }
// sigmoid(x) from e = softplus_exp(x) = exp(-|x|).
inline float sigmoid_from(float x, float e) {
  const float r = 1.0f / (1.0f + e);
  const float re = e * r;
  return x >= 0.0f ? r : re;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp(-x)); }

inline float silu(float x) { return x * sigmoid(x); }

}  // namespace simd
}  // namespace MOMOE_ISA_NS
}  // namespace momoe
