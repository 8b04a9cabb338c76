// Launchers of the two-branch CUDA kernels (two_branch.cu), called by the PyTorch bindings
// (two_branch_bindings.cpp). Plain pointers and a stream only: the .cu file needs no PyTorch
// headers, so it compiles quickly and on machines whose PyTorch has no CUDA headers.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace two_branch {

// Storage types the kernels are instantiated for (arithmetic is always float32).
enum class Storage : int { f32 = 0, bf16 = 1, f16 = 2 };

// Philox key and counter words of the in-kernel noise (kernels/philox.py).
struct NoiseKey {
  uint32_t key_lo, key_hi, step_lo, step_hi;
  int64_t first_sample;
};

// Threads per block and blocks per sample for rows of `numel` elements.
struct Launch {
  int threads;
  int blocks_per_sample;
};
Launch launch_for(int64_t numel);

// Pass 1: out = c_in * (P * src + Q * eps); eps == nullptr draws it from `noise`.
// `vector_ok`: every row pointer is aligned for 8-element loads and numel % 8 == 0.
cudaError_t network_input(Storage in, Storage out_type, const void* clean, const void* noisy,
                          const void* eps, void* out, const float* P, const float* Q,
                          const float* c_in, const uint8_t* ambient, int64_t batch, int64_t numel,
                          bool vector_ok, NoiseKey noise, cudaStream_t stream);

// Pass 2: loss[b, block] (ordered) or loss[b] += (atomics) weight * sum(r^2), and, if grad is
// not null, grad = grad_scale * 2 * weight * A * r.
cudaError_t residual_loss(Storage f_type, Storage data_type, const void* F, const void* net_in,
                          const void* clean, const void* noisy, void* grad, float* loss,
                          const float* A, const float* B, const float* C, const float* c_in,
                          const float* weight, const uint8_t* ambient, int64_t batch, int64_t numel,
                          bool vector_ok, float grad_scale, bool ordered, cudaStream_t stream);

// Backward: out = grad * upstream[b] / expected per sample. With out == grad (in place), rows
// whose factor is exactly 1 are left untouched.
cudaError_t rescale_rows(Storage type, const void* grad, void* out, const float* upstream, float expected,
                         int64_t batch, int64_t numel, bool vector_ok, cudaStream_t stream);

}  // namespace two_branch
