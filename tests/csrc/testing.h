// Minimal test helpers for the torch-free C++ kernel tests (run by ctest).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace momoe_test {

inline int& failures() {
  static int count = 0;
  return count;
}

#define EXPECT_TRUE(cond)                                                   \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
      ++momoe_test::failures();                                             \
    }                                                                       \
  } while (0)

// Element-wise |a - b| <= atol + rtol * |b|; reports the first mismatch.
inline bool all_close(const float* a, const float* b, size_t n, float atol, float rtol, const char* what) {
  for (size_t i = 0; i < n; ++i) {
    if (!(std::fabs(a[i] - b[i]) <= atol + rtol * std::fabs(b[i]))) {
      std::fprintf(stderr, "%s: mismatch at %zu: %g vs %g\n", what, i, a[i], b[i]);
      ++failures();
      return false;
    }
  }
  return true;
}

inline std::vector<float> randn(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

// A bfloat16 stand-in (round to nearest even) to instantiate the kernels like c10::BFloat16 does.
struct bf16 {
  uint16_t bits = 0;
  bf16() = default;
  bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    bits = static_cast<uint16_t>(u >> 16);
  }
  operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

inline int report(const char* name) {
  if (failures() == 0) {
    std::printf("%s: all checks passed\n", name);
    return 0;
  }
  std::printf("%s: %d check(s) failed\n", name, failures());
  return 1;
}

}  // namespace momoe_test
