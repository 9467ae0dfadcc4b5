// CPU glue of the selective scan: input checks (selective_scan_checks.h's, with check_cpu and a range
// check of modality ids), the kernel operands (fp32 parameters, time-major fp32 B/C), dtype dispatch,
// run-time instruction-set dispatch (AVX-512 / AVX2 translation units, or the portable build of the same
// core), at::parallel_for, and the registrations of selective_scan_fwd, selective_scan_bwd and
// selective_state_update.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/c10_types.h"
#include "selective_scan/selective_scan_checks.h"
#include "selective_scan/selective_scan_kernel.h"  // the portable build: momoe::generic::scan

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOMOE_SCAN_X86_DISPATCH 1
namespace momoe {
namespace avx512 {
namespace scan {
template <typename T>
void fwd_tasks(const momoe::scan::ScanArgs<T>&, const momoe::scan::FwdOut<T>&, int64_t, int64_t, float*);
template <typename T>
void bwd_tasks(const momoe::scan::ScanArgs<T>&, const momoe::scan::BwdOut<T>&, int64_t, int64_t, float*);
}  // namespace scan
}  // namespace avx512
namespace avx2 {
namespace scan {
template <typename T>
void fwd_tasks(const momoe::scan::ScanArgs<T>&, const momoe::scan::FwdOut<T>&, int64_t, int64_t, float*);
template <typename T>
void bwd_tasks(const momoe::scan::ScanArgs<T>&, const momoe::scan::BwdOut<T>&, int64_t, int64_t, float*);
}  // namespace scan
}  // namespace avx2
}  // namespace momoe
#endif

namespace momoe {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

enum class Isa { kGeneric, kAvx2, kAvx512 };

// The widest instruction set this CPU supports; MOMOE_CPU_ISA=generic|avx2|avx512 narrows it
// (for tests and benchmarks; asking for more than the CPU has falls back to what it has).
Isa scan_isa() {
#ifdef MOMOE_SCAN_X86_DISPATCH
  static const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  Isa best = has512 ? Isa::kAvx512 : (has2 ? Isa::kAvx2 : Isa::kGeneric);
  const char* env = std::getenv("MOMOE_CPU_ISA");
  if (env != nullptr) {
    if (std::strcmp(env, "generic") == 0) return Isa::kGeneric;
    if (std::strcmp(env, "avx2") == 0 && best != Isa::kGeneric) return Isa::kAvx2;
  }
  return best;
#else
  return Isa::kGeneric;
#endif
}

template <typename T>
void fwd_dispatch(Isa isa, const scan::ScanArgs<T>& a, const scan::FwdOut<T>& o, int64_t b, int64_t e, float* ws) {
#ifdef MOMOE_SCAN_X86_DISPATCH
  if (isa == Isa::kAvx512) return avx512::scan::fwd_tasks<T>(a, o, b, e, ws);
  if (isa == Isa::kAvx2) return avx2::scan::fwd_tasks<T>(a, o, b, e, ws);
#endif
  (void)isa;
  generic::scan::fwd_tasks<T>(a, o, b, e, ws);
}

template <typename T>
void bwd_dispatch(Isa isa, const scan::ScanArgs<T>& a, const scan::BwdOut<T>& o, int64_t b, int64_t e, float* ws) {
#ifdef MOMOE_SCAN_X86_DISPATCH
  if (isa == Isa::kAvx512) return avx512::scan::bwd_tasks<T>(a, o, b, e, ws);
  if (isa == Isa::kAvx2) return avx2::scan::bwd_tasks<T>(a, o, b, e, ws);
#endif
  (void)isa;
  generic::scan::bwd_tasks<T>(a, o, b, e, ws);
}

// ---------------------------------------------------------------------------------------------
// Operands shared by forward and backward (the checks are selective_scan_checks.h's).

// Checks that ids are in [0, M) and returns them as contiguous int32.
Tensor checked_modality(const Tensor& modality, int64_t M) {
  Tensor m64 = modality.to(at::kLong).contiguous();
  const int64_t* p = m64.data_ptr<int64_t>();
  const int64_t n = m64.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < M, "momoe: modality values must be in [0, ", M, "), got ", p[i]);
  }
  return m64.to(at::kInt);
}

scan::Layout layout_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

struct Prepared : ScanShape {
  explicit Prepared(const ScanShape& shape) : ScanShape(shape) {}
  Tensor u, delta, z;  // any strides
  Tensor A, B, C, D, delta_bias, modality, initial_state;  // contiguous, params in fp32
};

Prepared prepare(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                 const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias, const OptTensor& modality,
                 const OptTensor& initial_state) {
  Prepared p(check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, modality, initial_state, check_cpu));
  if (modality) p.modality = checked_modality(*modality, p.M);

  // u, delta, z are read through their strides (no copies).
  p.u = u;
  p.delta = delta;
  if (z) p.z = *z;
  p.A = f32(A);
  // Time-major (batch, G, L, N) fp32 copies of B and C (see selective_scan_kernel.h).
  p.B = (p.grouped ? B : B.unsqueeze(1)).to(at::kFloat).transpose(-1, -2).contiguous();
  p.C = (p.grouped ? C : C.unsqueeze(1)).to(at::kFloat).transpose(-1, -2).contiguous();
  if (D) p.D = f32(*D);
  if (delta_bias) p.delta_bias = f32(*delta_bias);
  if (initial_state) p.initial_state = f32(*initial_state);
  return p;
}

const float* fptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

template <typename T>
scan::ScanArgs<T> make_args(const Prepared& p, bool softplus) {
  scan::ScanArgs<T> a;
  a.batch = p.batch;
  a.dim = p.dim;
  a.L = p.L;
  a.N = p.N;
  a.G = p.G;
  a.M = p.M;
  a.u = reinterpret_cast<const T*>(p.u.data_ptr());
  a.delta = reinterpret_cast<const T*>(p.delta.data_ptr());
  a.z = p.z.defined() ? reinterpret_cast<const T*>(p.z.data_ptr()) : nullptr;
  a.lu = layout_of(p.u);
  a.ldelta = layout_of(p.delta);
  a.lz = p.z.defined() ? layout_of(p.z) : scan::Layout{0, 0, 0};
  a.A = p.A.data_ptr<float>();
  a.B = p.B.data_ptr<float>();
  a.C = p.C.data_ptr<float>();
  a.D = fptr(p.D);
  a.delta_bias = fptr(p.delta_bias);
  a.modality = p.modality.defined() ? p.modality.data_ptr<int32_t>() : nullptr;
  a.initial_state = fptr(p.initial_state);
  a.softplus = softplus;
  return a;
}

template <typename T>
void run_fwd(const Prepared& p, bool softplus, Tensor& out, Tensor& last_state, Tensor& chunk_states) {
  const auto a = make_args<T>(p, softplus);
  scan::FwdOut<T> o{reinterpret_cast<T*>(out.data_ptr()), layout_of(out), last_state.data_ptr<float>(),
                    chunk_states.data_ptr<float>()};
  const int64_t tasks = scan::fwd_num_tasks(p.batch, p.dim, p.G);
  const int64_t ws_size = scan::fwd_scratch_floats(p.N, p.M);
  const Isa isa = scan_isa();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ws(ws_size);
    fwd_dispatch<T>(isa, a, o, begin, end, ws.data());
  });
}

std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd(const Tensor& u, const Tensor& delta, const Tensor& A,
                                                      const Tensor& B, const Tensor& C, const OptTensor& D,
                                                      const OptTensor& z, const OptTensor& delta_bias,
                                                      bool delta_softplus, const OptTensor& modality,
                                                      const OptTensor& initial_state) {
  Prepared p = prepare(u, delta, A, B, C, D, z, delta_bias, modality, initial_state);
  const int64_t n_chunks = scan::num_chunks(p.L);
  // The output is time-major when the input or the gate is (it then feeds a linear layer).
  const bool out_time_major = is_time_major(u) || (z && is_time_major(*z));
  Tensor out = empty_bdl(p.batch, p.dim, p.L, out_time_major, u.options());
  Tensor last_state = p.initial_state.defined() && p.L == 0
                          ? p.initial_state.clone()
                          : at::zeros({p.batch, p.dim, p.N}, u.options().dtype(at::kFloat));
  Tensor chunk_states = at::empty({p.batch, p.dim, n_chunks, p.N}, u.options().dtype(at::kFloat));
  if (p.L > 0) {
    switch (u.scalar_type()) {
      case at::kFloat: run_fwd<float>(p, delta_softplus, out, last_state, chunk_states); break;
      case at::kBFloat16: run_fwd<c10::BFloat16>(p, delta_softplus, out, last_state, chunk_states); break;
      case at::kHalf: run_fwd<c10::Half>(p, delta_softplus, out, last_state, chunk_states); break;
      default: TORCH_CHECK(false, "momoe: unsupported dtype ", u.scalar_type());
    }
  }
  return {out, last_state, chunk_states};
}

// out[p, q] = sum_r part[p, r, q], summed in order of r (deterministic).
Tensor sum_middle(const Tensor& part, int64_t P, int64_t R, int64_t Q) {
  Tensor out = at::empty({P, Q}, part.options());
  const float* src = part.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, P * Q, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t pi = i / Q, qi = i % Q;
      float s = 0.0f;
      for (int64_t r = 0; r < R; ++r) s += src[(pi * R + r) * Q + qi];
      dst[i] = s;
    }
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> selective_scan_bwd(
    const Tensor& dout, const OptTensor& dlast_state, const Tensor& u, const Tensor& delta, const Tensor& A,
    const Tensor& B, const Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
    bool delta_softplus, const OptTensor& modality, const OptTensor& initial_state, const Tensor& chunk_states) {
  Prepared p = prepare(u, delta, A, B, C, D, z, delta_bias, modality, initial_state);
  check_scan_bwd_inputs(p, u, dout, dlast_state, chunk_states, scan::kChunk, check_cpu);
  const Tensor dlast = dlast_state ? f32(*dlast_state) : Tensor();
  Tensor cs = chunk_states.contiguous();

  const auto opts = u.options().memory_format(at::MemoryFormat::Contiguous);
  const auto f32opts = opts.dtype(at::kFloat);
  // Each gradient has the layout of its input.
  Tensor du = empty_bdl(p.batch, p.dim, p.L, is_time_major(u), opts);
  Tensor ddelta = empty_bdl(p.batch, p.dim, p.L, is_time_major(delta), opts);
  Tensor dz = z ? empty_bdl(p.batch, p.dim, p.L, is_time_major(*z), opts) : Tensor();
  const int64_t bpg = scan::blocks_per_group(p.dim, p.G);
  Tensor dB_part = at::zeros({p.batch * p.G, bpg, p.N * p.L}, f32opts);
  Tensor dC_part = at::zeros({p.batch * p.G, bpg, p.N * p.L}, f32opts);
  Tensor dA_part = at::zeros({p.batch, p.M * p.dim * p.N}, f32opts);
  Tensor dD_part = D ? at::zeros({p.batch, p.M * p.dim}, f32opts) : Tensor();
  Tensor ddb_part = delta_bias ? at::zeros({p.batch, p.M * p.dim}, f32opts) : Tensor();
  Tensor dinit;
  if (initial_state) {
    dinit = dlast.defined() && p.L == 0 ? dlast.clone() : at::zeros({p.batch, p.dim, p.N}, f32opts);
  }

  if (p.L > 0) {
    auto run = [&](auto tag) {
      using T = decltype(tag);
      const auto a = make_args<T>(p, delta_softplus);
      scan::BwdOut<T> o;
      o.dout = reinterpret_cast<const T*>(dout.data_ptr());
      o.ldout = layout_of(dout);
      o.ldu = layout_of(du);
      o.lddelta = layout_of(ddelta);
      o.ldz = dz.defined() ? layout_of(dz) : scan::Layout{0, 0, 0};
      o.dlast_state = dlast.defined() ? dlast.data_ptr<float>() : nullptr;
      o.chunk_states = cs.data_ptr<float>();
      o.du = reinterpret_cast<T*>(du.data_ptr());
      o.ddelta = reinterpret_cast<T*>(ddelta.data_ptr());
      o.dz = dz.defined() ? reinterpret_cast<T*>(dz.data_ptr()) : nullptr;
      o.dB_part = dB_part.data_ptr<float>();
      o.dC_part = dC_part.data_ptr<float>();
      o.dA_part = dA_part.data_ptr<float>();
      o.dD_part = dD_part.defined() ? dD_part.data_ptr<float>() : nullptr;
      o.ddelta_bias_part = ddb_part.defined() ? ddb_part.data_ptr<float>() : nullptr;
      o.dinitial_state = dinit.defined() ? dinit.data_ptr<float>() : nullptr;
      const int64_t tasks = scan::bwd_num_tasks(p.batch, p.dim, p.G);
      const int64_t ws_size = scan::bwd_scratch_floats(p.N, p.M);
      const Isa isa = scan_isa();
      at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> ws(ws_size);
        bwd_dispatch<T>(isa, a, o, begin, end, ws.data());
      });
    };
    switch (u.scalar_type()) {
      case at::kFloat: run(float()); break;
      case at::kBFloat16: run(c10::BFloat16()); break;
      case at::kHalf: run(c10::Half()); break;
      default: TORCH_CHECK(false, "momoe: unsupported dtype ", u.scalar_type());
    }
  } else {
    dz = z ? dz.zero_() : dz;
  }

  Tensor dA = sum_middle(dA_part, 1, p.batch, p.M * p.dim * p.N).view(A.sizes()).to(A.scalar_type());
  auto bc_grad = [&](const Tensor& part, const Tensor& like) {
    Tensor g = sum_middle(part, p.batch * p.G, bpg, p.N * p.L).view({p.batch, p.G, p.L, p.N});
    return g.transpose(-1, -2).to(like.scalar_type()).contiguous().view(like.sizes());
  };
  Tensor dB = bc_grad(dB_part, B);
  Tensor dC = bc_grad(dC_part, C);
  // A fresh (0,) tensor for each absent input (outputs of an op must not alias each other).
  auto empty = [&]() { return at::empty({0}, opts); };
  Tensor dD = D ? sum_middle(dD_part, 1, p.batch, p.M * p.dim).view(D->sizes()).to(D->scalar_type()) : empty();
  Tensor ddb = delta_bias
                   ? sum_middle(ddb_part, 1, p.batch, p.M * p.dim).view(delta_bias->sizes()).to(delta_bias->scalar_type())
                   : empty();
  Tensor dinit_out = initial_state ? dinit.to(initial_state->scalar_type()) : empty();
  return {du, ddelta, dA, dB, dC, dD, z ? dz : empty(), ddb, dinit_out};
}

// ---------------------------------------------------------------------------------------------
// Decode step.

template <typename T, typename S>
void run_step(scan::StepArgs<T, S> a) {
  at::parallel_for(0, a.batch * a.dim, 64, [&](int64_t begin, int64_t end) {
    generic::scan::step_rows<T, S>(a, begin, end);
  });
}

Tensor selective_state_update(Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B,
                              const Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& dt_bias,
                              bool dt_softplus, const OptTensor& modality) {
  const StepShape s = check_step_inputs(state, x, dt, A, B, C, D, z, dt_bias, modality, check_cpu);
  const Tensor mod32 = modality ? checked_modality(*modality, s.M) : Tensor();

  Tensor xc = x.contiguous(), dtc = dt.contiguous();
  Tensor zc = z ? z->contiguous() : Tensor();
  Tensor Af = f32(A), Bf = f32(B), Cf = f32(C);
  Tensor Df = D ? f32(*D) : Tensor(), dbf = dt_bias ? f32(*dt_bias) : Tensor();
  Tensor st = state.is_contiguous() ? state : state.contiguous();
  Tensor y = at::empty({s.batch, s.dim}, x.options().memory_format(at::MemoryFormat::Contiguous));
  auto run = [&](auto ttag, auto stag) {
    using T = decltype(ttag);
    using S = decltype(stag);
    scan::StepArgs<T, S> a;
    a.batch = s.batch;
    a.dim = s.dim;
    a.N = s.N;
    a.G = s.G;
    a.M = s.M;
    a.state = reinterpret_cast<S*>(st.data_ptr());
    a.x = reinterpret_cast<const T*>(xc.data_ptr());
    a.dt = reinterpret_cast<const T*>(dtc.data_ptr());
    a.z = zc.defined() ? reinterpret_cast<const T*>(zc.data_ptr()) : nullptr;
    a.A = Af.data_ptr<float>();
    a.B = Bf.data_ptr<float>();
    a.C = Cf.data_ptr<float>();
    a.D = fptr(Df);
    a.dt_bias = fptr(dbf);
    a.modality = mod32.defined() ? mod32.data_ptr<int32_t>() : nullptr;
    a.softplus = dt_softplus;
    a.y = reinterpret_cast<T*>(y.data_ptr());
    run_step<T, S>(a);
  };
  const bool sf = state.scalar_type() == at::kFloat;
  switch (x.scalar_type()) {
    case at::kFloat: run(float(), float()); break;
    case at::kBFloat16: sf ? run(c10::BFloat16(), float()) : run(c10::BFloat16(), c10::BFloat16()); break;
    case at::kHalf: sf ? run(c10::Half(), float()) : run(c10::Half(), c10::Half()); break;
    default: TORCH_CHECK(false, "momoe: unsupported dtype ", x.scalar_type());
  }
  if (!st.is_same(state)) state.copy_(st);
  return y;
}

}  // namespace
}  // namespace momoe

TORCH_LIBRARY_IMPL(momoe, CPU, m) {
  m.impl("selective_scan_fwd", &momoe::selective_scan_fwd);
  m.impl("selective_scan_bwd", &momoe::selective_scan_bwd);
  m.impl("selective_state_update", &momoe::selective_state_update);
}
