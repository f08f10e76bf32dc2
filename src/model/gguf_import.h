// GGUF -> HF model dir: maps a llama.cpp "llama" GGUF file (hyper-parameters, dequantized
// weights, tokenizer vocabulary) onto what transformers' LlamaForCausalLM reads from a model dir.
// Weights come back as float32 under HF names, with llama.cpp's Q/K row permutation undone; the
// tokenizer comes back as tokenizer.json / tokenizer_config.json contents, built from the
// tokenizer.ggml.* metadata the way the original HF tokenizer of such a model is laid out.
// Trade-off: everything is dequantized to fp32 up front (simple, exact; ~4 bytes per parameter of
// memory), since ftune trains dense weights; see docs/gguf.md.
#pragma once

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <map>
#include <string>

#include "model/config.h"

namespace ftune::io {
class GgufFile;
}

namespace ftune::model {

struct GgufImport {
  LlamaConfig config;                         // torch_dtype "float32"
  std::map<std::string, at::Tensor> weights;  // HF name -> float32 tensor, HF layout
  nlohmann::json tokenizer_json;              // an HF tokenizers tokenizer.json
  nlohmann::json tokenizer_config;            // tokenizer_config.json: specials, chat template
  nlohmann::json generation_config;           // generation_config.json (bos/eos/pad ids)
};

// Reads and converts `path`. Throws ftune::Error "<path>: <field>: <problem>" for anything it
// cannot convert faithfully (another architecture, unknown tensors, unsupported RoPE scaling or
// tokenizer, shapes that disagree with the hyper-parameters).
GgufImport import_gguf(const std::filesystem::path& path);

// The pieces of import_gguf, for callers that already hold the parsed file.
LlamaConfig gguf_llama_config(const io::GgufFile& f);
std::map<std::string, at::Tensor> gguf_llama_weights(const io::GgufFile& f, const LlamaConfig& c);
// tokenizer.json and tokenizer_config.json contents from tokenizer.ggml.* metadata ("gpt2"
// byte-level BPE or "llama" SentencePiece-style vocabularies).
nlohmann::json gguf_tokenizer_json(const nlohmann::json& metadata, const std::string& origin);
nlohmann::json gguf_tokenizer_config(const nlohmann::json& metadata, const std::string& origin);

// Inverse of llama.cpp's convert_hf_to_gguf.py `permute` for Q/K projection rows (weights or
// biases): rows are stored per head as (head_dim/2, 2) interleaved pairs; HF wants (2, head_dim/2).
at::Tensor unpermute_qk_rows(const at::Tensor& w, int64_t n_heads);  // [n_heads*head_dim, ...]

// Writes `imp` as an HF model dir (config.json, model.safetensors, generation_config.json,
// tokenizer.json, tokenizer_config.json) with weights in `dtype` (kFloat or kBFloat16).
void write_gguf_import(const GgufImport& imp, const std::filesystem::path& dir,
                       at::ScalarType dtype);

}  // namespace ftune::model
