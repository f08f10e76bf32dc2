// LlamaConfig: the hyper-parameters of a Llama-family model, read from and written to an HF
// config.json (../shared/REFERENCE.md §1), plus the named presets `ftune init-model` offers.
// Unknown keys are kept verbatim and written back, so a round trip never loses what transformers
// put there; values ftune cannot honour (another architecture, activation or RoPE type) are errors.
#pragma once

#include <c10/core/ScalarType.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace ftune::model {

struct RopeScaling {
  std::string rope_type = "llama3";  // "llama3" or "linear"
  double factor = 8.0;
  double low_freq_factor = 1.0;      // llama3 only
  double high_freq_factor = 4.0;     // llama3 only
  int64_t original_max_position_embeddings = 8192;  // llama3 only
};

struct LlamaConfig {
  int64_t vocab_size = 32000;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 11008;
  int64_t num_hidden_layers = 32;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = 32;
  int64_t head_dim = 0;  // 0 = hidden_size / num_attention_heads
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::optional<RopeScaling> rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  bool mlp_bias = false;
  double initializer_range = 0.02;
  std::string torch_dtype = "float32";  // "float32" or "bfloat16" (also accepts float16 on read)
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;  // config may hold an int or a list
  std::optional<int64_t> pad_token_id;
  nlohmann::json extra = nlohmann::json::object();  // keys ftune does not interpret, kept as is

  int64_t dim_head() const { return head_dim > 0 ? head_dim : hidden_size / num_attention_heads; }
  // Parameter count; validate() has checked that it and its fp32 byte count fit in int64_t.
  int64_t num_parameters() const;
  // Throws "<origin>: <field>: model needs N GB in <dtype>, more than this machine's M GB" when the
  // weights in `dtype` exceed physical memory; <field> is the size that makes the model that big.
  // For models allocated in CPU memory, before any allocation.
  void check_fits_in_memory(at::ScalarType dtype, const std::string& origin) const;

  // Parses config.json contents; `origin` names the file in errors ("<origin>: <key>: ...").
  static LlamaConfig from_json(const nlohmann::json& j, const std::string& origin);
  nlohmann::json to_json() const;
  // generation_config.json as transformers writes it from a model config (bos/eos/pad ids).
  nlohmann::json generation_config_json() const;
  // Checks internal consistency (positive sizes, heads divide, GQA ratio integral) and that the
  // parameter count cannot overflow ("<origin>: <field>: ... overflows int64").
  void validate(const std::string& origin) const;
};

LlamaConfig load_config(const std::filesystem::path& model_dir);

std::string dtype_name(at::ScalarType t);  // "float32" / "bfloat16" (HF torch_dtype spelling)
int64_t physical_memory_bytes();           // this machine's RAM (sysconf)

// Preset names accepted by `ftune init-model --preset` and `model.path: preset:NAME`.
std::vector<std::string> preset_names();
LlamaConfig preset_config(const std::string& name);  // throws for an unknown name, listing them

}  // namespace ftune::model
