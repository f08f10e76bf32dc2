// Autoregressive decoding with the KV cache: greedy (equal to transformers' greedy generate) or
// temperature + top-p sampling from a seeded generator.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "model/llama.h"

namespace ftune::model {

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  bool greedy = true;
  double temperature = 1.0;
  double top_p = 1.0;
  uint64_t seed = 0;
  std::vector<int64_t> eos_ids;  // stop after emitting any of these
};

// Returns only the new tokens (including a final eos, as transformers does).
std::vector<int64_t> generate(LlamaForCausalLM& m, const std::vector<int64_t>& prompt,
                              const GenerateOptions& opts);

}  // namespace ftune::model
