// CUDA glue of the selective scan: input checks (selective_scan_checks.h's, shared with the CPU glue, with
// a same-device check and a range check of modality ids), the kernel operands (fp32 parameter tables,
// zero-padded fp32 B/C, int32 modality ids), dtype dispatch to the launchers of
// selective_scan_cuda_kernel.h, and the CUDA registrations of selective_scan_fwd, selective_scan_bwd and
// selective_state_update (same schemas, output shapes, dtypes and layouts as the CPU kernels and the
// fakes in momoe/ops/selective_scan/selective_scan.py).
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

#include "selective_scan/selective_scan_checks.h"
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

// check_cuda against `like`, as the shared checks call it (valid while `like` is).
auto same_device_as(const Tensor& like) {
  return [&like](const Tensor& t, const char* name) { check_cuda(t, name, like); };
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

sc::Layout layout_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

struct Prepared : ScanShape {
  explicit Prepared(const ScanShape& shape) : ScanShape(shape) {}
  Tensor u, delta, z;  // any strides
  Tensor A, B, C, D, delta_bias, modality, initial_state;  // contiguous, params in fp32
};

// (batch, G, N, Lp) fp32 copy of B or C, Lp = L rounded up to whole chunks, zero past L.
Tensor padded_bc(const Tensor& x, const ScanShape& p) {
  const int64_t Lp = sc::num_chunks(p.L) * sc::kChunk;
  Tensor out = at::empty({p.batch, p.G, p.N, Lp}, x.options().dtype(at::kFloat));
  out.narrow(-1, 0, p.L).copy_(p.grouped ? x : x.unsqueeze(1));
  if (Lp > p.L) out.narrow(-1, p.L, Lp - p.L).zero_();
  return out;
}

Prepared prepare(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                 const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, const OptTensor& modality,
                 const OptTensor& initial_state) {
  Prepared p(check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, modality, initial_state, same_device_as(u)));
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
  check_scan_bwd_inputs(p, u, dout, dlast_state, chunk_states, sc::kChunk, same_device_as(u));
  const Tensor dlast = dlast_state ? f32(*dlast_state) : Tensor();
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
  const StepShape s = check_step_inputs(state, x, dt, A, B, C, D, z, dt_bias, modality, same_device_as(x));
  const Tensor mod32 = modality ? checked_modality(*modality, s.M) : Tensor();

  // x, dt, z, B and C are read through their strides; B and C in one dtype (fp32 when theirs differ).
  const bool same_bc = B.scalar_type() == C.scalar_type();
  const Tensor Bk = same_bc ? B : B.to(at::kFloat), Ck = same_bc ? C : C.to(at::kFloat);
  const Tensor Af = f32(A);
  const Tensor Df = D ? f32(*D) : Tensor(), dbf = dt_bias ? f32(*dt_bias) : Tensor();
  Tensor st = state.is_contiguous() ? state : state.contiguous();
  Tensor y = at::empty({s.batch, s.dim}, x.options().memory_format(at::MemoryFormat::Contiguous));
  sc::StepArgs a;
  a.batch = s.batch;
  a.dim = s.dim;
  a.N = s.N;
  a.G = s.G;
  a.M = s.M;
  a.dtype = dtype_of(x.scalar_type());
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
  a.sB_g = s.grouped ? Bk.stride(1) : 0;
  a.sB_n = Bk.stride(-1);
  a.sC_b = Ck.stride(0);
  a.sC_g = s.grouped ? Ck.stride(1) : 0;
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
