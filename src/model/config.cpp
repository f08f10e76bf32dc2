// LlamaConfig parsing, validation, serialization and presets; see config.h.
#include "model/config.h"

#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <set>
#include <string_view>

#include "core/error.h"
#include "core/fs.h"

namespace ftune::model {
using nlohmann::json;

namespace {

template <typename T>
T get_as(const json& j, const char* key, const std::string& origin, const char* expected) {
  try {
    return j.at(key).get<T>();
  } catch (const json::exception&) {
    fail(origin, ": ", key, ": expected ", expected, ", got ", j.at(key).dump());
  }
}

int64_t get_int(const json& j, const char* key, const std::string& origin, int64_t dflt) {
  if (!j.contains(key) || j.at(key).is_null()) return dflt;
  FTUNE_CHECK(j.at(key).is_number_integer(), origin, ": ", key, ": expected an integer, got ",
              j.at(key).dump());
  return j.at(key).get<int64_t>();
}

double get_num(const json& j, const char* key, const std::string& origin, double dflt) {
  if (!j.contains(key) || j.at(key).is_null()) return dflt;
  FTUNE_CHECK(j.at(key).is_number(), origin, ": ", key, ": expected a number, got ",
              j.at(key).dump());
  return j.at(key).get<double>();
}

bool get_bool(const json& j, const char* key, const std::string& origin, bool dflt) {
  if (!j.contains(key) || j.at(key).is_null()) return dflt;
  return get_as<bool>(j, key, origin, "true or false");
}

// Keys this parser interprets; everything else goes to `extra` untouched.
const std::set<std::string> kKnownKeys = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias",
    "mlp_bias", "initializer_range", "torch_dtype", "dtype", "bos_token_id", "eos_token_id",
    "pad_token_id", "hidden_act", "model_type", "architectures", "pretraining_tp",
    "attention_dropout"};

// The parameter count as a sum of products of config sizes, so that an overflow or an oversized
// model can be blamed on one field: the largest factor of the largest term.
struct SizeTerm {
  int64_t times;
  std::vector<std::pair<const char*, int64_t>> factors;
};

std::vector<SizeTerm> size_terms(const LlamaConfig& c) {
  const int64_t L = c.num_hidden_layers, h = c.hidden_size, hd = c.dim_head();
  const int64_t nh = c.num_attention_heads, nkv = c.num_key_value_heads, I = c.intermediate_size;
  std::vector<SizeTerm> t = {
      {c.tie_word_embeddings ? 1 : 2, {{"vocab_size", c.vocab_size}, {"hidden_size", h}}},
      {2, {{"num_hidden_layers", L}, {"hidden_size", h}, {"num_attention_heads", nh}, {"head_dim", hd}}},
      {2, {{"num_hidden_layers", L}, {"hidden_size", h}, {"num_key_value_heads", nkv}, {"head_dim", hd}}},
      {3, {{"num_hidden_layers", L}, {"hidden_size", h}, {"intermediate_size", I}}},
      {2, {{"num_hidden_layers", L}, {"hidden_size", h}}},  // the two norms of each layer
      {1, {{"hidden_size", h}}},                            // the final norm
  };
  if (c.attention_bias) {
    t.push_back({1, {{"num_hidden_layers", L}, {"num_attention_heads", nh}, {"head_dim", hd}}});
    t.push_back({2, {{"num_hidden_layers", L}, {"num_key_value_heads", nkv}, {"head_dim", hd}}});
    t.push_back({1, {{"num_hidden_layers", L}, {"hidden_size", h}}});
  }
  if (c.mlp_bias) {
    t.push_back({2, {{"num_hidden_layers", L}, {"intermediate_size", I}}});
    t.push_back({1, {{"num_hidden_layers", L}, {"hidden_size", h}}});
  }
  return t;
}

const std::pair<const char*, int64_t>& largest_factor(const SizeTerm& t) {
  const auto* best = &t.factors[0];
  for (const auto& f : t.factors) {
    if (f.second > best->second) best = &f;
  }
  return *best;
}

// Product of one term; false on int64 overflow.
bool term_value(const SizeTerm& t, int64_t* out) {
  int64_t v = t.times;
  for (const auto& f : t.factors) {
    if (__builtin_mul_overflow(v, f.second, &v)) return false;
  }
  *out = v;
  return true;
}

}  // namespace

LlamaConfig LlamaConfig::from_json(const json& j, const std::string& origin) {
  FTUNE_CHECK(j.is_object(), origin, ": expected a JSON object");
  LlamaConfig c;
  if (j.contains("model_type")) {
    auto mt = get_as<std::string>(j, "model_type", origin, "a string");
    FTUNE_CHECK(mt == "llama", origin, ": model_type: expected \"llama\", got \"", mt, "\"");
  }
  if (j.contains("hidden_act")) {
    auto act = get_as<std::string>(j, "hidden_act", origin, "a string");
    FTUNE_CHECK(act == "silu", origin, ": hidden_act: expected \"silu\", got \"", act, "\"");
  }
  if (j.contains("pretraining_tp")) {
    FTUNE_CHECK(get_int(j, "pretraining_tp", origin, 1) == 1, origin,
                ": pretraining_tp: only 1 is supported");
  }
  if (j.contains("attention_dropout")) {
    FTUNE_CHECK(get_num(j, "attention_dropout", origin, 0.0) == 0.0, origin,
                ": attention_dropout: only 0.0 is supported");
  }
  c.vocab_size = get_int(j, "vocab_size", origin, c.vocab_size);
  c.hidden_size = get_int(j, "hidden_size", origin, c.hidden_size);
  c.intermediate_size = get_int(j, "intermediate_size", origin, c.intermediate_size);
  c.num_hidden_layers = get_int(j, "num_hidden_layers", origin, c.num_hidden_layers);
  c.num_attention_heads = get_int(j, "num_attention_heads", origin, c.num_attention_heads);
  c.num_key_value_heads = get_int(j, "num_key_value_heads", origin, c.num_attention_heads);
  c.head_dim = get_int(j, "head_dim", origin, 0);
  c.max_position_embeddings =
      get_int(j, "max_position_embeddings", origin, c.max_position_embeddings);
  c.rms_norm_eps = get_num(j, "rms_norm_eps", origin, c.rms_norm_eps);
  c.rope_theta = get_num(j, "rope_theta", origin, c.rope_theta);
  c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", origin, false);
  c.attention_bias = get_bool(j, "attention_bias", origin, false);
  c.mlp_bias = get_bool(j, "mlp_bias", origin, false);
  c.initializer_range = get_num(j, "initializer_range", origin, c.initializer_range);
  for (const char* key : {"torch_dtype", "dtype"}) {
    if (j.contains(key) && !j.at(key).is_null()) {
      auto dt = get_as<std::string>(j, key, origin, "a string");
      FTUNE_CHECK(dt == "float32" || dt == "bfloat16" || dt == "float16", origin, ": ", key,
                  ": expected float32, bfloat16 or float16, got \"", dt, "\"");
      c.torch_dtype = dt;
    }
  }
  if (j.contains("rope_scaling") && !j.at("rope_scaling").is_null()) {
    const json& rs = j.at("rope_scaling");
    FTUNE_CHECK(rs.is_object(), origin, ": rope_scaling: expected null or an object");
    std::string type = rs.contains("rope_type") ? rs.value("rope_type", "")
                                                : rs.value("type", "");
    FTUNE_CHECK(type == "llama3" || type == "linear" || type == "default", origin,
                ": rope_scaling.rope_type: expected \"llama3\", \"linear\" or \"default\", got \"",
                type, "\"");
    if (type != "default") {
      RopeScaling s;
      s.rope_type = type;
      s.factor = get_num(rs, "factor", origin + ": rope_scaling", s.factor);
      s.low_freq_factor = get_num(rs, "low_freq_factor", origin + ": rope_scaling", 1.0);
      s.high_freq_factor = get_num(rs, "high_freq_factor", origin + ": rope_scaling", 4.0);
      s.original_max_position_embeddings =
          get_int(rs, "original_max_position_embeddings", origin + ": rope_scaling", 8192);
      c.rope_scaling = s;
    }
  }
  if (j.contains("bos_token_id") && !j.at("bos_token_id").is_null())
    c.bos_token_id = get_int(j, "bos_token_id", origin, 0);
  if (j.contains("pad_token_id") && !j.at("pad_token_id").is_null())
    c.pad_token_id = get_int(j, "pad_token_id", origin, 0);
  if (j.contains("eos_token_id") && !j.at("eos_token_id").is_null()) {
    const json& e = j.at("eos_token_id");
    if (e.is_array()) {
      for (const auto& v : e) {
        FTUNE_CHECK(v.is_number_integer(), origin, ": eos_token_id: expected integers");
        c.eos_token_ids.push_back(v.get<int64_t>());
      }
    } else {
      c.eos_token_ids.push_back(get_int(j, "eos_token_id", origin, 0));
    }
  }
  for (const auto& [k, v] : j.items()) {
    if (!kKnownKeys.count(k)) c.extra[k] = v;
  }
  c.validate(origin);
  return c;
}

void LlamaConfig::validate(const std::string& origin) const {
  auto positive = [&](int64_t v, const char* key) {
    FTUNE_CHECK(v > 0, origin, ": ", key, ": expected a positive integer, got ", v);
  };
  positive(vocab_size, "vocab_size");
  positive(hidden_size, "hidden_size");
  positive(intermediate_size, "intermediate_size");
  positive(num_hidden_layers, "num_hidden_layers");
  positive(num_attention_heads, "num_attention_heads");
  positive(num_key_value_heads, "num_key_value_heads");
  positive(max_position_embeddings, "max_position_embeddings");
  FTUNE_CHECK(head_dim > 0 || hidden_size % num_attention_heads == 0, origin,
              ": hidden_size: ", hidden_size, " is not divisible by num_attention_heads ",
              num_attention_heads);
  FTUNE_CHECK(dim_head() % 2 == 0, origin, ": head_dim: expected an even size for RoPE, got ",
              dim_head());
  FTUNE_CHECK(num_attention_heads % num_key_value_heads == 0, origin,
              ": num_key_value_heads: ", num_key_value_heads,
              " does not divide num_attention_heads ", num_attention_heads);
  FTUNE_CHECK(rms_norm_eps > 0, origin, ": rms_norm_eps: expected > 0");
  FTUNE_CHECK(rope_theta > 0, origin, ": rope_theta: expected > 0");
  // The fp32 byte count (the largest any caller computes) must fit in int64_t.
  int64_t total = 0, big_value = -1;
  const SizeTerm* big = nullptr;
  const std::vector<SizeTerm> terms = size_terms(*this);
  for (const SizeTerm& t : terms) {
    int64_t v = 0;
    const bool ok = term_value(t, &v) && !__builtin_mul_overflow(v, int64_t{4}, &v);
    if (ok && v > big_value) big_value = v, big = &t;
    if (!ok || __builtin_add_overflow(total, v, &total)) {
      const auto& f = largest_factor(ok ? *big : t);
      fail(origin, ": ", f.first, ": ", f.second, " makes the model's byte count overflow int64");
    }
  }
}

json LlamaConfig::to_json() const {
  json j = extra;
  j["architectures"] = json::array({"LlamaForCausalLM"});
  j["model_type"] = "llama";
  j["hidden_act"] = "silu";
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = dim_head();
  j["max_position_embeddings"] = max_position_embeddings;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_theta"] = rope_theta;
  if (rope_scaling) {
    const auto& s = *rope_scaling;
    json rs = {{"rope_type", s.rope_type}, {"factor", s.factor}};
    if (s.rope_type == "llama3") {
      rs["low_freq_factor"] = s.low_freq_factor;
      rs["high_freq_factor"] = s.high_freq_factor;
      rs["original_max_position_embeddings"] = s.original_max_position_embeddings;
    }
    j["rope_scaling"] = rs;
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["attention_bias"] = attention_bias;
  j["attention_dropout"] = 0.0;
  j["mlp_bias"] = mlp_bias;
  j["pretraining_tp"] = 1;
  j["initializer_range"] = initializer_range;
  j["torch_dtype"] = torch_dtype;
  j["use_cache"] = true;
  if (bos_token_id) j["bos_token_id"] = *bos_token_id;
  if (eos_token_ids.size() == 1) j["eos_token_id"] = eos_token_ids[0];
  if (eos_token_ids.size() > 1) j["eos_token_id"] = eos_token_ids;
  if (pad_token_id) j["pad_token_id"] = *pad_token_id;
  return j;
}

json LlamaConfig::generation_config_json() const {
  json gen = {{"_from_model_config", true}};
  if (bos_token_id) gen["bos_token_id"] = *bos_token_id;
  if (eos_token_ids.size() == 1) gen["eos_token_id"] = eos_token_ids[0];
  if (eos_token_ids.size() > 1) gen["eos_token_id"] = eos_token_ids;
  if (pad_token_id) gen["pad_token_id"] = *pad_token_id;
  return gen;
}

int64_t LlamaConfig::num_parameters() const {
  int64_t total = 0;
  for (const SizeTerm& t : size_terms(*this)) {
    int64_t v = 0;
    term_value(t, &v);  // validate() has ruled out overflow
    total += v;
  }
  return total;
}

void LlamaConfig::check_fits_in_memory(at::ScalarType dtype, const std::string& origin) const {
  const int64_t bytes_per_param = static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t need = num_parameters() * bytes_per_param;  // validate() checked fp32 fits
  const int64_t have = physical_memory_bytes();
  if (have <= 0 || need <= have) return;
  const std::vector<SizeTerm> terms = size_terms(*this);
  const SizeTerm* big = &terms[0];
  int64_t largest = -1;
  for (const SizeTerm& t : terms) {
    int64_t v = 0;
    term_value(t, &v);
    if (v > largest) largest = v, big = &t;
  }
  char need_gb[32], have_gb[32];
  std::snprintf(need_gb, sizeof(need_gb), "%.1f", static_cast<double>(need) / 1e9);
  std::snprintf(have_gb, sizeof(have_gb), "%.1f", static_cast<double>(have) / 1e9);
  fail(origin, ": ", largest_factor(*big).first, ": model needs ", need_gb, " GB in ",
       dtype_name(dtype), ", more than this machine's ", have_gb, " GB");
}

int64_t physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? static_cast<int64_t>(pages) * page : 0;
}

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: fail("dtype: unsupported model dtype ", c10::toString(t));
  }
}

LlamaConfig load_config(const std::filesystem::path& model_dir) {
  auto path = model_dir / "config.json";
  FTUNE_CHECK(std::filesystem::exists(path), model_dir.string(), ": no config.json (expected an HF model dir)");
  json j;
  try {
    j = json::parse(read_file(path));
  } catch (const json::parse_error& e) {
    fail(path.string(), ": not valid JSON: ", e.what());
  }
  return LlamaConfig::from_json(j, path.string());
}

namespace {
struct Preset {
  const char* name;
  int64_t vocab, hidden, inter, layers, heads, kv_heads, max_pos;
  double eps, theta;
  bool tie;
  const char* dtype;
  int64_t bos, eos;
  bool llama3_scaling;
};
// Shapes from the models' published config.json files.
const Preset kPresets[] = {
    {"tiny", 259, 64, 172, 2, 4, 2, 512, 1e-5, 10000.0, false, "float32", 256, 257, false},
    {"smollm2-135m", 49152, 576, 1536, 30, 9, 3, 8192, 1e-5, 100000.0, true, "bfloat16", 1, 2, false},
    {"tinyllama-1.1b", 32000, 2048, 5632, 22, 32, 4, 2048, 1e-5, 10000.0, false, "bfloat16", 1, 2, false},
    {"llama-2-7b", 32000, 4096, 11008, 32, 32, 32, 4096, 1e-5, 10000.0, false, "bfloat16", 1, 2, false},
    {"codellama-7b", 32016, 4096, 11008, 32, 32, 32, 16384, 1e-5, 1000000.0, false, "bfloat16", 1, 2, false},
    {"llama-3-8b", 128256, 4096, 14336, 32, 32, 8, 8192, 1e-5, 500000.0, false, "bfloat16", 128000, 128001, false},
    {"llama-3.1-8b", 128256, 4096, 14336, 32, 32, 8, 131072, 1e-5, 500000.0, false, "bfloat16", 128000, 128001, true},
    {"smollm2-360m", 49152, 960, 2560, 32, 15, 5, 8192, 1e-5, 100000.0, true, "bfloat16", 1, 2, false},
    {"smollm2-1.7b", 49152, 2048, 8192, 24, 32, 32, 8192, 1e-5, 130000.0, true, "bfloat16", 1, 2, false},
    {"llama-2-13b", 32000, 5120, 13824, 40, 40, 40, 4096, 1e-5, 10000.0, false, "bfloat16", 1, 2, false},
    {"llama-2-70b", 32000, 8192, 28672, 80, 64, 8, 4096, 1e-5, 10000.0, false, "bfloat16", 1, 2, false},
    {"codellama-13b", 32016, 5120, 13824, 40, 40, 40, 16384, 1e-5, 1000000.0, false, "bfloat16", 1, 2, false},
    {"codellama-34b", 32000, 8192, 22016, 48, 64, 8, 16384, 1e-5, 1000000.0, false, "bfloat16", 1, 2, false},
    {"llama-3-70b", 128256, 8192, 28672, 80, 64, 8, 8192, 1e-5, 500000.0, false, "bfloat16", 128000, 128001, false},
};

// Names compare without case (init-model --preset, model.path: preset:NAME, memory --model), so
// the published spellings ("TinyLlama-1.1B", "Llama-3-8B") work.
bool same_name(const std::string& a, const char* b) {
  const std::string_view v(b);
  if (a.size() != v.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(v[i]))) {
      return false;
    }
  }
  return true;
}
}  // namespace

std::vector<std::string> preset_names() {
  std::vector<std::string> out;
  for (const auto& p : kPresets) out.emplace_back(p.name);
  return out;
}

LlamaConfig preset_config(const std::string& name) {
  for (const auto& p : kPresets) {
    if (!same_name(name, p.name)) continue;
    LlamaConfig c;
    c.vocab_size = p.vocab;
    c.hidden_size = p.hidden;
    c.intermediate_size = p.inter;
    c.num_hidden_layers = p.layers;
    c.num_attention_heads = p.heads;
    c.num_key_value_heads = p.kv_heads;
    c.max_position_embeddings = p.max_pos;
    c.rms_norm_eps = p.eps;
    c.rope_theta = p.theta;
    c.tie_word_embeddings = p.tie;
    c.torch_dtype = p.dtype;
    c.bos_token_id = p.bos;
    c.eos_token_ids = {p.eos};
    if (p.llama3_scaling) c.rope_scaling = RopeScaling{};
    return c;
  }
  std::string names;
  for (const auto& n : preset_names()) names += (names.empty() ? "" : ", ") + n;
  fail("preset: unknown name \"", name, "\" (expected one of: ", names, ")");
}

}  // namespace ftune::model
