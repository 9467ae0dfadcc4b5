// Dtype and shape checks of the selective scan's inputs, shared by the CPU glue (selective_scan_cpu.cpp)
// and the CUDA glue (selective_scan_cuda.cpp) so that both backends raise the same messages, plus the
// small tensor helpers both use. Each glue passes its own device check in (it runs on every input first,
// in argument order); the range check of modality ids and the preparation of the kernels' operands stay
// in the glue.
//
// Shapes: u, delta, z, dout `(batch, dim, L)`; B, C `(batch, N, L)` or `(batch, G, N, L)`;
// A `(dim, N)`, D and delta_bias `(dim,)`, or with modality `(batch, L)`: A `(M, dim, N)`, D and delta_bias
// `(M, dim)`; initial_state, dlast_state `(batch, dim, N)`; chunk_states `(batch, dim, ceil(L / chunk), N)`.
// The decode step drops L: x, dt, z `(batch, dim)`, B, C `(batch, N)` or `(batch, G, N)`, modality `(batch,)`.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

#include "common/checks.h"

namespace momoe {

// Sizes of a scan: B and C hold G groups of N states (G = 1 and grouped = false for (batch, N, L));
// M = 1 without modality.
struct ScanShape {
  int64_t batch, dim, L, N, G, M;
  bool grouped;  // B, C given as (batch, G, N, L)
};

// Sizes of a decode step (the scan's without L).
struct StepShape {
  int64_t batch, dim, N, G, M;
  bool grouped;  // B, C given as (batch, G, N)
};

inline void check_param_dtype(const at::Tensor& t, const char* name, at::ScalarType u_dtype) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == u_dtype, "momoe: ", name,
              " must be float32 or have u's dtype (", u_dtype, "), got ", t.scalar_type());
}

inline at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// A (batch, dim, L) activation whose channels are contiguous and time is not: the transpose of a
// (batch, L, dim) tensor, as linear layers produce. The Python fakes apply the same rule.
inline bool is_time_major(const at::Tensor& t) {
  return t.size(1) > 1 && t.size(2) > 1 && t.stride(1) == 1 && t.stride(2) != 1;
}

// An uninitialised (batch, dim, L) tensor, time-major or channel-major.
inline at::Tensor empty_bdl(int64_t batch, int64_t dim, int64_t L, bool time_major, const at::TensorOptions& opts) {
  if (time_major) return at::empty({batch, L, dim}, opts).transpose(1, 2);
  return at::empty({batch, dim, L}, opts);
}

namespace scan_checks_detail {

// The tensor of an optional input, or nullptr when it is absent.
inline const at::Tensor* present(const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; }

// Runs `check` on each input that is not nullptr, in order.
inline void check_devices(DeviceCheck check, std::initializer_list<std::pair<const at::Tensor*, const char*>> inputs) {
  for (const auto& [t, name] : inputs) {
    if (t != nullptr) check(*t, name);
  }
}

// Checks the shapes of A (dim, N) or (M, dim, N) and of the per-channel parameters D and `bias_name`
// (delta_bias, or dt_bias for the decode step): (dim,), or (M, dim) with modality. Returns M.
inline int64_t check_params(const at::Tensor& A, const std::optional<at::Tensor>& D,
                            const std::optional<at::Tensor>& bias, const char* bias_name, int64_t dim, int64_t N,
                            bool with_modality) {
  if (!with_modality) {
    TORCH_CHECK(A.dim() == 2 && A.size(0) == dim && A.size(1) == N,
                "momoe: without modality, A must have shape (dim, N) = (", dim, ", ", N, "), got ", A.sizes());
    const auto check = [dim](const std::optional<at::Tensor>& t, const char* name) {
      if (!t) return;
      TORCH_CHECK(t->dim() == 1 && t->size(0) == dim, "momoe: without modality, ", name,
                  " must have shape (dim,) = (", dim, ",), got ", t->sizes());
    };
    check(D, "D");
    check(bias, bias_name);
    return 1;
  }
  TORCH_CHECK(A.dim() == 3, "momoe: with modality, A must have shape (M, dim, N), got ", A.sizes());
  const int64_t M = A.size(0);
  TORCH_CHECK(A.size(1) == dim && A.size(2) == N, "momoe: A must have shape (M, ", dim, ", ", N, "), got ",
              A.sizes());
  const auto check = [dim, M](const std::optional<at::Tensor>& t, const char* name) {
    if (!t) return;
    TORCH_CHECK(t->dim() == 2, "momoe: with modality, ", name, " must have shape (M, dim), got ", t->sizes());
    TORCH_CHECK(t->size(0) == M, "momoe: mismatched modality counts: A has M = ", M, " but ", name, " has ",
                t->size(0));
    TORCH_CHECK(t->size(1) == dim, "momoe: ", name, " must have shape (M, ", dim, "), got ", t->sizes());
  };
  check(D, "D");
  check(bias, bias_name);
  return M;
}

}  // namespace scan_checks_detail

// Checks devices (with `check_device`), dtypes and shapes of selective_scan_fwd's inputs (also the
// forward part of selective_scan_bwd's) and returns their sizes. Modality ids are not range-checked.
inline ScanShape check_scan_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                   const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                                   const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                                   const std::optional<at::Tensor>& modality,
                                   const std::optional<at::Tensor>& initial_state, DeviceCheck check_device) {
  using scan_checks_detail::present;
  scan_checks_detail::check_devices(check_device, {{&u, "u"}, {&delta, "delta"}, {&A, "A"}, {&B, "B"}, {&C, "C"},
                                                   {present(D), "D"}, {present(z), "z"},
                                                   {present(delta_bias), "delta_bias"}, {present(modality), "modality"},
                                                   {present(initial_state), "initial_state"}});

  check_float(u, "u");
  const auto dt = u.scalar_type();
  TORCH_CHECK(delta.scalar_type() == dt, "momoe: delta must have u's dtype (", dt, "), got ", delta.scalar_type());
  if (z) TORCH_CHECK(z->scalar_type() == dt, "momoe: z must have u's dtype (", dt, "), got ", z->scalar_type());
  check_param_dtype(A, "A", dt);
  check_param_dtype(B, "B", dt);
  check_param_dtype(C, "C", dt);
  if (D) check_param_dtype(*D, "D", dt);
  if (delta_bias) check_param_dtype(*delta_bias, "delta_bias", dt);
  if (initial_state) check_param_dtype(*initial_state, "initial_state", dt);

  check_dim(u, 3, "u (batch, dim, L)");
  ScanShape s;
  s.batch = u.size(0);
  s.dim = u.size(1);
  s.L = u.size(2);
  TORCH_CHECK(delta.sizes() == u.sizes(), "momoe: delta must have u's shape ", u.sizes(), ", got ", delta.sizes());
  if (z) TORCH_CHECK(z->sizes() == u.sizes(), "momoe: z must have u's shape ", u.sizes(), ", got ", z->sizes());
  TORCH_CHECK(B.dim() == 3 || B.dim() == 4, "momoe: B must have shape (batch, N, L) or (batch, G, N, L), got ",
              B.sizes());
  TORCH_CHECK(C.sizes() == B.sizes(), "momoe: C must have B's shape ", B.sizes(), ", got ", C.sizes());
  s.grouped = B.dim() == 4;
  s.G = s.grouped ? B.size(1) : 1;
  s.N = B.size(-2);
  TORCH_CHECK(B.size(0) == s.batch && B.size(-1) == s.L, "momoe: B must have batch ", s.batch, " and length ", s.L,
              " (u is ", u.sizes(), "), got ", B.sizes());
  TORCH_CHECK(s.G > 0 && s.dim % s.G == 0, "momoe: dim (", s.dim, ") must be divisible by the number of groups G (",
              s.G, ") of B and C");

  if (modality) {
    check_index(*modality, "modality");
    TORCH_CHECK(modality->dim() == 2 && modality->size(0) == s.batch && modality->size(1) == s.L,
                "momoe: modality must have shape (batch, L) = (", s.batch, ", ", s.L, "), got ", modality->sizes());
  }
  s.M = scan_checks_detail::check_params(A, D, delta_bias, "delta_bias", s.dim, s.N, modality.has_value());
  if (initial_state) {
    TORCH_CHECK(initial_state->dim() == 3 && initial_state->size(0) == s.batch && initial_state->size(1) == s.dim &&
                    initial_state->size(2) == s.N,
                "momoe: initial_state must have shape (batch, dim, N) = (", s.batch, ", ", s.dim, ", ", s.N,
                "), got ", initial_state->sizes());
  }
  return s;
}

// Checks the inputs selective_scan_bwd has beyond the forward's: dout (u's dtype and shape), the
// forward's fp32 chunk_states (one state per `chunk` timesteps) and an optional dlast_state.
inline void check_scan_bwd_inputs(const ScanShape& s, const at::Tensor& u, const at::Tensor& dout,
                                  const std::optional<at::Tensor>& dlast_state, const at::Tensor& chunk_states,
                                  int64_t chunk, DeviceCheck check_device) {
  check_device(dout, "dout");
  check_device(chunk_states, "chunk_states");
  TORCH_CHECK(dout.scalar_type() == u.scalar_type(), "momoe: dout must have u's dtype (", u.scalar_type(), "), got ",
              dout.scalar_type());
  TORCH_CHECK(dout.sizes() == u.sizes(), "momoe: dout must have u's shape ", u.sizes(), ", got ", dout.sizes());
  const int64_t n_chunks = (s.L + chunk - 1) / chunk;
  TORCH_CHECK(chunk_states.scalar_type() == at::kFloat, "momoe: chunk_states must be float32, got ",
              chunk_states.scalar_type());
  TORCH_CHECK(chunk_states.dim() == 4 && chunk_states.size(0) == s.batch && chunk_states.size(1) == s.dim &&
                  chunk_states.size(2) == n_chunks && chunk_states.size(3) == s.N,
              "momoe: chunk_states must have shape (batch, dim, ceil(L / ", chunk, "), N) = (", s.batch, ", ", s.dim,
              ", ", n_chunks, ", ", s.N, "), got ", chunk_states.sizes());
  if (dlast_state) {
    check_device(*dlast_state, "dlast_state");
    check_float(*dlast_state, "dlast_state");
    TORCH_CHECK(dlast_state->dim() == 3 && dlast_state->size(0) == s.batch && dlast_state->size(1) == s.dim &&
                    dlast_state->size(2) == s.N,
                "momoe: dlast_state must have shape (batch, dim, N) = (", s.batch, ", ", s.dim, ", ", s.N, "), got ",
                dlast_state->sizes());
  }
}

// Checks devices (with `check_device`), dtypes and shapes of selective_state_update's inputs and returns
// their sizes. Modality ids are not range-checked.
inline StepShape check_step_inputs(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                   const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                   const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                   const std::optional<at::Tensor>& dt_bias,
                                   const std::optional<at::Tensor>& modality, DeviceCheck check_device) {
  using scan_checks_detail::present;
  scan_checks_detail::check_devices(check_device, {{&state, "state"}, {&x, "x"}, {&dt, "dt"}, {&A, "A"}, {&B, "B"},
                                                   {&C, "C"}, {present(D), "D"}, {present(z), "z"},
                                                   {present(dt_bias), "dt_bias"}, {present(modality), "modality"}});

  check_float(x, "x");
  const auto xt = x.scalar_type();
  check_dim(x, 2, "x (batch, dim)");
  StepShape s;
  s.batch = x.size(0);
  s.dim = x.size(1);
  TORCH_CHECK(dt.scalar_type() == xt, "momoe: dt must have x's dtype (", xt, "), got ", dt.scalar_type());
  TORCH_CHECK(dt.sizes() == x.sizes(), "momoe: dt must have x's shape ", x.sizes(), ", got ", dt.sizes());
  if (z) {
    TORCH_CHECK(z->scalar_type() == xt, "momoe: z must have x's dtype (", xt, "), got ", z->scalar_type());
    TORCH_CHECK(z->sizes() == x.sizes(), "momoe: z must have x's shape ", x.sizes(), ", got ", z->sizes());
  }
  check_param_dtype(state, "state", xt);
  check_param_dtype(A, "A", xt);
  check_param_dtype(B, "B", xt);
  check_param_dtype(C, "C", xt);
  if (D) check_param_dtype(*D, "D", xt);
  if (dt_bias) check_param_dtype(*dt_bias, "dt_bias", xt);
  TORCH_CHECK(B.dim() == 2 || B.dim() == 3, "momoe: B must have shape (batch, N) or (batch, G, N), got ", B.sizes());
  TORCH_CHECK(C.sizes() == B.sizes(), "momoe: C must have B's shape ", B.sizes(), ", got ", C.sizes());
  s.grouped = B.dim() == 3;
  s.G = s.grouped ? B.size(1) : 1;
  s.N = B.size(-1);
  TORCH_CHECK(B.size(0) == s.batch, "momoe: B must have batch ", s.batch, ", got ", B.sizes());
  TORCH_CHECK(s.G > 0 && s.dim % s.G == 0, "momoe: dim (", s.dim, ") must be divisible by the number of groups G (",
              s.G, ") of B and C");
  TORCH_CHECK(state.dim() == 3 && state.size(0) == s.batch && state.size(1) == s.dim && state.size(2) == s.N,
              "momoe: state must have shape (batch, dim, N) = (", s.batch, ", ", s.dim, ", ", s.N, "), got ",
              state.sizes());
  if (modality) {
    check_index(*modality, "modality");
    TORCH_CHECK(modality->dim() == 1 && modality->size(0) == s.batch, "momoe: modality must have shape (batch,) = (",
                s.batch, ",), got ", modality->sizes());
  }
  s.M = scan_checks_detail::check_params(A, D, dt_bias, "dt_bias", s.dim, s.N, modality.has_value());
  return s;
}

}  // namespace momoe
