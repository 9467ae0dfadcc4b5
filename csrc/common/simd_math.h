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

// exp(x) with Cody-Waite range reduction x = k*ln2 + r, |r| <= ln2/2, and a degree-7 polynomial
// for exp(r) (Cephes' expf coefficients): within 2 ulp for results in the normal range.
// Results below the smallest normal float flush to 0; x > 88.3 gives +inf (exp(88.3) is ~2.2e38);
// NaN propagates.
inline float exp(float x) {
  const float hi = 88.3f;
  const float lo = -87.33654475f;  // log(FLT_MIN)
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // k = round(x / ln2) by the 1.5 * 2^23 trick (exact for |k| < 2^22).
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
  float scale = bits_to_float(static_cast<uint32_t>(ki + 127) << 23);
  float y = p * scale;
  y = x > hi ? bits_to_float(0x7F800000u) : y;
  y = x < lo ? 0.0f : y;
  return y;
}

// Natural log for x >= FLT_MIN (Cephes' logf polynomial): within 2 ulp.
inline float log(float x) {
  uint32_t ix = float_to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>((ix >> 23) & 0xFFu) - 126);
  float m = bits_to_float((ix & 0x007FFFFFu) | 0x3F000000u);  // in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  float f = small ? (m + m - 1.0f) : (m - 1.0f);
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
  return d == 0.0f ? x : l * (x / dsafe);
}

// mamba-ssm's softplus: log1p(exp(x)), and x itself when x > 20.
inline float softplus(float x) {
  float xs = x > 20.0f ? 20.0f : x;
  float s = log1p_pos(exp(xs));
  return x > 20.0f ? x : s;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp(-x)); }

inline float silu(float x) { return x * sigmoid(x); }

}  // namespace simd
}  // namespace MOMOE_ISA_NS
}  // namespace momoe
