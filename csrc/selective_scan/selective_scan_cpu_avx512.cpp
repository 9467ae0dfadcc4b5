// The selective-scan kernels compiled for AVX-512 (selected at run time by selective_scan_cpu.cpp).
// Everything lives in momoe::avx512::scan, so nothing merges with the other instruction sets.
#include <cstdint>
#include <cstring>

#include <immintrin.h>

#include "common/c10_types.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
// GCC 12's AVX-512 headers self-initialise a dummy operand (`__m512 __Y = __Y;`) in min/max/
// roundscale/scalef, which -Wmaybe-uninitialized reports at every use.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define MOMOE_ISA_NS avx512
#define MOMOE_SCAN_AVX512 1
#include "selective_scan/selective_scan_kernel.h"

namespace momoe {
namespace avx512 {
namespace scan {
#define MOMOE_SCAN_INSTANTIATE(T)                                                                      \
  template void fwd_tasks<T>(const ScanArgs<T>&, const FwdOut<T>&, int64_t, int64_t, float*);         \
  template void bwd_tasks<T>(const ScanArgs<T>&, const BwdOut<T>&, int64_t, int64_t, float*);
MOMOE_SCAN_INSTANTIATE(float)
MOMOE_SCAN_INSTANTIATE(c10::BFloat16)
MOMOE_SCAN_INSTANTIATE(c10::Half)
}  // namespace scan
}  // namespace avx512
}  // namespace momoe
#pragma GCC pop_options
#endif
