// Device-side helpers shared by momoe's CUDA kernels (torch-free; include from .cu files only).
#pragma once
#include <assert.h>  // declares __assert_fail for device code
#include <cuda_runtime.h>

#include <cstdint>

#if defined(NDEBUG)
// <assert.h> declares glibc's __assert_fail only without NDEBUG, and CUDA's own device declaration is
// seen only by the device passes; declared here exactly as glibc does, for the host pass.
extern "C" {
#if defined(__CUDA_ARCH__)
__host__ __device__
#endif
    void
    __assert_fail(const char* assertion, const char* file, unsigned int line, const char* function) noexcept
    __attribute__((__noreturn__));
}
#endif

// Validation of ids and sizes on the device, without a host synchronisation: when `cond` is false the
// kernel fails a device-side assertion with `message` (a string literal naming the op and the argument).
// The kernel stops, nothing later on the stream runs, and the host sees cudaErrorAssert
// ("device-side assert triggered") at its next synchronising call, as with PyTorch's own indexing kernels;
// the message is printed by the CUDA runtime. Active whatever NDEBUG says.
#define MOMOE_DEVICE_CHECK(cond, message)                        \
  do {                                                           \
    if (!(cond)) __assert_fail(message, __FILE__, __LINE__, __func__); \
  } while (0)

namespace momoe {
namespace cuda {

constexpr int kWarpSize = 32;

inline __host__ __device__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline __host__ __device__ int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// True when `p` is a multiple of `bytes` (a power of two).
inline __host__ __device__ bool is_aligned(const void* p, int64_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & static_cast<uintptr_t>(bytes - 1)) == 0;
}

// Hands out consecutive 256-byte aligned slices of a device workspace; with a null base it only adds up
// the bytes, so a size query and the run that follows carve the same way.
class Carver {
 public:
  explicit Carver(void* base) : base_(reinterpret_cast<uintptr_t>(base)) {}

  template <typename T>
  T* take(int64_t count) {
    T* slice = reinterpret_cast<T*>(base_ + used_);
    used_ += static_cast<size_t>(round_up(count * static_cast<int64_t>(sizeof(T)), 256));
    return slice;
  }
  // The rest of the workspace, after the slices taken so far.
  void* rest() const { return reinterpret_cast<void*>(base_ + used_); }
  size_t used() const { return used_; }

 private:
  uintptr_t base_;
  size_t used_ = 0;
};

}  // namespace cuda
}  // namespace momoe
