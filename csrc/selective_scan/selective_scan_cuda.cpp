// CUDA glue of the selective scan: input checks (the CPU glue's, message for message), the kernel
// operands (fp32 parameter tables, zero-padded fp32 B/C, int32 modality ids), dtype dispatch to the
// launchers of selective_scan_cuda_kernel.h, and the CUDA registrations of selective_scan_fwd,
// selective_scan_bwd and selective_state_update (same schemas, output shapes, dtypes and layouts as
// the CPU kernels and the fakes in momoe/ops/selective_scan/selective_scan.py).
//
// Modality ids are range-checked on the host: one device synchronisation per call that passes
// `modality`. During CUDA graph capture, where a synchronisation is not allowed, the check is skipped;
// the kernels clamp ids into [0, M) so that a bad id never reads out of bounds.
// dB and dC are summed with floating-point atomics (their last bits vary from run to run);
// torch.use_deterministic_algorithms(True) makes the backward raise.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "selective_scan/selective_scan_cuda_kernel.h"

namespace momoe {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
namespace sc = scan_cuda;

void check_cuda(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "momoe: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == like.device(), "momoe: ", name, " must be on the device of the other inputs (",
              like.device(), "), got ", t.device());
}

void check_param_dtype(const Tensor& t, const char* name, at::ScalarType u_dtype) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == u_dtype, "momoe: ", name,
              " must be float32 or have u's dtype (", u_dtype, "), got ", t.scalar_type());
}

// Checks that ids are in [0, M) (one synchronisation; skipped while a CUDA graph is captured) and
// returns them as contiguous int32.
Tensor checked_modality(const Tensor& modality, int64_t M) {
  if (modality.numel() > 0 &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    const auto [lo, hi] = at::aminmax(modality);
    const Tensor range = at::stack({lo.to(at::kLong), hi.to(at::kLong)}).cpu();
    const int64_t min_id = range[0].item<int64_t>(), max_id = range[1].item<int64_t>();
    TORCH_CHECK(min_id >= 0 && max_id < M, "momoe: modality values must be in [0, ", M, "), got ",
                min_id < 0 ? min_id : max_id);
  }
  return modality.to(at::kInt).contiguous();
}

Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

sc::Layout layout_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// A (batch, dim, L) activation whose channels are contiguous and time is not: the transpose of a
// (batch, L, dim) tensor, as linear layers produce. The Python fakes apply the same rule.
bool is_time_major(const Tensor& t) { return t.size(1) > 1 && t.size(2) > 1 && t.stride(1) == 1 && t.stride(2) != 1; }

// An uninitialised (batch, dim, L) tensor, time-major or channel-major.
Tensor empty_bdl(int64_t batch, int64_t dim, int64_t L, bool time_major, const at::TensorOptions& opts) {
  if (time_major) return at::empty({batch, L, dim}, opts).transpose(1, 2);
  return at::empty({batch, dim, L}, opts);
}

struct Prepared {
  int64_t batch, dim, L, N, G, M;
  bool grouped;        // B, C given as (batch, G, N, L)
  Tensor u, delta, z;  // any strides
  Tensor A, B, C, D, delta_bias, modality, initial_state;  // contiguous, params in fp32
};

// (batch, G, N, Lp) fp32 copy of B or C, Lp = L rounded up to whole chunks, zero past L.
Tensor padded_bc(const Tensor& x, const Prepared& p) {
  const int64_t Lp = sc::num_chunks(p.L) * sc::kChunk;
  Tensor out = at::empty({p.batch, p.G, p.N, Lp}, x.options().dtype(at::kFloat));
  out.narrow(-1, 0, p.L).copy_(p.grouped ? x : x.unsqueeze(1));
  if (Lp > p.L) out.narrow(-1, p.L, Lp - p.L).zero_();
  return out;
}

Prepared prepare(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                 const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, const OptTensor& modality,
                 const OptTensor& initial_state) {
  check_cuda(u, "u", u);
  check_cuda(delta, "delta", u);
  check_cuda(A, "A", u);
  check_cuda(B, "B", u);
  check_cuda(C, "C", u);
  if (D) check_cuda(*D, "D", u);
  if (z) check_cuda(*z, "z", u);
  if (delta_bias) check_cuda(*delta_bias, "delta_bias", u);
  if (modality) check_cuda(*modality, "modality", u);
  if (initial_state) check_cuda(*initial_state, "initial_state", u);

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
  Prepared p;
  p.batch = u.size(0);
  p.dim = u.size(1);
  p.L = u.size(2);
  TORCH_CHECK(delta.sizes() == u.sizes(), "momoe: delta must have u's shape ", u.sizes(), ", got ", delta.sizes());
  if (z) TORCH_CHECK(z->sizes() == u.sizes(), "momoe: z must have u's shape ", u.sizes(), ", got ", z->sizes());
  TORCH_CHECK(B.dim() == 3 || B.dim() == 4, "momoe: B must have shape (batch, N, L) or (batch, G, N, L), got ",
              B.sizes());
  TORCH_CHECK(C.sizes() == B.sizes(), "momoe: C must have B's shape ", B.sizes(), ", got ", C.sizes());
  p.grouped = B.dim() == 4;
  p.G = p.grouped ? B.size(1) : 1;
  p.N = B.size(-2);
  TORCH_CHECK(B.size(0) == p.batch && B.size(-1) == p.L, "momoe: B must have batch ", p.batch, " and length ", p.L,
              " (u is ", u.sizes(), "), got ", B.sizes());
  TORCH_CHECK(p.G > 0 && p.dim % p.G == 0, "momoe: dim (", p.dim, ") must be divisible by the number of groups G (",
              p.G, ") of B and C");

  if (modality) {
    check_index(*modality, "modality");
    TORCH_CHECK(modality->dim() == 2 && modality->size(0) == p.batch && modality->size(1) == p.L,
                "momoe: modality must have shape (batch, L) = (", p.batch, ", ", p.L, "), got ", modality->sizes());
    TORCH_CHECK(A.dim() == 3, "momoe: with modality, A must have shape (M, dim, N), got ", A.sizes());
    p.M = A.size(0);
    TORCH_CHECK(A.size(1) == p.dim && A.size(2) == p.N, "momoe: A must have shape (M, ", p.dim, ", ", p.N, "), got ",
                A.sizes());
    for (const auto& [t, name] : {std::make_pair(D, "D"), std::make_pair(delta_bias, "delta_bias")}) {
      if (!t) continue;
      TORCH_CHECK(t->dim() == 2, "momoe: with modality, ", name, " must have shape (M, dim), got ", t->sizes());
      TORCH_CHECK(t->size(0) == p.M, "momoe: mismatched modality counts: A has M = ", p.M, " but ", name, " has ",
                  t->size(0));
      TORCH_CHECK(t->size(1) == p.dim, "momoe: ", name, " must have shape (M, ", p.dim, "), got ", t->sizes());
    }
  } else {
    p.M = 1;
    TORCH_CHECK(A.dim() == 2 && A.size(0) == p.dim && A.size(1) == p.N,
                "momoe: without modality, A must have shape (dim, N) = (", p.dim, ", ", p.N, "), got ", A.sizes());
    for (const auto& [t, name] : {std::make_pair(D, "D"), std::make_pair(delta_bias, "delta_bias")}) {
      if (!t) continue;
      TORCH_CHECK(t->dim() == 1 && t->size(0) == p.dim, "momoe: without modality, ", name,
                  " must have shape (dim,) = (", p.dim, ",), got ", t->sizes());
    }
  }
  if (initial_state) {
    TORCH_CHECK(initial_state->dim() == 3 && initial_state->size(0) == p.batch && initial_state->size(1) == p.dim &&
                    initial_state->size(2) == p.N,
                "momoe: initial_state must have shape (batch, dim, N) = (", p.batch, ", ", p.dim, ", ", p.N,
                "), got ", initial_state->sizes());
  }
  if (modality) p.modality = checked_modality(*modality, p.M);

  // u, delta, z are read through their strides (no copies).
  p.u = u;
  p.delta = delta;
  if (z) p.z = *z;
  p.A = f32(A);
  if (p.L > 0) {
    p.B = padded_bc(B, p);
    p.C = padded_bc(C, p);
  }
  if (D) p.D = f32(*D);
  if (delta_bias) p.delta_bias = f32(*delta_bias);
  if (initial_state) p.initial_state = f32(*initial_state);
  return p;
}

const float* fptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

sc::ScanArgs make_args(const Prepared& p, bool softplus) {
  sc::ScanArgs a;
  a.batch = p.batch;
  a.dim = p.dim;
  a.L = p.L;
  a.N = p.N;
  a.G = p.G;
  a.M = p.M;
  a.u = p.u.data_ptr();
  a.delta = p.delta.data_ptr();
  a.z = p.z.defined() ? p.z.data_ptr() : nullptr;
  a.lu = layout_of(p.u);
  a.ldelta = layout_of(p.delta);
  a.lz = p.z.defined() ? layout_of(p.z) : sc::Layout{0, 0, 0};
  a.A = fptr(p.A);
  a.B = fptr(p.B);
  a.C = fptr(p.C);
  a.D = fptr(p.D);
  a.delta_bias = fptr(p.delta_bias);
  a.modality = p.modality.defined() ? p.modality.data_ptr<int32_t>() : nullptr;
  a.initial_state = fptr(p.initial_state);
  a.softplus = softplus;
  return a;
}

// The kernels keep per-modality tables in shared memory: M * N is bounded by a block's share.
void check_shared_memory(size_t bytes, const char* op, const Prepared& p) {
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "momoe: ", op, " on CUDA keeps M * N = ", p.M, " * ", p.N,
              " parameters per channel in shared memory, which needs ", bytes, " bytes per block; this GPU has ",
              limit);
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "momoe: ", op, " CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd(const Tensor& u, const Tensor& delta, const Tensor& A,
                                                      const Tensor& B, const Tensor& C, const OptTensor& D,
                                                      const OptTensor& z, const OptTensor& delta_bias,
                                                      bool delta_softplus, const OptTensor& modality,
                                                      const OptTensor& initial_state) {
  const c10::cuda::CUDAGuard guard(u.device());
  Prepared p = prepare(u, delta, A, B, C, D, z, delta_bias, modality, initial_state);
  const int64_t n_chunks = sc::num_chunks(p.L);
  // The output is time-major when the input or the gate is (it then feeds a linear layer).
  const bool out_time_major = is_time_major(u) || (z && is_time_major(*z));
  Tensor out = empty_bdl(p.batch, p.dim, p.L, out_time_major, u.options());
  const auto f32opts = u.options().dtype(at::kFloat);
  Tensor last_state = p.L > 0 ? at::empty({p.batch, p.dim, p.N}, f32opts)
                      : p.initial_state.defined() ? p.initial_state.clone()
                                                  : at::zeros({p.batch, p.dim, p.N}, f32opts);
  Tensor chunk_states = at::empty({p.batch, p.dim, n_chunks, p.N}, f32opts);
  if (p.L > 0 && p.batch * p.dim > 0) {
    check_shared_memory(sc::fwd_smem_bytes(p.N, p.M), "selective_scan_fwd", p);
    const sc::ScanArgs a = make_args(p, delta_softplus);
    const sc::FwdOut o{out.data_ptr(), layout_of(out), last_state.data_ptr<float>(), chunk_states.data_ptr<float>()};
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    switch (u.scalar_type()) {
      case at::kFloat: check_launch(sc::selective_scan_fwd_fp32(a, o, stream), "selective_scan_fwd"); break;
      case at::kBFloat16: check_launch(sc::selective_scan_fwd_bf16(a, o, stream), "selective_scan_fwd"); break;
      case at::kHalf: check_launch(sc::selective_scan_fwd_fp16(a, o, stream), "selective_scan_fwd"); break;
      default: TORCH_CHECK(false, "momoe: unsupported dtype ", u.scalar_type());
    }
  }
  return {out, last_state, chunk_states};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> selective_scan_bwd(
    const Tensor& dout, const OptTensor& dlast_state, const Tensor& u, const Tensor& delta, const Tensor& A,
    const Tensor& B, const Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
    bool delta_softplus, const OptTensor& modality, const OptTensor& initial_state, const Tensor& chunk_states) {
  const c10::cuda::CUDAGuard guard(u.device());
  Prepared p = prepare(u, delta, A, B, C, D, z, delta_bias, modality, initial_state);
  check_cuda(dout, "dout", u);
  check_cuda(chunk_states, "chunk_states", u);
  TORCH_CHECK(dout.scalar_type() == u.scalar_type(), "momoe: dout must have u's dtype (", u.scalar_type(), "), got ",
              dout.scalar_type());
  TORCH_CHECK(dout.sizes() == u.sizes(), "momoe: dout must have u's shape ", u.sizes(), ", got ", dout.sizes());
  const int64_t n_chunks = sc::num_chunks(p.L);
  TORCH_CHECK(chunk_states.scalar_type() == at::kFloat, "momoe: chunk_states must be float32, got ",
              chunk_states.scalar_type());
  TORCH_CHECK(chunk_states.dim() == 4 && chunk_states.size(0) == p.batch && chunk_states.size(1) == p.dim &&
                  chunk_states.size(2) == n_chunks && chunk_states.size(3) == p.N,
              "momoe: chunk_states must have shape (batch, dim, ceil(L / 256), N) = (", p.batch, ", ", p.dim, ", ",
              n_chunks, ", ", p.N, "), got ", chunk_states.sizes());
  Tensor dlast;
  if (dlast_state) {
    check_cuda(*dlast_state, "dlast_state", u);
    check_float(*dlast_state, "dlast_state");
    TORCH_CHECK(dlast_state->dim() == 3 && dlast_state->size(0) == p.batch && dlast_state->size(1) == p.dim &&
                    dlast_state->size(2) == p.N,
                "momoe: dlast_state must have shape (batch, dim, N) = (", p.batch, ", ", p.dim, ", ", p.N, "), got ",
                dlast_state->sizes());
    dlast = f32(*dlast_state);
  }
  Tensor cs = chunk_states.contiguous();

  const auto opts = u.options().memory_format(at::MemoryFormat::Contiguous);
  const auto f32opts = opts.dtype(at::kFloat);
  // Each gradient has the layout of its input.
  Tensor du = empty_bdl(p.batch, p.dim, p.L, is_time_major(u), opts);
  Tensor ddelta = empty_bdl(p.batch, p.dim, p.L, is_time_major(delta), opts);
  Tensor dz = z ? empty_bdl(p.batch, p.dim, p.L, is_time_major(*z), opts) : Tensor();
  const bool run = p.L > 0 && p.batch * p.dim > 0;
  // (batch, G, N, L) sums over channels; per-batch partial sums of the parameter gradients.
  Tensor dB = at::zeros({p.batch, p.G, p.N, p.L}, f32opts);
  Tensor dC = at::zeros({p.batch, p.G, p.N, p.L}, f32opts);
  auto part = [&](at::IntArrayRef shape) { return run ? at::empty(shape, f32opts) : at::zeros(shape, f32opts); };
  Tensor dA_part = part({p.batch, p.M, p.dim, p.N});
  Tensor dD_part = D ? part({p.batch, p.M, p.dim}) : Tensor();
  Tensor ddb_part = delta_bias ? part({p.batch, p.M, p.dim}) : Tensor();
  Tensor dinit;
  if (initial_state) {
    dinit = run ? at::empty({p.batch, p.dim, p.N}, f32opts)
            : dlast.defined() && p.L == 0 ? dlast.clone()
                                          : at::zeros({p.batch, p.dim, p.N}, f32opts);
  }

  if (run) {
    at::globalContext().alertNotDeterministic("momoe::selective_scan_bwd (CUDA): dB and dC are summed with atomics");
    check_shared_memory(sc::bwd_smem_bytes(p.N, p.M), "selective_scan_bwd", p);
    const sc::ScanArgs a = make_args(p, delta_softplus);
    sc::BwdOut o;
    o.dout = dout.data_ptr();
    o.ldout = layout_of(dout);
    o.dlast_state = dlast.defined() ? dlast.data_ptr<float>() : nullptr;
    o.chunk_states = cs.data_ptr<float>();
    o.du = du.data_ptr();
    o.ddelta = ddelta.data_ptr();
    o.dz = dz.defined() ? dz.data_ptr() : nullptr;
    o.ldu = layout_of(du);
    o.lddelta = layout_of(ddelta);
    o.ldz = dz.defined() ? layout_of(dz) : sc::Layout{0, 0, 0};
    o.dB = dB.data_ptr<float>();
    o.dC = dC.data_ptr<float>();
    o.dA_part = dA_part.data_ptr<float>();
    o.dD_part = dD_part.defined() ? dD_part.data_ptr<float>() : nullptr;
    o.ddelta_bias_part = ddb_part.defined() ? ddb_part.data_ptr<float>() : nullptr;
    o.dinitial_state = dinit.defined() ? dinit.data_ptr<float>() : nullptr;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    switch (u.scalar_type()) {
      case at::kFloat: check_launch(sc::selective_scan_bwd_fp32(a, o, stream), "selective_scan_bwd"); break;
      case at::kBFloat16: check_launch(sc::selective_scan_bwd_bf16(a, o, stream), "selective_scan_bwd"); break;
      case at::kHalf: check_launch(sc::selective_scan_bwd_fp16(a, o, stream), "selective_scan_bwd"); break;
      default: TORCH_CHECK(false, "momoe: unsupported dtype ", u.scalar_type());
    }
  } else if (dz.defined()) {
    dz.zero_();
  }

  Tensor dA = dA_part.sum(0).view(A.sizes()).to(A.scalar_type());
  auto bc_grad = [](const Tensor& g, const Tensor& like) {
    return g.to(like.scalar_type()).view(like.sizes());
  };
  // A fresh (0,) tensor for each absent input (outputs of an op must not alias each other).
  auto empty = [&]() { return at::empty({0}, opts); };
  Tensor dD = D ? dD_part.sum(0).view(D->sizes()).to(D->scalar_type()) : empty();
  Tensor ddb = delta_bias ? ddb_part.sum(0).view(delta_bias->sizes()).to(delta_bias->scalar_type()) : empty();
  Tensor dinit_out = initial_state ? dinit.to(initial_state->scalar_type()) : empty();
  return {du, ddelta, dA, bc_grad(dB, B), bc_grad(dC, C), dD, z ? dz : empty(), ddb, dinit_out};
}

// ---------------------------------------------------------------------------------------------
// Decode step.

sc::DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return sc::DType::kFloat32;
    case at::kBFloat16: return sc::DType::kBFloat16;
    case at::kHalf: return sc::DType::kFloat16;
    default: TORCH_CHECK(false, "momoe: unsupported dtype ", t);
  }
}

Tensor selective_state_update(Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B,
                              const Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& dt_bias,
                              bool dt_softplus, const OptTensor& modality) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda(state, "state", x);
  check_cuda(x, "x", x);
  check_cuda(dt, "dt", x);
  check_cuda(A, "A", x);
  check_cuda(B, "B", x);
  check_cuda(C, "C", x);
  if (D) check_cuda(*D, "D", x);
  if (z) check_cuda(*z, "z", x);
  if (dt_bias) check_cuda(*dt_bias, "dt_bias", x);
  if (modality) check_cuda(*modality, "modality", x);
  check_float(x, "x");
  const auto xt = x.scalar_type();
  check_dim(x, 2, "x (batch, dim)");
  const int64_t batch = x.size(0), dim = x.size(1);
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
  const bool grouped = B.dim() == 3;
  const int64_t G = grouped ? B.size(1) : 1;
  const int64_t N = B.size(-1);
  TORCH_CHECK(B.size(0) == batch, "momoe: B must have batch ", batch, ", got ", B.sizes());
  TORCH_CHECK(G > 0 && dim % G == 0, "momoe: dim (", dim, ") must be divisible by the number of groups G (", G,
              ") of B and C");
  TORCH_CHECK(state.dim() == 3 && state.size(0) == batch && state.size(1) == dim && state.size(2) == N,
              "momoe: state must have shape (batch, dim, N) = (", batch, ", ", dim, ", ", N, "), got ",
              state.sizes());
  int64_t M = 1;
  Tensor mod32;
  if (modality) {
    check_index(*modality, "modality");
    TORCH_CHECK(modality->dim() == 1 && modality->size(0) == batch, "momoe: modality must have shape (batch,) = (",
                batch, ",), got ", modality->sizes());
    TORCH_CHECK(A.dim() == 3, "momoe: with modality, A must have shape (M, dim, N), got ", A.sizes());
    M = A.size(0);
    TORCH_CHECK(A.size(1) == dim && A.size(2) == N, "momoe: A must have shape (M, ", dim, ", ", N, "), got ",
                A.sizes());
    for (const auto& [t, name] : {std::make_pair(D, "D"), std::make_pair(dt_bias, "dt_bias")}) {
      if (!t) continue;
      TORCH_CHECK(t->dim() == 2, "momoe: with modality, ", name, " must have shape (M, dim), got ", t->sizes());
      TORCH_CHECK(t->size(0) == M, "momoe: mismatched modality counts: A has M = ", M, " but ", name, " has ",
                  t->size(0));
      TORCH_CHECK(t->size(1) == dim, "momoe: ", name, " must have shape (M, ", dim, "), got ", t->sizes());
    }
    mod32 = checked_modality(*modality, M);
  } else {
    TORCH_CHECK(A.dim() == 2 && A.size(0) == dim && A.size(1) == N,
                "momoe: without modality, A must have shape (dim, N) = (", dim, ", ", N, "), got ", A.sizes());
    for (const auto& [t, name] : {std::make_pair(D, "D"), std::make_pair(dt_bias, "dt_bias")}) {
      if (!t) continue;
      TORCH_CHECK(t->dim() == 1 && t->size(0) == dim, "momoe: without modality, ", name,
                  " must have shape (dim,) = (", dim, ",), got ", t->sizes());
    }
  }

  // x, dt, z, B and C are read through their strides; B and C in one dtype (fp32 when theirs differ).
  const bool same_bc = B.scalar_type() == C.scalar_type();
  const Tensor Bk = same_bc ? B : B.to(at::kFloat), Ck = same_bc ? C : C.to(at::kFloat);
  const Tensor Af = f32(A);
  const Tensor Df = D ? f32(*D) : Tensor(), dbf = dt_bias ? f32(*dt_bias) : Tensor();
  Tensor st = state.is_contiguous() ? state : state.contiguous();
  Tensor y = at::empty({batch, dim}, x.options().memory_format(at::MemoryFormat::Contiguous));
  sc::StepArgs a;
  a.batch = batch;
  a.dim = dim;
  a.N = N;
  a.G = G;
  a.M = M;
  a.dtype = dtype_of(xt);
  a.state_dtype = dtype_of(state.scalar_type());
  a.bc_dtype = dtype_of(Bk.scalar_type());
  a.state = st.data_ptr();
  a.x = x.data_ptr();
  a.dt = dt.data_ptr();
  a.z = z ? z->data_ptr() : nullptr;
  a.sx_b = x.stride(0);
  a.sx_d = x.stride(1);
  a.sdt_b = dt.stride(0);
  a.sdt_d = dt.stride(1);
  a.sz_b = z ? z->stride(0) : 0;
  a.sz_d = z ? z->stride(1) : 0;
  a.B = Bk.data_ptr();
  a.C = Ck.data_ptr();
  a.sB_b = Bk.stride(0);
  a.sB_g = grouped ? Bk.stride(1) : 0;
  a.sB_n = Bk.stride(-1);
  a.sC_b = Ck.stride(0);
  a.sC_g = grouped ? Ck.stride(1) : 0;
  a.sC_n = Ck.stride(-1);
  a.A = Af.data_ptr<float>();
  a.D = fptr(Df);
  a.dt_bias = fptr(dbf);
  a.modality = mod32.defined() ? mod32.data_ptr<int32_t>() : nullptr;
  a.softplus = dt_softplus;
  a.y = y.data_ptr();
  check_launch(sc::selective_state_update(a, c10::cuda::getCurrentCUDAStream()), "selective_state_update");
  if (!st.is_same(state)) state.copy_(st);
  return y;
}

}  // namespace
}  // namespace momoe

TORCH_LIBRARY_IMPL(momoe, CUDA, m) {
  m.impl("selective_scan_fwd", &momoe::selective_scan_fwd);
  m.impl("selective_scan_bwd", &momoe::selective_scan_bwd);
  m.impl("selective_state_update", &momoe::selective_state_update);
}
