// HF model-dir load/save for LlamaForCausalLM; see hf_io.h.
#include "model/hf_io.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
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
// Weights named in `nf4` are in bitsandbytes' 4-bit layout: their keys are accepted here and
// checked by quant::from_bnb_tensors when read.
void check_checkpoint(const LlamaConfig& c, const std::map<std::string, TensorMeta>& found,
                      const std::string& origin, const std::set<std::string>& nf4 = {}) {
  std::set<std::string> known;
  for (const auto& [name, shape] : parameter_shapes(c)) {
    auto it = found.find(name);
    FTUNE_CHECK(it != found.end(), origin, ": missing tensor ", name);
    const TensorMeta& t = it->second;
    if (nf4.count(name)) {
      for (const std::string& suffix : quant::bnb_key_suffixes(true)) known.insert(name + suffix);
      continue;
    }
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

const char* const kNf4StateSuffix = ".quant_state.bitsandbytes__nf4";

// A decoder-layer linear weight (the weights LoadOptions::quant quantizes).
bool is_decoder_linear_weight(const std::string& name) {
  const std::string tail = "_proj.weight";
  return name.rfind("model.layers.", 0) == 0 && name.size() > tail.size() &&
         name.compare(name.size() - tail.size(), tail.size(), tail) == 0;
}

// Bytes of `c`'s weights with the decoder linears in NF4 (double quant: 4.127 bits/param) and
// everything else in `dtype`; refuses, as check_fits_in_memory does, more than physical RAM.
void check_fits_in_memory_nf4(const LlamaConfig& c, at::ScalarType dtype, const std::string& origin) {
  // From the sizes alone (parameter_shapes would walk every layer of an absurd config).
  const double h = static_cast<double>(c.hidden_size), i = static_cast<double>(c.intermediate_size);
  const double q = static_cast<double>(c.num_attention_heads * c.dim_head());
  const double kv = static_cast<double>(c.num_key_value_heads * c.dim_head());
  const double linear = static_cast<double>(c.num_hidden_layers) * (2 * h * q + 2 * h * kv + 3 * h * i);
  const double rest = static_cast<double>(c.num_parameters()) - linear;
  const double need = linear * (0.5 + 1.0 / 64) + rest * static_cast<double>(c10::elementSize(dtype));
  const int64_t have = physical_memory_bytes();
  auto gb = [](double bytes) { return std::round(bytes / 1e8) / 10; };
  FTUNE_CHECK(have <= 0 || need <= static_cast<double>(have), origin, ": model needs ", gb(need),
              " GB with 4-bit linears and the rest in ", dtype_name(dtype),
              ", more than this machine's ", gb(static_cast<double>(have)), " GB");
}

// Whether config.json says the checkpoint is bitsandbytes 4-bit (transformers' quantization_config).
bool config_says_4bit(const LlamaConfig& c) {
  auto q = c.extra.find("quantization_config");
  return q != c.extra.end() && q->is_object() && q->value("load_in_4bit", false);
}

// The compute dtype config.json's quantization_config names (transformers' bnb_4bit_compute_dtype).
std::optional<at::ScalarType> config_compute_dtype(const LlamaConfig& c, const std::string& origin) {
  auto q = c.extra.find("quantization_config");
  if (q == c.extra.end() || !q->is_object()) return std::nullopt;
  auto d = q->find("bnb_4bit_compute_dtype");
  if (d == q->end() || !d->is_string()) return std::nullopt;
  const std::string name = d->get<std::string>();
  if (name == "float16") return at::kFloat;  // ftune has no fp16 compute; fp32 is exact-er
  return dtype_from_name(name, origin + ": quantization_config.bnb_4bit_compute_dtype");
}

// transformers' quantization_config for a load_in_4bit model (as save_pretrained writes it).
json quantization_config(const quant::Nf4Tensor& w, at::ScalarType compute_dtype) {
  return json{{"_load_in_4bit", true},
              {"_load_in_8bit", false},
              {"bnb_4bit_compute_dtype", dtype_name(compute_dtype)},
              {"bnb_4bit_quant_storage", "uint8"},
              {"bnb_4bit_quant_type", "nf4"},
              {"bnb_4bit_use_double_quant", w.double_quant()},
              {"llm_int8_enable_fp32_cpu_offload", false},
              {"llm_int8_has_fp16_weight", false},
              {"llm_int8_skip_modules", nullptr},
              {"llm_int8_threshold", 6.0},
              {"load_in_4bit", true},
              {"load_in_8bit", false},
              {"quant_method", "bitsandbytes"}};
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
  if (opts.quant) quant::validate(*opts.quant, "quant");
  LlamaConfig cfg = load_config(dir);  // validated, parameter count overflow-checked
  const std::string cfg_path = (dir / "config.json").string();
  const at::ScalarType dtype = opts.dtype.value_or(
      cfg.torch_dtype == "bfloat16" ? at::kBFloat16 : at::kFloat);
  if (opts.device.is_cpu()) {
    if (opts.quant || config_says_4bit(cfg)) {
      check_fits_in_memory_nf4(cfg, dtype, cfg_path);
    } else {
      cfg.check_fits_in_memory(dtype, cfg_path);
    }
  }
  // Headers only: names, shapes and dtypes are checked before any weight memory is allocated.
  io::SafetensorsDir files(dir);
  std::map<std::string, TensorMeta> found;
  std::set<std::string> nf4_stored;  // weights in bitsandbytes' 4-bit layout
  for (const std::string& name : files.names()) {
    const io::SafetensorsReader& r = files.reader(name);
    found.emplace(name, TensorMeta{r.entry(name).dtype, r.entry(name).shape, r.path().string()});
    for (const char* qt : {kNf4StateSuffix, ".quant_state.bitsandbytes__fp4"}) {
      const std::string suffix = qt;
      if (name.size() > suffix.size() &&
          name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
        const std::string w = name.substr(0, name.size() - suffix.size());
        FTUNE_CHECK(suffix == kNf4StateSuffix, r.path().string(), ": ", name,
                    ": quant_type fp4 is not supported: expected nf4");
        FTUNE_CHECK(is_decoder_linear_weight(w), r.path().string(), ": ", name,
                    ": only the decoder layers' linear weights can be 4-bit");
        nf4_stored.insert(w);
      }
    }
  }
  check_checkpoint(cfg, found, dir.string(), nf4_stored);
  const bool nf4 = opts.quant || !nf4_stored.empty();
  const at::ScalarType compute_dtype =
      opts.quant ? opts.quant->compute_dtype : config_compute_dtype(cfg, cfg_path).value_or(dtype);
  LlamaForCausalLM m{nullptr};
  const auto topts = at::TensorOptions().dtype(dtype).device(opts.device);
  try {
    m = LlamaForCausalLM(cfg, topts, nf4);
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    fail(cfg_path, ": cannot allocate ", cfg.num_parameters(), " parameters in ", dtype_name(dtype),
         " on ", opts.device.str(), ": ", what.substr(0, what.find('\n')));
  }
  torch::NoGradGuard no_grad;
  if (nf4) {
    // One linear at a time: stored 4-bit tensors are copied as they are; a dense weight is read,
    // quantized and dropped before the next (a stored dense linear stays dense without quant).
    const auto getter = [&](const std::string& key) {
      return files.contains(key) ? files.reader(key).tensor(key).clone() : at::Tensor();
    };
    // One scratch buffer, reused for every weight read before quantizing: allocating and
    // freeing a dense weight per linear fragments the heap around the packed results (measured:
    // +20-40 MB of peak on a 25M-parameter model).
    at::Tensor scratch;
    if (opts.quant) {
      int64_t most = 0;
      for (auto& [mod, lin] : linears(m)) {
        if (mod.rfind("model.layers.", 0) == 0) {
          most = std::max(most, lin->out_features() * lin->in_features());
        }
      }
      scratch = at::empty({most}, at::TensorOptions().dtype(dtype));
    }
    for (auto& [mod, lin] : linears(m)) {
      if (mod.rfind("model.layers.", 0) != 0) continue;
      const std::string name = mod + ".weight";
      const std::vector<int64_t> shape = {lin->out_features(), lin->in_features()};
      if (nf4_stored.count(name)) {
        auto w = std::make_shared<quant::Nf4Tensor>(quant::from_bnb_tensors(
            getter, name, files.reader(name + kNf4StateSuffix).path().string(), shape));
        lin->set_nf4(std::make_shared<quant::Nf4Tensor>(w->to(opts.device)), compute_dtype, topts);
      } else if (opts.quant) {
        at::Tensor dense = scratch.slice(0, 0, shape[0] * shape[1]).view(shape);
        files.reader(name).read_into(name, dense);
        auto w = std::make_shared<quant::Nf4Tensor>(quant::quantize_nf4(dense, *opts.quant));
        lin->set_nf4(std::make_shared<quant::Nf4Tensor>(w->to(opts.device)), compute_dtype, topts);
      } else {
        lin->set_dense_weight(at::empty(shape, topts));
      }
    }
  }
  // Each dense weight is written once, straight from the mapping into its final dtype and device.
  for (auto& [name, p] : base_parameters(*m)) files.reader(name).read_into(name, p);
  return m;
}

BaseBytes base_bytes(LlamaForCausalLM& m) {
  BaseBytes b;
  std::set<const void*> seen;  // tensors shared between NF4 weights (the code tables) count once
  auto add = [&](const at::Tensor& t) {
    if (t.defined() && seen.insert(t.data_ptr()).second) b.nf4_bytes += static_cast<int64_t>(t.nbytes());
  };
  for (auto& [name, lin] : linears(m)) {
    if (!lin->nf4) continue;
    const quant::Nf4Tensor& w = *lin->nf4;
    b.nf4_params += w.numel();
    for (const at::Tensor* t : {&w.packed, &w.absmax, &w.nested_absmax, &w.nested_quant_map, &w.quant_map}) {
      add(*t);
    }
    if (w.double_quant()) b.nf4_bytes += 4;  // the offset
  }
  for (const auto& [name, p] : base_parameters(*m)) {
    b.dense_params += p.numel();
    b.dense_bytes += static_cast<int64_t>(p.nbytes());
  }
  return b;
}

std::vector<std::pair<std::string, std::shared_ptr<LinearImpl>>> linears(LlamaForCausalLM& m) {
  std::vector<std::pair<std::string, std::shared_ptr<LinearImpl>>> out;
  for (const auto& item : m->named_modules()) {
    if (item.key().find(".lora_") != std::string::npos) continue;
    if (auto lin = std::dynamic_pointer_cast<LinearImpl>(item.value())) out.emplace_back(item.key(), lin);
  }
  return out;
}

bool has_nf4_linears(LlamaForCausalLM& m) {
  for (auto& [name, lin] : linears(m)) {
    if (lin->nf4) return true;
  }
  return false;
}

void dequantize_linears(LlamaForCausalLM& m, at::ScalarType dtype) {
  torch::NoGradGuard no_grad;
  for (auto& [name, lin] : linears(m)) {
    if (lin->nf4) lin->set_dense_weight(quant::dequantize_nf4(*lin->nf4, dtype));
  }
}

std::vector<io::TensorSpec> model_weight_specs(LlamaForCausalLM& m) {
  std::vector<io::TensorSpec> specs;
  for (const auto& [name, p] : base_parameters(*m)) specs.push_back({name, p.scalar_type(), p.sizes().vec()});
  for (auto& [name, lin] : linears(m)) {
    if (!lin->nf4) continue;
    // to_bnb_tensors copies the 4-bit tensors to the CPU before it reads their shapes: hand it
    // uninitialized CPU stand-ins (pages never touched cost no memory), so a CUDA weight is not
    // copied and a storage-less one (sharded) not read.
    quant::Nf4Tensor shapes = *lin->nf4;
    for (at::Tensor* t : {&shapes.packed, &shapes.absmax, &shapes.nested_absmax,
                          &shapes.nested_quant_map, &shapes.quant_map}) {
      if (t->defined()) *t = at::empty(t->sizes(), t->options().device(at::kCPU));
    }
    for (const auto& [key, t] : quant::to_bnb_tensors(shapes, name + ".weight")) {
      specs.push_back({key, t.scalar_type(), t.sizes().vec()});
    }
  }
  return specs;
}

io::TensorList model_weights(LlamaForCausalLM& m, int64_t unit) {
  const LlamaConfig& c = m->config();
  io::TensorList tensors;
  for (const auto& [name, p] : base_parameters(*m)) {
    if (unit < 0 || unit_of(name, c) == unit) tensors.emplace_back(name, p.detach());
  }
  for (auto& [name, lin] : linears(m)) {
    if (!lin->nf4 || (unit >= 0 && unit_of(name + ".weight", c) != unit)) continue;
    for (auto& kv : quant::to_bnb_tensors(*lin->nf4, name + ".weight")) tensors.push_back(std::move(kv));
  }
  return tensors;
}

void save_model_config(const fs::path& dir, LlamaForCausalLM& m) {
  LlamaConfig cfg = m->config();
  cfg.extra.erase("quantization_config");
  for (auto& [name, lin] : linears(m)) {
    if (lin->nf4) {
      cfg.extra["quantization_config"] = quantization_config(*lin->nf4, lin->nf4_compute_dtype);
      break;
    }
  }
  at::ScalarType dtype = at::kFloat;
  for (const auto& [name, p] : base_parameters(*m)) dtype = p.scalar_type();
  cfg.torch_dtype = dtype_name(dtype);
  write_file_atomic(dir / "config.json", cfg.to_json().dump(2) + "\n");
  write_file_atomic(dir / "generation_config.json", cfg.generation_config_json().dump(2) + "\n");
}

void save_model(const fs::path& dir, LlamaForCausalLM& m, int64_t max_shard_bytes) {
  fs::create_directories(dir);
  io::save_weights(dir, model_weights(m), max_shard_bytes);
  save_model_config(dir, m);
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
