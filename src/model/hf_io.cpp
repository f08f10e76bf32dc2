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

namespace {

// One checkpoint tensor as its header (or an in-memory tensor) describes it.
struct TensorMeta {
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  std::string file;  // where it comes from, for errors
};

// Checks a checkpoint's tensors against the parameters `c` needs before anything is allocated:
// every parameter present with its config shape and a float dtype, and nothing unexpected.
void check_checkpoint(const LlamaConfig& c, const std::map<std::string, TensorMeta>& found,
                      const std::string& origin) {
  std::set<std::string> known;
  for (const auto& [name, shape] : parameter_shapes(c)) {
    auto it = found.find(name);
    FTUNE_CHECK(it != found.end(), origin, ": missing tensor ", name);
    const TensorMeta& t = it->second;
    FTUNE_CHECK(t.shape == shape, t.file, ": ", name, ": shape ", at::IntArrayRef(t.shape),
                " does not match config shape ", at::IntArrayRef(shape));
    if (!at::isFloatingType(t.dtype)) {
      const char* st = io::safetensors_dtype_name(t.dtype);
      fail(t.file, ": ", name, ": dtype ", st ? st : c10::toString(t.dtype),
           ", expected a float dtype (F32/BF16/F16)");
    }
    known.insert(name);
  }
  for (const auto& [name, t] : found) {
    if (known.count(name)) continue;
    // Some tied checkpoints still carry lm_head.weight; rotary inv_freq buffers are harmless.
    if (name == "lm_head.weight" && c.tie_word_embeddings) continue;
    if (name.find("rotary_emb.inv_freq") != std::string::npos) continue;
    fail(t.file, ": unexpected tensor ", name, " (not in a Llama model with this config)");
  }
}

}  // namespace

void load_weights_into(LlamaForCausalLM& m, const std::map<std::string, at::Tensor>& weights,
                       const std::string& origin) {
  std::map<std::string, TensorMeta> found;
  for (const auto& [name, t] : weights) {
    found.emplace(name, TensorMeta{t.scalar_type(), t.sizes().vec(), origin});
  }
  check_checkpoint(m->config(), found, origin);
  torch::NoGradGuard no_grad;
  for (auto& [name, p] : base_parameters(*m)) p.copy_(weights.at(name));
}

LlamaForCausalLM load_model(const fs::path& dir, const LoadOptions& opts) {
  FTUNE_CHECK(!opts.quant, dir.string(), ": quantized loading is not available yet");
  LlamaConfig cfg = load_config(dir);  // validated, parameter count overflow-checked
  const std::string cfg_path = (dir / "config.json").string();
  const at::ScalarType dtype = opts.dtype.value_or(
      cfg.torch_dtype == "bfloat16" ? at::kBFloat16 : at::kFloat);
  if (opts.device.is_cpu()) cfg.check_fits_in_memory(dtype, cfg_path);
  // Headers only: names, shapes and dtypes are checked before any weight memory is allocated.
  io::SafetensorsDir files(dir);
  std::map<std::string, TensorMeta> found;
  for (const std::string& name : files.names()) {
    const io::SafetensorsReader& r = files.reader(name);
    found.emplace(name, TensorMeta{r.entry(name).dtype, r.entry(name).shape, r.path().string()});
  }
  check_checkpoint(cfg, found, dir.string());
  LlamaForCausalLM m{nullptr};
  try {
    m = LlamaForCausalLM(cfg, at::TensorOptions().dtype(dtype).device(opts.device));
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    fail(cfg_path, ": cannot allocate ", cfg.num_parameters(), " parameters in ", dtype_name(dtype),
         " on ", opts.device.str(), ": ", what.substr(0, what.find('\n')));
  }
  // Each weight is written once, straight from the mapping into its final dtype and device.
  torch::NoGradGuard no_grad;
  for (auto& [name, p] : base_parameters(*m)) files.reader(name).read_into(name, p);
  return m;
}

void save_model(const fs::path& dir, LlamaForCausalLM& m, int64_t max_shard_bytes) {
  fs::create_directories(dir);
  io::TensorList tensors;
  at::ScalarType dtype = at::kFloat;
  for (const auto& [name, p] : base_parameters(*m)) {
    tensors.emplace_back(name, p.detach());
    dtype = p.scalar_type();
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
