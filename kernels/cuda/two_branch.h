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

// The big tensors of a call, each a [B, N] row-major array with its own storage type.
// Pass 1 reads clean/noisy/eps and writes out (eps == nullptr: draw it from the NoiseKey).
// Pass 2 reads F/net_in/clean/noisy and writes dF to out (out == nullptr: no gradient).
// rescale_rows reads F (the stored dF) and writes out (out == F: in place).
struct Tensors {
  const void* clean = nullptr;  Storage clean_type = Storage::f32;
  const void* noisy = nullptr;  Storage noisy_type = Storage::f32;
  const void* eps = nullptr;    Storage eps_type = Storage::f32;
  const void* F = nullptr;      Storage F_type = Storage::f32;
  const void* net_in = nullptr; Storage net_in_type = Storage::f32;
  void* out = nullptr;          Storage out_type = Storage::f32;
};

// Pass 1: out = c_in * (P * src + Q * eps). `vector_ok`: numel % 8 == 0 and every row pointer
// is aligned for 8-element loads.
cudaError_t network_input(const Tensors& t, const float* P, const float* Q, const float* c_in,
                          const uint8_t* ambient, int64_t batch, int64_t numel, bool vector_ok,
                          NoiseKey noise, cudaStream_t stream);

// Pass 2: loss[b, block] (ordered) or loss[b] += (atomics) weight * sum(r^2), and, if t.out is
// not null, dF = grad_scale * 2 * weight * A * r.
cudaError_t residual_loss(const Tensors& t, float* loss, const float* A, const float* B, const float* C,
                          const float* c_in, const float* weight, const uint8_t* ambient, int64_t batch,
                          int64_t numel, bool vector_ok, float grad_scale, bool ordered, cudaStream_t stream);

// Backward: out = F * upstream[b] / expected per sample. In place (out == F), rows whose factor
// is 1 within kUnitRatioTolerance are left untouched.
constexpr float kUnitRatioTolerance = 9.5367431640625e-07f;  // 2^-20: 8 float32 ulps of 1
cudaError_t rescale_rows(const Tensors& t, const float* upstream, float expected, int64_t batch,
                         int64_t numel, bool vector_ok, cudaStream_t stream);

}  // namespace two_branch
