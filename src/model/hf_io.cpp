// HF model-dir load/save for LlamaForCausalLM; see hf_io.h.
#include "model/hf_io.h"

#include <nlohmann/json.hpp>

#include <set>

#include "core/error.h"
#include "core/fs.h"
#include "io/safetensors.h"
#include "tokenizer/unicode.h"

namespace ftune::model {
namespace fs = std::filesystem;
using nlohmann::json;

at::ScalarType dtype_from_name(const std::string& name, const std::string& origin) {
  if (name == "float32" || name == "fp32") return at::kFloat;
  if (name == "bfloat16" || name == "bf16") return at::kBFloat16;
  // fp16 has too little range to train without loss scaling, which ftune does not implement, so
  // no command offers it (a config.json saying float16 still loads, as float32).
  FTUNE_CHECK(name != "float16" && name != "fp16", origin, ": ", name,
              " is not supported (fp16 needs loss scaling, which ftune lacks); expected fp32 or bf16");
  fail(origin, ": expected fp32 or bf16 (float32, bfloat16), got \"", name, "\"");
}

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: fail("dtype: unsupported model dtype ", c10::toString(t));
  }
}

void load_weights_into(LlamaForCausalLM& m, const std::map<std::string, at::Tensor>& weights,
                       const std::string& origin) {
  torch::NoGradGuard no_grad;
  auto params = m->named_parameters();
  // Validate everything before mutating the model.
  for (const auto& p : params) {
    auto it = weights.find(p.key());
    FTUNE_CHECK(it != weights.end(), origin, ": missing tensor ", p.key());
    FTUNE_CHECK(it->second.sizes() == p.value().sizes(), origin, ": ", p.key(), ": shape ",
                it->second.sizes(), " does not match config shape ", p.value().sizes());
  }
  std::set<std::string> known;
  for (const auto& p : params) known.insert(p.key());
  for (const auto& [name, t] : weights) {
    if (known.count(name)) continue;
    // Some tied checkpoints still carry lm_head.weight; rotary inv_freq buffers are harmless.
    if (name == "lm_head.weight" && m->config().tie_word_embeddings) continue;
    if (name.find("rotary_emb.inv_freq") != std::string::npos) continue;
    fail(origin, ": unexpected tensor ", name, " (not in a Llama model with this config)");
  }
  for (auto& p : params) p.value().copy_(weights.at(p.key()));
}

LlamaForCausalLM load_model(const fs::path& dir, const LoadOptions& opts) {
  LlamaConfig cfg = load_config(dir);
  at::ScalarType dtype = opts.dtype.value_or(
      cfg.torch_dtype == "bfloat16" ? at::kBFloat16 : at::kFloat);
  auto weights = io::load_weights(dir);
  LlamaForCausalLM m(cfg);
  m->to(dtype);
  load_weights_into(m, weights, dir.string());
  m->to(opts.device);
  return m;
}

void save_model(const fs::path& dir, LlamaForCausalLM& m, int64_t max_shard_bytes) {
  fs::create_directories(dir);
  io::TensorList tensors;
  at::ScalarType dtype = at::kFloat;
  for (const auto& p : m->named_parameters()) {
    tensors.emplace_back(p.key(), p.value().detach());
    dtype = p.value().scalar_type();
  }
  LlamaConfig cfg = m->config();
  cfg.torch_dtype = dtype_name(dtype);
  io::save_weights(dir, tensors, max_shard_bytes);
  write_file_atomic(dir / "config.json", cfg.to_json().dump(2) + "\n");
  write_file_atomic(dir / "generation_config.json", cfg.generation_config_json().dump(2) + "\n");
}

void copy_tokenizer_files(const fs::path& from, const fs::path& to) {
  fs::create_directories(to);
  for (const char* f : {"tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                        "special_tokens_map.json", "chat_template.jinja"}) {
    if (fs::exists(from / f) && fs::absolute(from) != fs::absolute(to)) {
      write_file_atomic(to / f, read_file(from / f));
    }
  }
}

void write_byte_level_tokenizer(const fs::path& dir) {
  json vocab = json::object();
  const auto& alphabet = tok::byte_to_unicode_table();
  for (int b = 0; b < 256; ++b) vocab[alphabet[b]] = b;
  const char* specials[] = {"<s>", "</s>", "<pad>"};
  json added = json::array();
  for (int i = 0; i < 3; ++i) {
    added.push_back({{"id", 256 + i}, {"content", specials[i]}, {"single_word", false},
                     {"lstrip", false}, {"rstrip", false}, {"normalized", false},
                     {"special", true}});
  }
  json tok = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true},
        {"use_regex", true}}},
      {"post_processor",
       {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false},
        {"use_regex", true}}},
      {"decoder",
       {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true},
        {"use_regex", true}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr},
        {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr},
        {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
        {"vocab", vocab}, {"merges", json::array()}}}};
  const char* chatml =
      "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
      "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
      "{{ '<|im_start|>assistant\\n' }}{% endif %}";
  json cfg = {{"tokenizer_class", "PreTrainedTokenizerFast"},
              {"bos_token", "<s>"},
              {"eos_token", "</s>"},
              {"pad_token", "<pad>"},
              {"unk_token", nullptr},
              {"add_bos_token", false},
              {"add_eos_token", false},
              {"clean_up_tokenization_spaces", false},
              {"model_max_length", 1000000},
              {"chat_template", chatml}};
  fs::create_directories(dir);
  write_file_atomic(dir / "tokenizer.json", tok.dump(2) + "\n");
  write_file_atomic(dir / "tokenizer_config.json", cfg.dump(2) + "\n");
}

}  // namespace ftune::model
