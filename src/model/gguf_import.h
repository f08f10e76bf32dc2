// GGUF -> HF model dir: maps a llama.cpp "llama" GGUF file (hyper-parameters, dequantized
// weights, tokenizer vocabulary) onto what transformers' LlamaForCausalLM reads from a model dir.
// Weights come out as float32 under HF names, with llama.cpp's Q/K row permutation undone; the
// tokenizer comes out as tokenizer.json / tokenizer_config.json contents, built from the
// tokenizer.ggml.* metadata the way the original HF tokenizer of such a model is laid out.
// Trade-off: import_gguf only plans (names, shapes, types checked against the hyper-parameters
// from the header alone); write_gguf_import then streams one tensor at a time from the mapped
// file, so converting needs about one fp32 tensor of memory, not the model; see docs/gguf.md.
#pragma once

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include "model/config.h"

namespace ftune::io {
class GgufFile;
}

namespace ftune::model {

// One weight of the converted model: where it comes from and its HF layout.
struct GgufTensorPlan {
  std::string gguf_name;        // "blk.0.attn_q.weight"
  std::string hf_name;          // "model.layers.0.self_attn.q_proj.weight"
  std::vector<int64_t> shape;   // HF (PyTorch) shape: the GGUF ne reversed
  int64_t unpermute_heads = 0;  // > 0: undo llama.cpp's Q/K row permutation over this many heads
};

struct GgufImport {
  LlamaConfig config;                   // torch_dtype "float32"
  std::vector<GgufTensorPlan> tensors;  // every weight `config` needs, in model parameter order
  nlohmann::json tokenizer_json;        // an HF tokenizers tokenizer.json
  nlohmann::json tokenizer_config;      // tokenizer_config.json: specials, chat template
  nlohmann::json generation_config;     // generation_config.json (bos/eos/pad ids)
};

// Reads everything but the tensor data of `f` and checks it can be converted faithfully. Throws
// ftune::Error "<file>: <key or tensor>: <problem>" otherwise (another architecture, unknown or
// missing tensors, shapes that disagree with the hyper-parameters, types ftune cannot dequantize,
// unsupported RoPE scaling or tokenizer).
GgufImport import_gguf(const io::GgufFile& f);

// The pieces of import_gguf.
LlamaConfig gguf_llama_config(const io::GgufFile& f);
std::vector<GgufTensorPlan> gguf_tensor_plan(const io::GgufFile& f, const LlamaConfig& c);
// tokenizer.json and tokenizer_config.json contents from tokenizer.ggml.* metadata ("gpt2"
// byte-level BPE or "llama" SentencePiece-style vocabularies).
nlohmann::json gguf_tokenizer_json(const nlohmann::json& metadata, const std::string& origin);
nlohmann::json gguf_tokenizer_config(const nlohmann::json& metadata, const std::string& origin);

// One planned weight as a new float32 tensor in HF layout (dequantized, Q/K rows un-permuted).
at::Tensor gguf_import_tensor(const io::GgufFile& f, const GgufTensorPlan& t);

// Inverse of llama.cpp's convert_hf_to_gguf.py `permute` for Q/K projection rows (weights or
// biases): rows are stored per head as (head_dim/2, 2) interleaved pairs; HF wants (2, head_dim/2).
at::Tensor unpermute_qk_rows(const at::Tensor& w, int64_t n_heads);  // [n_heads*head_dim, ...]

// The non-weight files write_gguf_import writes (the weights are model.safetensors, or shards
// and model.safetensors.index.json, as io::save_weights lays them out).
std::vector<std::string> gguf_import_files();

// Writes `imp` (planned from `f`) into `dir`: the weights in `dtype` (kFloat or kBFloat16), streamed
// tensor by tensor, then generation_config.json, tokenizer.json, tokenizer_config.json and
// config.json. Each file is replaced atomically; other files in `dir` are left alone.
void write_gguf_import(const io::GgufFile& f, const GgufImport& imp,
                       const std::filesystem::path& dir, at::ScalarType dtype);

}  // namespace ftune::model
