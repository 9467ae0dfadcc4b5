// Decode-step kernel of the CUDA selective scan: for every (batch, channel) row, a group of `group`
// lanes (a power of two <= 32) shares the N states, kStepStates consecutive states per lane and round;
// the state is updated in place and y is summed over the group with shuffles.
#pragma once
#include <type_traits>

#include "selective_scan/selective_scan_cuda_common.cuh"

namespace momoe {
namespace scan_cuda {

constexpr int kStepThreads = 256;
constexpr int kStepStates = 4;

template <typename T, typename S, typename W>
__global__ void __launch_bounds__(kStepThreads) selective_state_update_kernel(const StepArgs a, int group) {
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * kStepThreads + threadIdx.x;
  const int64_t row = gid / group;  // b * dim + d
  const int lane = static_cast<int>(gid % group);
  const bool live = row < a.batch * a.dim;
  const int N = static_cast<int>(a.N);
  float y = 0.0f, x = 0.0f;
  int64_t b = 0, d = 0, m = 0;
  if (live) {
    b = row / a.dim;
    d = row % a.dim;
    const int64_t g = d / (a.dim / a.G);
    m = a.modality != nullptr ? min(max(a.modality[b], 0), static_cast<int>(a.M) - 1) : 0;
    float dt = to_float(static_cast<const T*>(a.dt)[b * a.sdt_b + d * a.sdt_d]);
    if (a.dt_bias != nullptr) dt += a.dt_bias[m * a.dim + d];
    if (a.softplus) dt = softplus(dt);
    x = to_float(static_cast<const T*>(a.x)[b * a.sx_b + d * a.sx_d]);
    const float dtx = dt * x;
    const float* A = a.A + (m * a.dim + d) * N;
    const W* B = static_cast<const W*>(a.B) + b * a.sB_b + g * a.sB_g;
    const W* C = static_cast<const W*>(a.C) + b * a.sC_b + g * a.sC_g;
    S* st = static_cast<S*>(a.state) + row * N;
    // fp32 states four at a time when every row starts 16-byte aligned.
    const bool vec = std::is_same<S, float>::value && N % kStepStates == 0 && aligned<16>(a.state);
    for (int n0 = lane * kStepStates; n0 < N; n0 += group * kStepStates) {
      float h[kStepStates];
      if (vec) {
        const float4 v = *reinterpret_cast<const float4*>(st + n0);
        h[0] = v.x, h[1] = v.y, h[2] = v.z, h[3] = v.w;
      } else {
#pragma unroll
        for (int k = 0; k < kStepStates; ++k) h[k] = n0 + k < N ? to_float(st[n0 + k]) : 0.0f;
      }
#pragma unroll
      for (int k = 0; k < kStepStates; ++k) {
        const int n = n0 + k < N ? n0 + k : N - 1;  // past N: computed, never stored
        h[k] = exp2_approx(dt * A[n] * kLog2e) * h[k] + dtx * to_float(B[n * a.sB_n]);
        if (n0 + k < N) y += h[k] * to_float(C[n * a.sC_n]);
      }
      if (vec) {
        *reinterpret_cast<float4*>(st + n0) = make_float4(h[0], h[1], h[2], h[3]);
      } else {
#pragma unroll
        for (int k = 0; k < kStepStates; ++k)
          if (n0 + k < N) st[n0 + k] = from_float<S>(h[k]);
      }
    }
  }
  for (int off = group / 2; off > 0; off /= 2) y += __shfl_xor_sync(kFullMask, y, off, group);
  if (live && lane == 0) {
    if (a.D != nullptr) y += a.D[m * a.dim + d] * x;
    if (a.z != nullptr) {
      const float zv = to_float(static_cast<const T*>(a.z)[b * a.sz_b + d * a.sz_d]);
      y *= zv * sigmoid(zv);
    }
    static_cast<T*>(a.y)[row] = from_float<T>(y);
  }
}

}  // namespace scan_cuda
}  // namespace momoe
