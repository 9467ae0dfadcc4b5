// Torch-free bfloat16 helpers shared by the kernel cores.
//
// A kernel core is a template over its element type T (float, c10::BFloat16 / c10::Half from the
// glue, or the C++ tests' own types). Specialise is_bfloat16 to std::true_type for a bfloat16 type
// (2 bytes, the top half of an fp32; common/c10_types.h does it for c10::BFloat16): its values are
// then converted with plain integer ops on the bits, which vectorize (the conversions of
// c10::BFloat16 go through a NaN branch). Rounding is to nearest even, NaN stays NaN, like
// c10::BFloat16.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

// MOMOE_CPU_CLONES before a row loop compiles it three times, for AVX-512, for AVX2 + FMA and for
// the baseline, and lets the loader pick the one this CPU runs (GCC's target_clones, an ifunc:
// Linux on x86-64; elsewhere the loop is compiled once for the baseline).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define MOMOE_CPU_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define MOMOE_CPU_CLONES
#endif

namespace momoe {

template <typename T>
struct is_bfloat16 : std::false_type {};

// p[i] as fp32.
template <typename T>
inline float load_float(const T* p, int64_t i) {
  if constexpr (is_bfloat16<T>::value) {
    static_assert(sizeof(T) == 2, "bfloat16 types must be 2 bytes");
    uint16_t bits;
    std::memcpy(&bits, reinterpret_cast<const char*>(p) + 2 * i, 2);
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else {
    return static_cast<float>(p[i]);
  }
}

// p[i] = f, rounded to T.
template <typename T>
inline void store_float(T* p, int64_t i, float f) {
  if constexpr (is_bfloat16<T>::value) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint16_t bits = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    bits = (f != f) ? static_cast<uint16_t>(0x7FC0) : bits;
    std::memcpy(reinterpret_cast<char*>(p) + 2 * i, &bits, 2);
  } else {
    p[i] = T(f);
  }
}

}  // namespace momoe
