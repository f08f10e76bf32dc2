// The CUDA NF4 dequantization kernel behind a raw-pointer launcher (nf4_dequant.cu): no torch
// types, so it compiles with nvcc against any LibTorch, a CPU-only one included. dequantize_nf4
// calls it for CUDA tensors when torch has CUDA (FTUNE_NF4_CUDA); the GPU test drives it directly.
// Same arithmetic as the CPU kernel: absmax = nested_map[q] * nested_absmax + offset, then
// out = round(code[q] * absmax), each step rounded separately (no fused multiply-add).
#pragma once

#include <cstdint>

namespace ftune::quant::cuda {

// Device pointers of one Nf4Tensor, plus its code table already rounded to the output dtype.
struct Nf4DeviceArgs {
  const uint8_t* packed = nullptr;         // [ceil(n / 2)]
  const float* absmax_f32 = nullptr;       // [nblocks] without double quantization
  const uint8_t* absmax_u8 = nullptr;      // [nblocks] with double quantization
  const float* nested_absmax = nullptr;    // [ceil(nblocks / nested_blocksize)]
  const float* nested_quant_map = nullptr; // [256]
  float offset = 0;
  float code[16] = {};
  int64_t n = 0, blocksize = 64, nested_blocksize = 256;
};

enum class OutDtype : int { kF32 = 0, kBF16 = 1 };

// Launches on `stream` (a cudaStream_t; nullptr = the default stream). Returns 0 or the
// cudaError_t of the launch.
int launch_dequantize_nf4(const Nf4DeviceArgs& a, void* out, OutDtype dtype, void* stream);
// cudaGetErrorString for a value launch_dequantize_nf4 returned.
const char* cuda_error_string(int err);

}  // namespace ftune::quant::cuda
