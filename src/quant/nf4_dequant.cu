// CUDA NF4 dequantization: one thread per packed byte (two output elements); see nf4_cuda.h.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "quant/nf4_cuda.h"

namespace ftune::quant::cuda {
namespace {

struct Code16 {
  float v[16];
};

__global__ void dequant_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax_f32,
                               const uint8_t* __restrict__ absmax_u8,
                               const float* __restrict__ nested_absmax,
                               const float* __restrict__ nested_map, float offset, Code16 code,
                               int64_t n, int64_t blocksize, int64_t nested_blocksize, void* out,
                               int bf16) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // byte index
  const int64_t e = 2 * i;
  if (e >= n) return;
  const int64_t b = e / blocksize;  // blocksize is even: both elements share the block
  float a;
  if (absmax_u8) {
    a = __fadd_rn(__fmul_rn(nested_map[absmax_u8[b]], nested_absmax[b / nested_blocksize]), offset);
  } else {
    a = absmax_f32[b];
  }
  const uint8_t byte = packed[i];
  const float v0 = __fmul_rn(code.v[byte >> 4], a);
  const float v1 = __fmul_rn(code.v[byte & 15], a);
  const bool second = e + 1 < n;
  if (bf16) {
    auto* o = static_cast<__nv_bfloat16*>(out);
    o[e] = __float2bfloat16_rn(v0);
    if (second) o[e + 1] = __float2bfloat16_rn(v1);
  } else {
    auto* o = static_cast<float*>(out);
    o[e] = v0;
    if (second) o[e + 1] = v1;
  }
}

}  // namespace

int launch_dequantize_nf4(const Nf4DeviceArgs& a, void* out, OutDtype dtype, void* stream) {
  if (a.n <= 0) return 0;
  Code16 code;
  for (int j = 0; j < 16; ++j) code.v[j] = a.code[j];
  const int64_t bytes = (a.n + 1) / 2;
  const int threads = 256;
  const int64_t blocks = (bytes + threads - 1) / threads;
  dequant_kernel<<<static_cast<unsigned>(blocks), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      a.packed, a.absmax_f32, a.absmax_u8, a.nested_absmax, a.nested_quant_map, a.offset, code, a.n,
      a.blocksize, a.nested_blocksize, out, dtype == OutDtype::kBF16 ? 1 : 0);
  return static_cast<int>(cudaGetLastError());
}

const char* cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace ftune::quant::cuda
