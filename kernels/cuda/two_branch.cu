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
// fallback when a row is not 8-element aligned. Each tensor has its own storage type (float32,
// bfloat16 or float16, chosen at run time); arithmetic is float32.
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

// A row of any storage type: the type is a kernel argument, the same for the whole grid, so
// the switch is a uniform branch. One kernel then serves every mix of dtypes (float32 images
// beside float16 noisy copies, a bfloat16 network input...) without an instantiation each.
__device__ __forceinline__ void load_any(const void* base, Storage type, int64_t first, int64_t numel,
                                         bool vector_ok, float (&out)[ELEMS]) {
  switch (type) {
    case Storage::f32: load_row(static_cast<const float*>(base), first, numel, vector_ok, out); break;
    case Storage::bf16: load_row(static_cast<const __nv_bfloat16*>(base), first, numel, vector_ok, out); break;
    case Storage::f16: load_row(static_cast<const __half*>(base), first, numel, vector_ok, out); break;
  }
}

__device__ __forceinline__ void store_any(void* base, Storage type, int64_t first, int64_t numel,
                                          bool vector_ok, const float (&in)[ELEMS]) {
  switch (type) {
    case Storage::f32: store_row(static_cast<float*>(base), first, numel, vector_ok, in); break;
    case Storage::bf16: store_row(static_cast<__nv_bfloat16*>(base), first, numel, vector_ok, in); break;
    case Storage::f16: store_row(static_cast<__half*>(base), first, numel, vector_ok, in); break;
  }
}

__device__ __forceinline__ int element_size(Storage type) { return type == Storage::f32 ? 4 : 2; }

// Base of sample `sample`'s row (numel elements of `type`).
__device__ __forceinline__ const void* row_of(const void* base, Storage type, int64_t sample, int64_t numel) {
  return static_cast<const char*>(base) + sample * numel * element_size(type);
}
__device__ __forceinline__ void* row_of(void* base, Storage type, int64_t sample, int64_t numel) {
  return static_cast<char*>(base) + sample * numel * element_size(type);
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
__global__ void network_input_kernel(Tensors t, const float* __restrict__ P, const float* __restrict__ Q,
                                     const float* __restrict__ c_in, const uint8_t* __restrict__ ambient,
                                     int64_t numel, bool vector_ok, NoiseKey nk) {
  const int64_t sample = blockIdx.y;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * ELEMS;
  if (first >= numel) return;
  const bool amb = ambient[sample] != 0;           // only the branch's own tensor is read
  const float p = P[sample], q = Q[sample], ci = c_in[sample];

  float src[ELEMS], e[ELEMS], net[ELEMS];
  load_any(row_of(amb ? t.noisy : t.clean, amb ? t.noisy_type : t.clean_type, sample, numel),
           amb ? t.noisy_type : t.clean_type, first, numel, vector_ok, src);
  if (t.eps == nullptr) {
    philox_normal4(nk, sample, first / 4, e);
    philox_normal4(nk, sample, first / 4 + 1, e + 4);
  } else {
    load_any(row_of(t.eps, t.eps_type, sample, numel), t.eps_type, first, numel, vector_ok, e);
  }
#pragma unroll
  for (int k = 0; k < ELEMS; ++k) net[k] = ci * (p * src[k] + q * e[k]);
  store_any(row_of(t.out, t.out_type, sample, numel), t.out_type, first, numel, vector_ok, net);
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

__global__ void residual_loss_kernel(Tensors t, float* __restrict__ loss,
                                     const float* __restrict__ A, const float* __restrict__ B,
                                     const float* __restrict__ C, const float* __restrict__ c_in,
                                     const float* __restrict__ weight, const uint8_t* __restrict__ ambient,
                                     int64_t numel, bool vector_ok, float grad_scale, bool deterministic) {
  const int64_t sample = blockIdx.y;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * ELEMS;
  const float a = A[sample], b = B[sample], c = C[sample], w = weight[sample];
  const float ci = c_in[sample];

  float sq = 0.f;
  if (first < numel) {   // no early return: every thread takes part in block_sum
    const bool amb = ambient[sample] != 0;
    const Storage src_type = amb ? t.noisy_type : t.clean_type;
    float f[ELEMS], x[ELEMS], s[ELEMS], r[ELEMS];
    load_any(row_of(t.F, t.F_type, sample, numel), t.F_type, first, numel, vector_ok, f);
    load_any(row_of(t.net_in, t.net_in_type, sample, numel), t.net_in_type, first, numel, vector_ok, x);
    load_any(row_of(amb ? t.noisy : t.clean, src_type, sample, numel), src_type, first, numel, vector_ok, s);
#pragma unroll
    for (int k = 0; k < ELEMS; ++k) {
      r[k] = first + k < numel ? a * f[k] + b * (x[k] / ci) + c * s[k] : 0.f;
      sq += r[k] * r[k];
    }
    if (t.out != nullptr) {
      const float g = 2.0f * grad_scale * w * a;   // d(mean_i loss_i)/dF for grad_scale = 1/B
#pragma unroll
      for (int k = 0; k < ELEMS; ++k) r[k] *= g;
      store_any(row_of(t.out, t.out_type, sample, numel), t.out_type, first, numel, vector_ok, r);
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
__global__ void rescale_rows_kernel(Tensors t, const float* __restrict__ upstream, float expected,
                                    int64_t numel, bool vector_ok, bool in_place) {
  const int64_t sample = blockIdx.y;
  const float ratio = upstream[sample] / expected;
  // In place, a factor of 1 (the caller's backward_scale was passed in) leaves the row as it
  // is: the check costs one scalar load per block and no host sync. "1" up to a few float32
  // roundings (kUnitRatioTolerance): autograd may form upstream as a product with a rounded
  // reciprocal (CUDA's division by a scalar), the forward pass as a quotient.
  if (in_place && fabsf(ratio - 1.0f) <= kUnitRatioTolerance) return;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * ELEMS;
  if (first >= numel) return;
  float g[ELEMS];
  load_any(row_of(t.F, t.F_type, sample, numel), t.F_type, first, numel, vector_ok, g);
#pragma unroll
  for (int k = 0; k < ELEMS; ++k) g[k] *= ratio;
  store_any(row_of(t.out, t.out_type, sample, numel), t.out_type, first, numel, vector_ok, g);
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

cudaError_t network_input(const Tensors& t, const float* P, const float* Q, const float* c_in,
                          const uint8_t* ambient, int64_t batch, int64_t numel, bool vector_ok,
                          NoiseKey noise, cudaStream_t stream) {
  if (batch == 0 || numel == 0) return cudaSuccess;
  const Launch launch = launch_for(numel);
  const dim3 grid(launch.blocks_per_sample, static_cast<unsigned>(batch));
  network_input_kernel<<<grid, launch.threads, 0, stream>>>(t, P, Q, c_in, ambient, numel, vector_ok, noise);
  return cudaGetLastError();
}

cudaError_t residual_loss(const Tensors& t, float* loss, const float* A, const float* B, const float* C,
                          const float* c_in, const float* weight, const uint8_t* ambient, int64_t batch,
                          int64_t numel, bool vector_ok, float grad_scale, bool ordered, cudaStream_t stream) {
  if (batch == 0 || numel == 0) return cudaSuccess;
  const Launch launch = launch_for(numel);
  const dim3 grid(launch.blocks_per_sample, static_cast<unsigned>(batch));
  residual_loss_kernel<<<grid, launch.threads, 0, stream>>>(t, loss, A, B, C, c_in, weight, ambient, numel,
                                                            vector_ok, grad_scale, ordered);
  return cudaGetLastError();
}

cudaError_t rescale_rows(const Tensors& t, const float* upstream, float expected, int64_t batch,
                         int64_t numel, bool vector_ok, cudaStream_t stream) {
  if (batch == 0 || numel == 0) return cudaSuccess;
  const Launch launch = launch_for(numel);
  const dim3 grid(launch.blocks_per_sample, static_cast<unsigned>(batch));
  rescale_rows_kernel<<<grid, launch.threads, 0, stream>>>(t, upstream, expected, numel, vector_ok,
                                                           t.F == t.out);
  return cudaGetLastError();
}

}  // namespace two_branch
