// The sm80 grouped GEMM family: CUTLASS 2.x GemmGrouped (mma.sync tensor cores, cp.async multistage
// mainloop), scheduled on the device from the problem sizes in device memory (kDeviceOnly), so nothing
// about the groups is read on the host. Instantiated per element type by grouped_gemm_sm80_*.cu.
#pragma once
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm_grouped.h>
#include <cutlass/gemm/kernel/default_gemm_grouped.h>

#include <atomic>

#include "grouped_gemm/grouped_gemm_cuda_problems.cuh"

namespace momoe {
namespace cutlass_gemm {

// Tiles of the 16-bit kernels (bf16 / fp16 in, fp32 accumulation): 128 x 128 x 32 threadblock tiles of
// four 64 x 64 warps, 4 stages (64 KiB of shared memory).
template <typename Element>
struct Sm80Tiles {
  using Threadblock = cutlass::gemm::GemmShape<128, 128, 32>;
  using Warp = cutlass::gemm::GemmShape<64, 64, 32>;
  using Instruction = cutlass::gemm::GemmShape<16, 8, 16>;
  static constexpr int kStages = 4;
  using Operator = cutlass::arch::OpMultiplyAdd;
};

// fp32 through 3xTF32 (OpMultiplyAddFastF32): a = big + small with both parts TF32, and
// a*b ~ big_a*big_b + big_a*small_b + small_a*big_b, which keeps fp32 accuracy. The split operands
// double the registers per warp tile, hence the smaller 128 x 64 x 16 tiles of four 64 x 32 warps.
template <>
struct Sm80Tiles<float> {
  using Threadblock = cutlass::gemm::GemmShape<128, 64, 16>;
  using Warp = cutlass::gemm::GemmShape<64, 32, 16>;
  using Instruction = cutlass::gemm::GemmShape<16, 8, 8>;
  static constexpr int kStages = 4;
  using Operator = cutlass::arch::OpMultiplyAddFastF32;
};

template <typename Element>
struct Sm80 {
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte accesses
  using Tiles = Sm80Tiles<Element>;
  // D = alpha * accumulator: C is never read.
  using Epilogue = cutlass::epilogue::thread::LinearCombination<Element, kAlignment, float, float,
                                                                cutlass::epilogue::thread::ScaleType::OnlyAlphaScaling>;

  template <class LayoutA, class LayoutB>
  using Gemm = cutlass::gemm::device::GemmGrouped<typename cutlass::gemm::kernel::DefaultGemmGrouped<
      Element, LayoutA, cutlass::ComplexTransform::kNone, kAlignment, Element, LayoutB,
      cutlass::ComplexTransform::kNone, kAlignment, Element, cutlass::layout::RowMajor, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, typename Tiles::Threadblock, typename Tiles::Warp,
      typename Tiles::Instruction, Epilogue, cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle,
      Tiles::kStages, cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly, typename Tiles::Operator>::GemmKernel>;

  // Per-group problem sizes, operand pointers and leading dimensions, as GemmGrouped takes them.
  template <class LayoutA, class LayoutB>
  struct Arrays {
    Arrays(cuda::Carver& carver, int64_t G)
        : problems(carver.take<cutlass::gemm::GemmCoord>(G)),
          a(carver.take<Element*>(G)),
          b(carver.take<Element*>(G)),
          d(carver.take<Element*>(G)),
          lda(carver.take<int64_t>(G)),
          ldb(carver.take<int64_t>(G)),
          ldd(carver.take<int64_t>(G)) {}
    cutlass::gemm::GemmCoord* problems;
    Element** a;
    Element** b;
    Element** d;
    int64_t* lda;
    int64_t* ldb;
    int64_t* ldd;
  };

  template <class LayoutA, class LayoutB>
  struct Writer {
    Writer(const Arrays<LayoutA, LayoutB>& arrays, const Problem& problem)
        : arrays(arrays),
          a(static_cast<Element*>(const_cast<void*>(problem.a))),
          b(static_cast<Element*>(const_cast<void*>(problem.b))),
          d(static_cast<Element*>(problem.d)) {}
    __device__ void operator()(int64_t g, const GroupGemm& p) const {
      arrays.problems[g] = cutlass::gemm::GemmCoord(p.m, p.n, p.k);
      arrays.a[g] = a + p.a_offset;
      arrays.b[g] = b + p.b_offset;
      arrays.d[g] = d + p.d_offset;
      arrays.lda[g] = p.lda;
      arrays.ldb[g] = p.ldb;
      arrays.ldd[g] = p.ldd;
    }
    Arrays<LayoutA, LayoutB> arrays;
    Element* a;
    Element* b;
    Element* d;
  };

  template <class LayoutA, class LayoutB>
  static size_t gemm_workspace_bytes(const Problem&) {
    return 0;  // kDeviceOnly scheduling needs no workspace
  }

  // A full wave of the persistent kernel (blocks per SM at full occupancy x SMs), computed once per
  // device: it queries the occupancy and sets the kernel's shared-memory limit.
  template <class LayoutA, class LayoutB>
  static int threadblock_count(int device) {
    constexpr int kMaxDevices = 64;
    static std::atomic<int> counts[kMaxDevices] = {};
    if (device < 0 || device >= kMaxDevices) return Gemm<LayoutA, LayoutB>::sufficient();
    int count = counts[device].load(std::memory_order_relaxed);
    if (count <= 0) {
      count = Gemm<LayoutA, LayoutB>::sufficient();
      counts[device].store(count, std::memory_order_relaxed);
    }
    return count;
  }

  template <class LayoutA, class LayoutB>
  static const char* gemm(const Problem& problem, const Arrays<LayoutA, LayoutB>& arrays, void*, cudaStream_t stream) {
    using G = Gemm<LayoutA, LayoutB>;
    const int blocks = threadblock_count<LayoutA, LayoutB>(problem.device);
    if (blocks <= 0) return failure("the sm80 CUTLASS kernel cannot run on this device (occupancy 0)");
    typename G::Arguments args(arrays.problems, static_cast<int>(problem.G), blocks, typename Epilogue::Params(1.0f),
                               arrays.a, arrays.b, arrays.d, arrays.d, arrays.lda, arrays.ldb, arrays.ldd, arrays.ldd);
    G gemm_op;
    cutlass::Status status = gemm_op.initialize(args, nullptr, stream);
    if (status == cutlass::Status::kSuccess) status = gemm_op.run(stream);
    return status == cutlass::Status::kSuccess ? nullptr : failure(cutlassGetStatusString(status));
  }
};

// The Launcher of element type Element (used by grouped_gemm_sm80_*.cu).
template <typename Element>
constexpr Launcher sm80_launcher() {
  return {&workspace_bytes<Sm80<Element>>, &run<Sm80<Element>>};
}

}  // namespace cutlass_gemm
}  // namespace momoe
