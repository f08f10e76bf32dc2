// Loading and saving LlamaForCausalLM as an HF model dir (config.json, model.safetensors or shards,
// generation_config.json). Loading checks the weights against the config before copying anything:
// a missing tensor, a shape mismatch or an unexpected tensor is one clear error naming the file.
#pragma once

#include <filesystem>
#include <map>
#include <optional>
#include <string>

#include "model/llama.h"

namespace ftune::model {

struct LoadOptions {
  std::optional<at::ScalarType> dtype;  // default: config torch_dtype (float16 becomes float32)
  at::Device device = at::kCPU;
};

at::ScalarType dtype_from_name(const std::string& name, const std::string& origin);  // fp32/bf16/...
std::string dtype_name(at::ScalarType t);  // "float32" / "bfloat16" (HF torch_dtype spelling)

// Builds the model for `dir`'s config.json and loads its weights.
LlamaForCausalLM load_model(const std::filesystem::path& dir, const LoadOptions& opts = {});

// Copies `weights` (HF names) into `m`, converting dtype/device. `origin` names the source.
void load_weights_into(LlamaForCausalLM& m, const std::map<std::string, at::Tensor>& weights,
                       const std::string& origin);

// Writes config.json, weights (in `m`'s dtype) and generation_config.json into `dir`, each file
// atomically. Tokenizer files are the caller's (see copy_tokenizer_files).
void save_model(const std::filesystem::path& dir, LlamaForCausalLM& m,
                int64_t max_shard_bytes = int64_t{5} << 30);

// Copies tokenizer.json/tokenizer.model/tokenizer_config.json/special_tokens_map.json if present.
void copy_tokenizer_files(const std::filesystem::path& from, const std::filesystem::path& to);

// Writes a byte-level tokenizer (256 byte tokens, then <s>, </s>, <pad>; no merges) and a
// tokenizer_config.json with a ChatML chat template: what `init-model` uses without --tokenizer.
void write_byte_level_tokenizer(const std::filesystem::path& dir);

}  // namespace ftune::model
