// Grouped GEMM: the sm90a kernels for bfloat16 (see grouped_gemm_cuda_sm90.cuh). Without MOMOE_CUDA_SM90A
// (the build does not target 9.0a) the launcher is empty and Hopper GPUs run the sm80 kernels.
#include "grouped_gemm/grouped_gemm_cuda_kernel.h"

#if defined(MOMOE_CUDA_SM90A)
#include <cutlass/arch/config.h>
#endif
#if defined(MOMOE_CUDA_SM90A) && defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#define MOMOE_BUILD_SM90_KERNELS 1
#include <cutlass/bfloat16.h>

#include "grouped_gemm/grouped_gemm_cuda_sm90.cuh"
#endif

namespace momoe {
namespace cutlass_gemm {

#if defined(MOMOE_BUILD_SM90_KERNELS)
const Launcher kSm90BFloat16 = sm90_launcher<cutlass::bfloat16_t>();
#else
const Launcher kSm90BFloat16 = {nullptr, nullptr};
#endif

}  // namespace cutlass_gemm
}  // namespace momoe
