// Every schema of torch.ops.momoe in one place. Kernels register their
// implementations next to their sources (csrc/<op>/<op>_cpu.cpp, <op>_cuda.cpp).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(momoe, m) {
  // Grouped GEMM: y[rows of g] = x[rows of g] @ w[g]  (w[g]^T with trans_w).
  m.def("grouped_gemm(Tensor x, Tensor w, Tensor group_sizes, bool trans_w=False) -> Tensor");
  // Weight gradient of grouped_gemm: dw[g] = x[rows of g]^T @ dy[rows of g]
  // (transposed to (G, N, K) with trans_w).
  m.def("grouped_gemm_dw(Tensor x, Tensor dy, Tensor group_sizes, bool trans_w=False) -> Tensor");

  // Permutation (dispatch/combine of every MoE and modality split).
  m.def("sort_by_group(Tensor group_ids, int num_groups) -> (Tensor order, Tensor group_sizes)");
  m.def("gather_rows(Tensor x, Tensor index) -> Tensor");
  m.def("scatter_rows(Tensor y, Tensor index, int num_rows, Tensor? weight=None) -> Tensor");
  // Backward of scatter_rows: (grad_y, grad_weight); grad_weight is empty when weight is None.
  m.def("scatter_rows_backward(Tensor grad_out, Tensor y, Tensor index, Tensor? weight) -> (Tensor grad_y, Tensor grad_weight)");

  // Selective scan (Mamba), optionally with per-token modality parameters.
  // chunk_states: (batch, dim, ceil(L / 256), N) fp32, the state at the start of each chunk,
  // saved for the backward pass (which recomputes each chunk from it).
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool delta_softplus, Tensor? modality, Tensor? initial_state) "
      "-> (Tensor out, Tensor last_state, Tensor chunk_states)");
  // Gradients for every input; dD, dz, ddelta_bias, dinitial_state are empty (numel 0)
  // when the corresponding input is None.
  m.def(
      "selective_scan_bwd(Tensor dout, Tensor? dlast_state, Tensor u, Tensor delta, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor? modality, "
      "Tensor? initial_state, Tensor chunk_states) "
      "-> (Tensor du, Tensor ddelta, Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, "
      "Tensor ddelta_bias, Tensor dinitial_state)");
  // One decoding step; updates `state` in place and returns y: (batch, dim).
  m.def(
      "selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
      "Tensor? D, Tensor? z, Tensor? dt_bias, bool dt_softplus, Tensor? modality) -> Tensor");
}

// `import momoe._C` loads this shared library, which runs the registrations above.
static struct PyModuleDef momoe_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&momoe_c_module); }
