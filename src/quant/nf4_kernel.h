// The NF4 dequantization inner loop, included by nf4_kernel.cpp (baseline x86-64) and
// nf4_kernel_avx2.cpp (-mavx2 -mfma): one source, two instruction sets, picked at run time.
// Per block a 16-entry table of already-scaled output values is built (the same float product
// bitsandbytes computes), then every packed byte becomes two table lookups: a loop the compiler
// vectorizes (gathers under AVX2). Values are carried as raw bits (float, or uint16_t for
// bf16) so the loop has no conversion in it.
#pragma once

#include <cstdint>

namespace ftune::quant::kernel {

// Output element kinds: fp32, and bf16 as raw bits.
enum class OutKind { kF32, kBF16 };

// Dequantizes blocks [b0, b1) of an n-element NF4 tensor into `out` (n elements of `kind`).
// `absmax` is fp32 per block; `code` holds the 16 code values already rounded to the output
// dtype (as floats), so out = round(code[q] * absmax[block]).
using DequantFn = void (*)(const uint8_t* packed, const float* absmax, const float* code,
                           void* out, OutKind kind, int64_t n, int64_t blocksize, int64_t b0,
                           int64_t b1);

void dequant_blocks_default(const uint8_t* packed, const float* absmax, const float* code,
                            void* out, OutKind kind, int64_t n, int64_t blocksize, int64_t b0,
                            int64_t b1);
void dequant_blocks_avx2(const uint8_t* packed, const float* absmax, const float* code, void* out,
                         OutKind kind, int64_t n, int64_t blocksize, int64_t b0, int64_t b1);

}  // namespace ftune::quant::kernel
