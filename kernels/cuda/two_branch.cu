// CUDA kernels for the two passes of the ambient objective (docs/INTERFACES.md).
//
//   pass 1  net_in = c_in * (P * src + Q * eps)                    1 read, 1 write per element
//   pass 2  r = A * F + B * x_in + C * src,  x_in = net_in / c_in  3 reads, 1 write
//           loss_i = weight_i * sum(r^2),  dF = grad_scale * 2 * weight_i * A_i * r
//
// src is the clean image of a clean-branch sample and the noisy copy of an ambient one; each
// block belongs to one sample, so it picks one base pointer and never reads the other tensor.
// Tensors are [B, N] rows; a block covers THREADS * ELEMS consecutive elements of one row and
// each thread ELEMS = 8 of them (two 16-byte loads of float32, one of bfloat16), with a scalar
// fallback when a row is not 8-element aligned. Arithmetic is float32 for every storage type.
//
// In-kernel noise is the Philox-4x32-10 definition of kernels/philox.py: counter (element / 4,
// sample, step lo, step hi), key = seed; one call gives the normals of four elements.
//
// No PyTorch headers: two_branch_bindings.cpp checks the tensors and calls the launchers at the
// end of this file; kernels/cuda_ext.py builds both with torch.utils.cpp_extension.load.

#include "two_branch.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace two_branch {
namespace {

constexpr int ELEMS = 8;           // elements per thread: two Philox groups of four
constexpr int MAX_THREADS = 512;



// ---------------------------------------------------------------------------------------
// Storage <-> float32
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// ELEMS values of T in one aligned chunk, so that the compiler emits wide loads and stores.
template <typename T>
struct alignas(sizeof(T) * ELEMS) Pack {
  T v[ELEMS];
};

// Load ELEMS elements starting at `first` (an offset within the row) as float32.
template <typename T>
__device__ __forceinline__ void load_row(const T* __restrict__ row, int64_t first, int64_t numel,
                                         bool vector_ok, float (&out)[ELEMS]) {
  if (vector_ok && first + ELEMS <= numel) {
    Pack<T> p = *reinterpret_cast<const Pack<T>*>(row + first);
#pragma unroll
    for (int k = 0; k < ELEMS; ++k) out[k] = to_float(p.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < ELEMS; ++k) out[k] = first + k < numel ? to_float(row[first + k]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_row(T* __restrict__ row, int64_t first, int64_t numel,
                                          bool vector_ok, const float (&in)[ELEMS]) {
  if (vector_ok && first + ELEMS <= numel) {
    Pack<T> p;
#pragma unroll
    for (int k = 0; k < ELEMS; ++k) p.v[k] = from_float<T>(in[k]);
    *reinterpret_cast<Pack<T>*>(row + first) = p;
  } else {
#pragma unroll
    for (int k = 0; k < ELEMS; ++k)
      if (first + k < numel) row[first + k] = from_float<T>(in[k]);
  }
}

// ---------------------------------------------------------------------------------------
// Philox-4x32-10 and Box-Muller (kernels/philox.py states the same definition in PyTorch)
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_a = __umulhi(0xD2511F53u, c[0]), lo_a = 0xD2511F53u * c[0];
    const uint32_t hi_b = __umulhi(0xCD9E8D57u, c[2]), lo_b = 0xCD9E8D57u * c[2];
    const uint32_t n0 = hi_b ^ c[1] ^ k0, n2 = hi_a ^ c[3] ^ k1;
    c[0] = n0; c[1] = lo_b; c[2] = n2; c[3] = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

__device__ __forceinline__ float uniform_open(uint32_t w) {
  // Top 24 bits + 1/2, over 2^24: exact in float32, never 0, so log() is finite.
  return (static_cast<float>(w >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

// Normals of elements 4*group .. 4*group+3 of `sample`.
__device__ __forceinline__ void philox_normal4(const NoiseKey& nk, int64_t sample, int64_t group, float* out) {
  uint32_t c[4] = {static_cast<uint32_t>(group), static_cast<uint32_t>(nk.first_sample + sample),
                   nk.step_lo, nk.step_hi};
  philox4x32_10(c, nk.key_lo, nk.key_hi);
#pragma unroll
  for (int pair = 0; pair < 2; ++pair) {
    const float radius = sqrtf(-2.0f * logf(uniform_open(c[2 * pair])));
    float s, co;
    sincospif(2.0f * uniform_open(c[2 * pair + 1]), &s, &co);   // angle = 2 pi u
    out[2 * pair] = radius * co;
    out[2 * pair + 1] = radius * s;
  }
}

// ---------------------------------------------------------------------------------------
// Pass 1: network input
// ---------------------------------------------------------------------------------------
template <typename TIn, typename TOut>
__global__ void network_input_kernel(const TIn* __restrict__ clean, const TIn* __restrict__ noisy,
                                     const TIn* __restrict__ eps, TOut* __restrict__ out,
                                     const float* __restrict__ P, const float* __restrict__ Q,
                                     const float* __restrict__ c_in, const uint8_t* __restrict__ ambient,
                                     int64_t numel, bool vector_ok, bool seeded, NoiseKey nk) {
  const int64_t sample = blockIdx.y;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * ELEMS;
  if (first >= numel) return;
  const int64_t row = sample * numel;
  const TIn* src_row = (ambient[sample] ? noisy : clean) + row;   // only one tensor is read
  const float p = P[sample], q = Q[sample], ci = c_in[sample];

  float src[ELEMS], e[ELEMS], net[ELEMS];
  load_row(src_row, first, numel, vector_ok, src);
  if (seeded) {
    philox_normal4(nk, sample, first / 4, e);
    philox_normal4(nk, sample, first / 4 + 1, e + 4);
  } else {
    load_row(eps + row, first, numel, vector_ok, e);
  }
#pragma unroll
  for (int k = 0; k < ELEMS; ++k) net[k] = ci * (p * src[k] + q * e[k]);
  store_row(out + row, first, numel, vector_ok, net);
}

// ---------------------------------------------------------------------------------------
// Pass 2: residual, per-sample loss and dloss/dF
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[MAX_THREADS / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) / 32;
    v = lane < warps ? warp_sums[lane] : 0.f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;   // valid in thread 0
}

template <typename TF, typename TD>
__global__ void residual_loss_kernel(const TF* __restrict__ F, const TD* __restrict__ net_in,
                                     const TD* __restrict__ clean, const TD* __restrict__ noisy,
                                     TF* __restrict__ grad, float* __restrict__ loss,
                                     const float* __restrict__ A, const float* __restrict__ B,
                                     const float* __restrict__ C, const float* __restrict__ c_in,
                                     const float* __restrict__ weight, const uint8_t* __restrict__ ambient,
                                     int64_t numel, bool vector_ok, float grad_scale,
                                     bool write_grad, bool deterministic) {
  const int64_t sample = blockIdx.y;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * ELEMS;
  const int64_t row = sample * numel;
  const float a = A[sample], b = B[sample], c = C[sample], w = weight[sample];
  const float ci = c_in[sample];

  float sq = 0.f;
  if (first < numel) {   // no early return: every thread takes part in block_sum
    const TD* src_row = (ambient[sample] ? noisy : clean) + row;
    float f[ELEMS], x[ELEMS], s[ELEMS], r[ELEMS];
    load_row(F + row, first, numel, vector_ok, f);
    load_row(net_in + row, first, numel, vector_ok, x);
    load_row(src_row, first, numel, vector_ok, s);
#pragma unroll
    for (int k = 0; k < ELEMS; ++k) {
      r[k] = first + k < numel ? a * f[k] + b * (x[k] / ci) + c * s[k] : 0.f;
      sq += r[k] * r[k];
    }
    if (write_grad) {
      const float g = 2.0f * grad_scale * w * a;   // d(mean_i loss_i)/dF for grad_scale = 1/B
#pragma unroll
      for (int k = 0; k < ELEMS; ++k) r[k] *= g;
      store_row(grad + row, first, numel, vector_ok, r);
    }
  }
  sq = block_sum(sq);
  if (threadIdx.x == 0) {
    if (deterministic) loss[sample * gridDim.x + blockIdx.x] = w * sq;   // summed in order on the host side
    else atomicAdd(loss + sample, w * sq);
  }
}

// ---------------------------------------------------------------------------------------
// Backward: hand dF on, scaled by the incoming gradient when it is not the one assumed
// ---------------------------------------------------------------------------------------
template <typename T>
__global__ void rescale_rows_kernel(const T* __restrict__ grad, T* __restrict__ out,
                                    const float* __restrict__ upstream, float expected, int64_t numel,
                                    bool vector_ok, bool in_place) {
  const int64_t sample = blockIdx.y;
  const float ratio = upstream[sample] / expected;
  // In place, a factor of exactly 1 (loss.mean().backward()) leaves the row as it is: the
  // check costs one scalar load per block and no host sync.
  if (in_place && ratio == 1.0f) return;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * ELEMS;
  if (first >= numel) return;
  const int64_t row = sample * numel;
  float g[ELEMS];
  load_row(grad + row, first, numel, vector_ok, g);
#pragma unroll
  for (int k = 0; k < ELEMS; ++k) g[k] *= ratio;
  store_row(out + row, first, numel, vector_ok, g);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------

// One block per sample when a sample fits in MAX_THREADS * ELEMS elements (32x32x3 images),
// else full blocks of MAX_THREADS.
Launch launch_for(int64_t numel) {
  const int64_t chunks = std::max<int64_t>(1, (numel + ELEMS - 1) / ELEMS);
  const int64_t threads = std::min<int64_t>(MAX_THREADS, ((chunks + 31) / 32) * 32);
  return {static_cast<int>(threads), static_cast<int>((chunks + threads - 1) / threads)};
}

namespace {

// Call fn with a value of the C++ type of `s` (its type selects the kernel instantiation).
template <typename Fn>
cudaError_t with_storage(Storage s, Fn&& fn) {
  switch (s) {
    case Storage::f32: return fn(float{});
    case Storage::bf16: return fn(__nv_bfloat16{});
    case Storage::f16: return fn(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t network_input(Storage in, Storage out_type, const void* clean, const void* noisy,
                          const void* eps, void* out, const float* P, const float* Q,
                          const float* c_in, const uint8_t* ambient, int64_t batch, int64_t numel,
                          bool vector_ok, NoiseKey noise, cudaStream_t stream) {
  if (batch == 0 || numel == 0) return cudaSuccess;
  const Launch launch = launch_for(numel);
  const dim3 grid(launch.blocks_per_sample, static_cast<unsigned>(batch));
  return with_storage(in, [&](auto in_tag) {
    return with_storage(out_type, [&](auto out_tag) {
      using TIn = decltype(in_tag);
      using TOut = decltype(out_tag);
      network_input_kernel<TIn, TOut><<<grid, launch.threads, 0, stream>>>(
          static_cast<const TIn*>(clean), static_cast<const TIn*>(noisy), static_cast<const TIn*>(eps),
          static_cast<TOut*>(out), P, Q, c_in, ambient, numel, vector_ok, eps == nullptr, noise);
      return cudaGetLastError();
    });
  });
}

cudaError_t residual_loss(Storage f_type, Storage data_type, const void* F, const void* net_in,
                          const void* clean, const void* noisy, void* grad, float* loss,
                          const float* A, const float* B, const float* C, const float* c_in,
                          const float* weight, const uint8_t* ambient, int64_t batch, int64_t numel,
                          bool vector_ok, float grad_scale, bool ordered, cudaStream_t stream) {
  if (batch == 0 || numel == 0) return cudaSuccess;
  const Launch launch = launch_for(numel);
  const dim3 grid(launch.blocks_per_sample, static_cast<unsigned>(batch));
  return with_storage(f_type, [&](auto f_tag) {
    return with_storage(data_type, [&](auto d_tag) {
      using TF = decltype(f_tag);
      using TD = decltype(d_tag);
      residual_loss_kernel<TF, TD><<<grid, launch.threads, 0, stream>>>(
          static_cast<const TF*>(F), static_cast<const TD*>(net_in), static_cast<const TD*>(clean),
          static_cast<const TD*>(noisy), static_cast<TF*>(grad), loss, A, B, C, c_in, weight, ambient,
          numel, vector_ok, grad_scale, grad != nullptr, ordered);
      return cudaGetLastError();
    });
  });
}

cudaError_t rescale_rows(Storage type, const void* grad, void* out, const float* upstream, float expected,
                         int64_t batch, int64_t numel, bool vector_ok, cudaStream_t stream) {
  if (batch == 0 || numel == 0) return cudaSuccess;
  const Launch launch = launch_for(numel);
  const dim3 grid(launch.blocks_per_sample, static_cast<unsigned>(batch));
  return with_storage(type, [&](auto tag) {
    using T = decltype(tag);
    rescale_rows_kernel<T><<<grid, launch.threads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<T*>(out), upstream, expected, numel, vector_ok,
        grad == out);
    return cudaGetLastError();
  });
}

}  // namespace two_branch
