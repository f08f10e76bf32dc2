// NF4 4-bit quantization as bitsandbytes and QLoRA define it (../shared/REFERENCE.md §3).
// Options only for now; the kernels, the bitsandbytes key layout and the 4-bit linear come with
// the quant library. Defines QuantOptions.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

namespace ftune::quant {

struct QuantOptions {
  std::string type = "nf4";      // the only type: NormalFloat4
  bool double_quant = true;      // quantize the absmax too (blocks of 256, 8-bit dynamic map)
  int64_t blocksize = 64;        // elements per absmax
  at::ScalarType compute_dtype = at::kBFloat16;  // dtype the weight is dequantized to for matmuls
};

}  // namespace ftune::quant
