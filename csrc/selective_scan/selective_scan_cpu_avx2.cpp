// The selective-scan kernels compiled for AVX2 (selected at run time by selective_scan_cpu.cpp).
// Everything lives in momoe::avx2::scan, so nothing merges with the other instruction sets.
#include <cstdint>
#include <cstring>

#include "common/c10_types.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define MOMOE_ISA_NS avx2
#include "selective_scan/selective_scan_kernel.h"

namespace momoe {
namespace avx2 {
namespace scan {
#define MOMOE_SCAN_INSTANTIATE(T)                                                                      \
  template void fwd_tasks<T>(const ScanArgs<T>&, const FwdOut<T>&, int64_t, int64_t, float*);         \
  template void bwd_tasks<T>(const ScanArgs<T>&, const BwdOut<T>&, int64_t, int64_t, float*);
MOMOE_SCAN_INSTANTIATE(float)
MOMOE_SCAN_INSTANTIATE(c10::BFloat16)
MOMOE_SCAN_INSTANTIATE(c10::Half)
}  // namespace scan
}  // namespace avx2
}  // namespace momoe
#pragma GCC pop_options
#endif
