// Loading and saving LlamaForCausalLM as an HF model dir (config.json, model.safetensors or shards,
// generation_config.json). Loading checks the config's sizes and the weights' headers before
// allocating anything: a size that overflows or exceeds RAM, a missing tensor, a shape mismatch,
// an integer dtype or an unexpected tensor is one clear error naming the file. Then each weight is
// copied once from the mapped file into uninitialized storage of the target dtype and device, so
// peak memory is one copy of the weights plus a 16 MB chunk.
// 4-bit (QLoRA) bases: with LoadOptions::quant each decoder-layer linear weight is read, quantized
// to NF4 and dropped before the next, so peak memory is the 4-bit model plus one dense weight; a
// checkpoint in bitsandbytes' serialized 4-bit layout (ftune quantize, transformers'
// save_pretrained of a load_in_4bit model) loads as NF4 without dequantizing, and save_model of a
// model with NF4 linears writes that layout (with transformers' quantization_config).
#pragma once

#include <filesystem>
#include <map>
#include <optional>
#include <string>

#include "io/safetensors.h"
#include "model/llama.h"
#include "quant/nf4.h"

namespace ftune::model {

struct LoadOptions {
  std::optional<at::ScalarType> dtype;  // default: config torch_dtype (float16 becomes float32)
  at::Device device = at::kCPU;
  // Quantize the linear weights of the decoder layers while loading (QLoRA's frozen base); the
  // embeddings, norms and lm_head stay in `dtype`. Validated (quant::validate, origin "quant").
  // A checkpoint already in bitsandbytes' 4-bit layout loads as NF4 with or without it (its
  // compute dtype then comes from here, else from config.json's quantization_config, else dtype).
  std::optional<quant::QuantOptions> quant;
};

at::ScalarType dtype_from_name(const std::string& name, const std::string& origin);  // fp32/bf16/...

// Builds the model for `dir`'s config.json and loads its weights (see the top of this file).
LlamaForCausalLM load_model(const std::filesystem::path& dir, const LoadOptions& opts = {});

// Copies `weights` (HF names) into `m`, converting dtype/device, after the same checks as
// load_model (names, shapes, float dtypes). `origin` names the source.
void load_weights_into(LlamaForCausalLM& m, const std::map<std::string, at::Tensor>& weights,
                       const std::string& origin);

// Writes config.json, weights (in `m`'s dtype) and generation_config.json into `dir`, each file
// atomically. Tokenizer files are the caller's (see copy_tokenizer_files).
void save_model(const std::filesystem::path& dir, LlamaForCausalLM& m,
                int64_t max_shard_bytes = int64_t{5} << 30);

// save_model in parts, for a writer that sees the model one unit at a time (a sharded model's
// streamed export). The weights it writes, in file order: the dense base parameters, then each
// NF4 linear's bitsandbytes tensors. model_weight_specs reads no tensor data (a sharding strategy
// may have freed it): names, dtypes, shapes. model_weights gives the tensors, all or only those of
// unit `unit` (model::unit_of): dense ones are m's own, 4-bit ones CPU copies.
// save_model_config writes config.json and generation_config.json.
std::vector<io::TensorSpec> model_weight_specs(LlamaForCausalLM& m);
io::TensorList model_weights(LlamaForCausalLM& m, int64_t unit = -1);
void save_model_config(const std::filesystem::path& dir, LlamaForCausalLM& m);

// Memory of a model's frozen base: its NF4 linears (every tensor they hold; tables shared between
// linears counted once) and its dense base parameters (embeddings, norms, lm_head, dense
// linears). Adapters are not included.
struct BaseBytes {
  int64_t nf4_params = 0, nf4_bytes = 0;      // elements and bytes of the NF4 linear weights
  int64_t dense_params = 0, dense_bytes = 0;  // the dense base parameters
  int64_t total_bytes() const { return nf4_bytes + dense_bytes; }
  double nf4_bits_per_param() const { return nf4_params ? 8.0 * nf4_bytes / nf4_params : 0; }
};
BaseBytes base_bytes(LlamaForCausalLM& m);

// Every Linear of `m` with its module name, adapters' own linears excluded.
std::vector<std::pair<std::string, std::shared_ptr<LinearImpl>>> linears(LlamaForCausalLM& m);

// Whether any linear of `m` holds an NF4 weight.
bool has_nf4_linears(LlamaForCausalLM& m);

// Turns every NF4 linear of `m` back into a dense one: its weight dequantized (bitsandbytes'
// values) into `dtype` on the same device, registered as a frozen `weight` parameter. Adapters are
// kept. What merging a QLoRA adapter starts from.
void dequantize_linears(LlamaForCausalLM& m, at::ScalarType dtype);

// Copies tokenizer.json/tokenizer.model/tokenizer_config.json/special_tokens_map.json if present.
void copy_tokenizer_files(const std::filesystem::path& from, const std::filesystem::path& to);

// Writes a byte-level tokenizer (256 byte tokens, then <s>, </s>, <pad>; no merges) and a
// tokenizer_config.json with a ChatML chat template: what `init-model` uses without --tokenizer.
void write_byte_level_tokenizer(const std::filesystem::path& dir);

}  // namespace ftune::model
