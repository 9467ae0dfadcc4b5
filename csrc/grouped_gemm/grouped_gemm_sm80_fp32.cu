// Grouped GEMM: the sm80 kernels for float32, through 3xTF32 (see grouped_gemm_cuda_sm80.cuh).
#include <cutlass/numeric_types.h>

#include "grouped_gemm/grouped_gemm_cuda_sm80.cuh"

namespace momoe {
namespace cutlass_gemm {

const Launcher kSm80Float32 = sm80_launcher<float>();

}  // namespace cutlass_gemm
}  // namespace momoe
