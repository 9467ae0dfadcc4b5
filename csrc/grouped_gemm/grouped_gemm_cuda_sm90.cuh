// The sm90 grouped GEMM family: CUTLASS 3.x GemmUniversal over a GroupProblemShape whose shapes live
// only on the device (the host passes no copy of them): a persistent, warp-specialized cooperative
// kernel (one producer warp group issuing TMA loads, two consumer warp groups issuing wgmma), with each
// group's TMA descriptors rewritten on the device. Instantiated per element type by
// grouped_gemm_sm90_*.cu, and only when the build targets sm_90a (MOMOE_CUDA_SM90A); the kernel body
// itself is compiled for sm_90a only (CUTLASS leaves it empty for other architectures).
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include "grouped_gemm/grouped_gemm_cuda_problems.cuh"

namespace momoe {
namespace cutlass_gemm {

template <typename Element>
struct Sm90 {
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // TMA: 16-byte rows
  using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K) per group
  using Shape = typename ProblemShape::UnderlyingProblemShape;
  // 256 x 128 x 64 tiles (each consumer warp group owns 128 x 128), clusters of two CTAs along N that
  // share the A tile through TMA multicast.
  using TileShape = cute::Shape<cute::_256, cute::_128, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;

  // D = alpha * accumulator, no source matrix C (ElementC = void).
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor*, kAlignment,
      Element, cutlass::layout::RowMajor*, kAlignment, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void>>::CollectiveOp;

  template <class LayoutA, class LayoutB>
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element, LayoutB*,
      kAlignment, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  template <class LayoutA, class LayoutB>
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop<LayoutA, LayoutB>, Epilogue>;

  template <class LayoutA, class LayoutB>
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel<LayoutA, LayoutB>>;

  // Per-group problem shapes, operand pointers and strides, as the grouped kernel takes them.
  template <class LayoutA, class LayoutB>
  struct Arrays {
    using StrideA = typename Kernel<LayoutA, LayoutB>::InternalStrideA;
    using StrideB = typename Kernel<LayoutA, LayoutB>::InternalStrideB;
    using StrideD = typename Kernel<LayoutA, LayoutB>::InternalStrideD;
    Arrays(cuda::Carver& carver, int64_t G)
        : problems(carver.take<Shape>(G)),
          a(carver.take<const Element*>(G)),
          b(carver.take<const Element*>(G)),
          d(carver.take<Element*>(G)),
          stride_a(carver.take<StrideA>(G)),
          stride_b(carver.take<StrideB>(G)),
          stride_d(carver.take<StrideD>(G)) {}
    Shape* problems;
    const Element** a;
    const Element** b;
    Element** d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
  };

  template <class LayoutA, class LayoutB>
  struct Writer {
    using A = Arrays<LayoutA, LayoutB>;
    Writer(const A& arrays, const Problem& problem)
        : arrays(arrays),
          a(static_cast<const Element*>(problem.a)),
          b(static_cast<const Element*>(problem.b)),
          d(static_cast<Element*>(problem.d)) {}
    // Every operand is packed (its leading dimension is its row length), so CUTLASS's packed strides of
    // the (M, K), (N, K) and (M, N) shapes are the strides of group_gemm.
    __device__ void operator()(int64_t g, const GroupGemm& p) const {
      arrays.problems[g] = Shape(p.m, p.n, p.k);
      arrays.a[g] = a + p.a_offset;
      arrays.b[g] = b + p.b_offset;
      arrays.d[g] = d + p.d_offset;
      arrays.stride_a[g] = cutlass::make_cute_packed_stride(typename A::StrideA{}, cute::make_shape(p.m, p.k, 1));
      arrays.stride_b[g] = cutlass::make_cute_packed_stride(typename A::StrideB{}, cute::make_shape(p.n, p.k, 1));
      arrays.stride_d[g] = cutlass::make_cute_packed_stride(typename A::StrideD{}, cute::make_shape(p.m, p.n, 1));
    }
    A arrays;
    const Element* a;
    const Element* b;
    Element* d;
  };

  template <class LayoutA, class LayoutB>
  static typename Gemm<LayoutA, LayoutB>::Arguments arguments(const Problem& problem,
                                                              const Arrays<LayoutA, LayoutB>& arrays) {
    using Args = typename Gemm<LayoutA, LayoutB>::Arguments;
    decltype(Args{}.epilogue.thread) fusion;
    fusion.alpha = 1.0f;
    fusion.beta = 0.0f;
    cutlass::KernelHardwareInfo hw_info;
    hw_info.device_id = problem.device;
    hw_info.sm_count = problem.sm_count;
    return Args{cutlass::gemm::GemmUniversalMode::kGrouped,
                {static_cast<int>(problem.G), arrays.problems, nullptr},
                {arrays.a, arrays.stride_a, arrays.b, arrays.stride_b},
                {fusion, nullptr, nullptr, arrays.d, arrays.stride_d},
                hw_info};
  }

  // Room for the per-SM TMA descriptors that the kernel rewrites for each group.
  template <class LayoutA, class LayoutB>
  static size_t gemm_workspace_bytes(const Problem& problem) {
    cuda::Carver carver(nullptr);
    const Arrays<LayoutA, LayoutB> arrays(carver, problem.G);
    return Gemm<LayoutA, LayoutB>::get_workspace_size(arguments(problem, arrays));
  }

  template <class LayoutA, class LayoutB>
  static const char* gemm(const Problem& problem, const Arrays<LayoutA, LayoutB>& arrays, void* workspace,
                          cudaStream_t stream) {
    Gemm<LayoutA, LayoutB> gemm_op;
    const auto args = arguments(problem, arrays);
    cutlass::Status status = gemm_op.can_implement(args);
    if (status == cutlass::Status::kSuccess) status = gemm_op.initialize(args, workspace, stream);
    if (status == cutlass::Status::kSuccess) status = gemm_op.run(stream);
    return status == cutlass::Status::kSuccess ? nullptr : failure(cutlassGetStatusString(status));
  }
};

// The Launcher of element type Element (used by grouped_gemm_sm90_*.cu).
template <typename Element>
constexpr Launcher sm90_launcher() {
  return {&workspace_bytes<Sm90<Element>>, &run<Sm90<Element>>};
}

}  // namespace cutlass_gemm
}  // namespace momoe
