// Input validation shared by the torch glue of every op (TORCH_CHECK before touching memory).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/FunctionRef.h>

namespace momoe {

// A backend's device check of one named input (check_cpu, or a CUDA glue's check), which the checks
// shared by an op's CPU and CUDA glue (csrc/<op>/<op>_checks.h) take from each glue.
using DeviceCheck = c10::function_ref<void(const at::Tensor&, const char*)>;

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "momoe: ", name, " must be a CPU tensor, got device ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, "momoe: ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

inline void check_float(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, "momoe: ", name,
              " must be float32, bfloat16 or float16, got ", s);
}

// Group / modality / row ids: any integer dtype.
inline void check_index(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kByte || s == at::kChar || s == at::kShort || s == at::kInt || s == at::kLong,
              "momoe: ", name, " must be an integer tensor (int8/uint8/int16/int32/int64), got ", s);
}

inline void check_same_device(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb) {
  TORCH_CHECK(a.device() == b.device(), "momoe: ", na, " and ", nb, " must be on the same device, got ",
              a.device(), " and ", b.device());
}

}  // namespace momoe
