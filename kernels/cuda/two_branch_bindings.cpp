// PyTorch bindings of the two-branch CUDA kernels: tensor checks, output allocation, and the
// calls to the launchers of two_branch.cu. Only CPU-side PyTorch headers are used; the caller
// (kernels/cuda_ext.py) passes the current CUDA stream and has made the tensors' device current.
// The ATen per-operator headers and the pybind11 tensor casters instead of torch/extension.h
// (the whole C++ frontend): a third of the compile time, which the first training step waits on.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "two_branch.h"

namespace {

using two_branch::Storage;

Storage storage_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Storage::f32;
    case at::kBFloat16: return Storage::bf16;
    case at::kHalf: return Storage::f16;
    default:
      TORCH_CHECK(false, name, ": dtype ", t.scalar_type(),
                  " is not supported by impl 'cuda' (float32, bfloat16, float16)");
  }
  return Storage::f32;
}

void check_rows(const at::Tensor& t, const char* name, int64_t batch, int64_t numel) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == batch && t.size(1) == numel && t.is_contiguous(), name,
              ": expected a contiguous [", batch, ", ", numel, "] tensor, got ", t.sizes());
}

void check_coef(const at::Tensor& t, const char* name, int64_t batch, at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 1 && t.size(0) == batch && t.is_contiguous(), name,
              ": expected a contiguous CUDA tensor of shape [", batch, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
}

// 16-byte row loads need numel % 8 == 0 and every base pointer aligned to 8 elements.
bool vectorizable(int64_t numel, std::initializer_list<const at::Tensor*> ts) {
  if (numel % 8 != 0) return false;
  for (const at::Tensor* t : ts) {
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % (t->element_size() * 8) != 0) return false;
  }
  return true;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

at::Tensor network_input(at::Tensor clean, at::Tensor noisy, at::Tensor eps,
                            at::Tensor out, at::Tensor P, at::Tensor Q, at::Tensor c_in,
                            at::Tensor ambient, bool seeded, int64_t first_sample,
                            int64_t step_lo, int64_t step_hi, int64_t key_lo, int64_t key_hi,
                            int64_t stream) {
  const int64_t batch = clean.size(0), numel = clean.size(1);
  check_rows(clean, "clean", batch, numel);
  check_rows(noisy, "noisy", batch, numel);
  check_rows(out, "out", batch, numel);
  if (!seeded) check_rows(eps, "eps", batch, numel);
  check_coef(P, "P", batch, at::kFloat);
  check_coef(Q, "Q", batch, at::kFloat);
  check_coef(c_in, "c_in", batch, at::kFloat);
  check_coef(ambient, "ambient", batch, at::kByte);
  TORCH_CHECK(batch <= 65535, "network_input: batch ", batch, " exceeds the grid limit 65535");
  two_branch::Tensors t;
  t.clean = clean.data_ptr(); t.clean_type = storage_of(clean, "clean");
  t.noisy = noisy.data_ptr(); t.noisy_type = storage_of(noisy, "noisy");
  if (!seeded) { t.eps = eps.data_ptr(); t.eps_type = storage_of(eps, "eps"); }
  t.out = out.data_ptr(); t.out_type = storage_of(out, "out");
  const bool vector_ok = seeded ? vectorizable(numel, {&clean, &noisy, &out})
                                : vectorizable(numel, {&clean, &noisy, &eps, &out});
  const two_branch::NoiseKey noise{static_cast<uint32_t>(key_lo), static_cast<uint32_t>(key_hi),
                                   static_cast<uint32_t>(step_lo), static_cast<uint32_t>(step_hi),
                                   first_sample};
  check_launch(two_branch::network_input(t, P.data_ptr<float>(), Q.data_ptr<float>(), c_in.data_ptr<float>(),
                                         ambient.data_ptr<uint8_t>(), batch, numel, vector_ok, noise,
                                         as_stream(stream)),
               "network_input");
  return out;
}

// Returns {per-sample loss [B] float32, dF (undefined when write_grad is false)}.
std::vector<at::Tensor> residual_loss(at::Tensor F, at::Tensor net_in, at::Tensor clean,
                                         at::Tensor noisy, at::Tensor A, at::Tensor B,
                                         at::Tensor C, at::Tensor c_in, at::Tensor weight,
                                         at::Tensor ambient, double grad_scale, bool write_grad,
                                         bool deterministic, int64_t stream) {
  const int64_t batch = F.size(0), numel = F.size(1);
  check_rows(F, "F", batch, numel);
  check_rows(net_in, "net_in", batch, numel);
  check_rows(clean, "clean", batch, numel);
  check_rows(noisy, "noisy", batch, numel);
  for (auto [t, name] : {std::pair{&A, "A"}, {&B, "B"}, {&C, "C"}, {&c_in, "c_in"}, {&weight, "weight"}})
    check_coef(*t, name, batch, at::kFloat);
  check_coef(ambient, "ambient", batch, at::kByte);
  TORCH_CHECK(batch <= 65535, "residual_loss: batch ", batch, " exceeds the grid limit 65535");

  const int blocks = two_branch::launch_for(numel).blocks_per_sample;
  // One block per sample leaves nothing to add: both modes then write the loss directly.
  const bool ordered = deterministic || blocks == 1;
  const auto fopts = F.options().dtype(at::kFloat);
  // Ordered: every slot is written by its block (no memset needed); atomics add into zeros.
  at::Tensor loss = !ordered ? at::zeros({batch}, fopts)
                  : numel > 0 ? at::empty({batch, blocks}, fopts) : at::zeros({batch, blocks}, fopts);
  at::Tensor grad = write_grad ? at::empty_like(F) : at::Tensor();
  two_branch::Tensors t;
  t.F = F.data_ptr(); t.F_type = storage_of(F, "F");
  t.net_in = net_in.data_ptr(); t.net_in_type = storage_of(net_in, "net_in");
  t.clean = clean.data_ptr(); t.clean_type = storage_of(clean, "clean");
  t.noisy = noisy.data_ptr(); t.noisy_type = storage_of(noisy, "noisy");
  if (write_grad) { t.out = grad.data_ptr(); t.out_type = t.F_type; }
  const bool vector_ok = write_grad ? vectorizable(numel, {&F, &net_in, &clean, &noisy, &grad})
                                    : vectorizable(numel, {&F, &net_in, &clean, &noisy});
  check_launch(two_branch::residual_loss(t, loss.data_ptr<float>(), A.data_ptr<float>(), B.data_ptr<float>(),
                                         C.data_ptr<float>(), c_in.data_ptr<float>(), weight.data_ptr<float>(),
                                         ambient.data_ptr<uint8_t>(), batch, numel, vector_ok,
                                         static_cast<float>(grad_scale), ordered, as_stream(stream)),
               "residual_loss");
  if (ordered) {
    // Deterministic second pass: a fixed-shape row sum, the same order every run.
    loss = blocks == 1 ? loss.select(1, 0) : loss.sum(1);
  }
  return {loss, grad};
}

at::Tensor rescale_rows(at::Tensor grad, at::Tensor upstream, double expected, bool in_place,
                           int64_t stream) {
  const int64_t batch = grad.size(0), numel = grad.size(1);
  check_rows(grad, "grad", batch, numel);
  check_coef(upstream, "upstream", batch, at::kFloat);
  at::Tensor out = in_place ? grad : at::empty_like(grad);
  two_branch::Tensors t;
  t.F = grad.data_ptr(); t.F_type = storage_of(grad, "grad");
  t.out = out.data_ptr(); t.out_type = t.F_type;
  check_launch(two_branch::rescale_rows(t, upstream.data_ptr<float>(), static_cast<float>(expected), batch,
                                        numel, vectorizable(numel, {&grad, &out}), as_stream(stream)),
               "rescale_rows");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused two-branch ambient objective (kernels/cuda/two_branch.cu)";
  m.def("network_input", &network_input, "pass 1: net_in = c_in * (P * src + Q * eps)");
  m.def("residual_loss", &residual_loss, "pass 2: per-sample loss and dloss/dF");
  m.def("rescale_rows", &rescale_rows, "backward: dF scaled per sample by upstream / expected");
}
