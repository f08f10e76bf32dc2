// PEFT adapter directories: reading, checking, writing; see adapter.h.
#include "lora/adapter.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <map>
#include <regex>
#include <set>

#include "core/error.h"
#include "core/fs.h"
#include "io/safetensors.h"

namespace ftune::lora {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string regex_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (std::string("\\^$.|?*+()[]{}").find(c) != std::string::npos) out += '\\';
    out += c;
  }
  return out;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : ", ") + s;
  return out;
}

// A present, non-null field that is not an empty list/object/string.
bool nonempty(const json& j, const char* key) {
  if (!j.contains(key) || j.at(key).is_null()) return false;
  const json& v = j.at(key);
  if (v.is_object() || v.is_array() || v.is_string()) return !v.empty();
  return true;
}

// target_modules / exclude_modules: a list of names or a string (regex or "all-linear").
ModuleMatcher parse_matcher(const json& v, const std::string& origin, const char* field) {
  ModuleMatcher m;
  if (v.is_array()) {
    for (const auto& n : v) {
      FTUNE_CHECK(n.is_string() && !n.get<std::string>().empty(), origin, ": ", field,
                  ": expected module names, got ", n.dump());
      m.names.push_back(n.get<std::string>());
    }
    return m;
  }
  FTUNE_CHECK(v.is_string(), origin, ": ", field, ": expected a list of module names or a regex "
              "string, got ", v.dump());
  const std::string s = v.get<std::string>();
  std::string lower = s;
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char ch) { return std::tolower(ch); });
  if (lower == "all-linear" && std::string(field) == "target_modules") {
    m.all_linear = true;
    return m;
  }
  try {
    std::regex check(s);
  } catch (const std::regex_error&) {
    fail(origin, ": ", field, ": '", s, "' is not a regex ftune can read (ECMAScript syntax; ",
         "PEFT matches a string with re.fullmatch)");
  }
  m.is_regex = true;
  m.regex = s;
  return m;
}

// Field access with a one-line error instead of nlohmann's.
template <class T>
T get_field(const json& j, const char* key, const std::string& origin, const char* expected) {
  const json& v = j.at(key);
  try {
    return v.get<T>();
  } catch (const json::exception&) {
    fail(origin, ": ", key, ": expected ", expected, ", got ", v.dump());
  }
}

}  // namespace

bool ModuleMatcher::matches(const std::string& path) const {
  if (all_linear) return true;
  if (is_regex) return std::regex_match(path, std::regex(regex));
  for (const auto& n : names) {
    if (path == n || ends_with(path, "." + n)) return true;
  }
  return false;
}

AdapterConfig read_adapter_config(const fs::path& dir) {
  const fs::path p = dir / kAdapterConfigFile;
  const std::string origin = p.string();
  FTUNE_CHECK(fs::is_directory(dir), dir.string(), ": not a directory (expected a PEFT adapter dir)");
  FTUNE_CHECK(fs::is_regular_file(p), origin, ": missing (not a PEFT adapter directory)");
  json j;
  try {
    j = json::parse(read_file(p));
  } catch (const json::parse_error& e) {
    fail(origin, ": not valid JSON: ", e.what());
  }
  FTUNE_CHECK(j.is_object(), origin, ": expected a JSON object");
  AdapterConfig c;
  // Compared as JSON: j.value<std::string>() would throw nlohmann's error for a non-string.
  FTUNE_CHECK(j.contains("peft_type") && j.at("peft_type") == "LORA", origin,
              ": peft_type: expected \"LORA\", got ",
              j.contains("peft_type") ? j.at("peft_type").dump() : "nothing");
  FTUNE_CHECK(j.contains("r"), origin, ": r: missing");
  FTUNE_CHECK(j.at("r").is_number_integer(), origin, ": r: expected a positive integer, got ",
              j.at("r").dump());
  c.options.r = get_field<int64_t>(j, "r", origin, "a positive integer");
  FTUNE_CHECK(c.options.r > 0, origin, ": r: expected a positive integer, got ", c.options.r);
  c.options.alpha = j.contains("lora_alpha") && !j.at("lora_alpha").is_null()
                        ? get_field<double>(j, "lora_alpha", origin, "a number")
                        : 8.0;
  FTUNE_CHECK(std::isfinite(c.options.alpha), origin, ": lora_alpha: expected a finite number");
  c.options.dropout = j.contains("lora_dropout") && !j.at("lora_dropout").is_null()
                          ? get_field<double>(j, "lora_dropout", origin, "a number in [0, 1)")
                          : 0.0;
  FTUNE_CHECK(c.options.dropout >= 0 && c.options.dropout < 1, origin,
              ": lora_dropout: expected a number in [0, 1), got ", c.options.dropout);
  c.options.rslora = j.contains("use_rslora") && !j.at("use_rslora").is_null() &&
                     get_field<bool>(j, "use_rslora", origin, "true or false");
  // What ftune does not compute: refuse rather than load something that gives other outputs.
  auto refuse_if = [&](const char* key, bool bad, const char* expected) {
    FTUNE_CHECK(!bad, origin, ": ", key, ": ", j.at(key).dump(), " is not supported (expected ",
                expected, ")");
  };
  if (j.contains("bias") && !j.at("bias").is_null()) {
    refuse_if("bias", j.at("bias") != "none", "\"none\"");
  }
  for (const char* key : {"use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"}) {
    if (j.contains(key)) refuse_if(key, j.at(key) == true, "false");
  }
  for (const char* key : {"rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
                          "modules_to_save", "trainable_token_indices", "layer_replication",
                          "target_parameters", "megatron_config"}) {
    if (nonempty(j, key)) refuse_if(key, true, "null or empty");
  }
  FTUNE_CHECK(j.contains("target_modules") && !j.at("target_modules").is_null(), origin,
              ": target_modules: missing");
  c.targets = parse_matcher(j.at("target_modules"), origin, "target_modules");
  FTUNE_CHECK(c.targets.is_regex || c.targets.all_linear || !c.targets.names.empty(), origin,
              ": target_modules: empty");
  if (nonempty(j, "exclude_modules")) {
    c.exclude = parse_matcher(j.at("exclude_modules"), origin, "exclude_modules");
  }
  if (j.contains("base_model_name_or_path") && j.at("base_model_name_or_path").is_string()) {
    c.base_model_name_or_path = j.at("base_model_name_or_path").get<std::string>();
  }
  return c;
}

std::vector<std::string> select_adapter_modules(const AdapterConfig& c, model::LlamaForCausalLM& m,
                                                const std::string& origin) {
  std::set<std::string> linears;
  for (auto& [name, lin] : decoder_linears(m)) linears.insert(name);
  // Every module path of the base model, as PEFT's inject_adapter walks model.named_modules().
  std::vector<std::string> paths;
  for (const auto& item : m->named_modules()) {
    const std::string& name = item.key();
    if (!name.empty() && name.find(".lora_") == std::string::npos) paths.push_back(name);
  }
  // Regexes are compiled once here (a partial-layer adapter's regex lists every module path).
  const std::regex target_re(c.targets.is_regex ? c.targets.regex : std::string());
  const std::regex exclude_re(c.exclude.is_regex ? c.exclude.regex : std::string());
  auto targeted = [&](const std::string& p) {
    if (c.targets.all_linear) return linears.count(p) > 0;  // PEFT leaves out the output layer
    return c.targets.is_regex ? std::regex_match(p, target_re) : c.targets.matches(p);
  };
  auto excluded = [&](const std::string& p) {
    return c.exclude.is_regex ? std::regex_match(p, exclude_re) : c.exclude.matches(p);
  };
  const std::string expected = "ftune adapts the decoder layers' linear modules: " +
                               join(kLinearModules);
  for (const auto& name : c.targets.names) {
    const bool found = std::any_of(paths.begin(), paths.end(), [&](const std::string& p) {
      return p == name || ends_with(p, "." + name);
    });
    FTUNE_CHECK(found, origin, ": target_modules: '", name, "' matches no module of this model (",
                expected, ")");
  }
  std::vector<std::string> out;
  for (const auto& p : paths) {
    if (!targeted(p) || excluded(p)) continue;
    FTUNE_CHECK(linears.count(p), origin, ": target_modules: selects ", p,
                ", which ftune cannot adapt (", expected, ")");
    out.push_back(p);
  }
  FTUNE_CHECK(!out.empty(), origin, ": target_modules: selects no module of this model (",
              expected, ")");
  return out;
}

void save_adapter_config(const fs::path& dir, model::LlamaForCausalLM& m,
                         const std::string& base_model) {
  const LoraOptions o = lora_options_of(m);
  // PEFT names target types; an adapter on only some layers of a type is written as the regex of
  // its exact module paths, which PEFT matches whole.
  std::vector<std::string> adapted;
  bool every_layer = true;
  for (auto& [name, lin] : decoder_linears(m)) {
    const std::string leaf = name.substr(name.rfind('.') + 1);
    const bool targeted = std::find(o.targets.begin(), o.targets.end(), leaf) != o.targets.end();
    if (lin->lora_A) adapted.push_back(name);
    if (targeted && !lin->lora_A) every_layer = false;
  }
  json targets;
  if (every_layer) {
    targets = o.targets;
  } else {
    std::string re;
    for (const auto& n : adapted) re += (re.empty() ? "" : "|") + regex_escape(n);
    targets = re;
  }
  // PEFT declares lora_alpha an int; write one when it is integral.
  const json alpha = o.alpha == std::floor(o.alpha) && std::abs(o.alpha) < 1e15
                         ? json(static_cast<int64_t>(o.alpha))
                         : json(o.alpha);
  json cfg = {{"peft_type", "LORA"},
              {"task_type", "CAUSAL_LM"},
              {"r", o.r},
              {"lora_alpha", alpha},
              {"lora_dropout", o.dropout},
              {"target_modules", targets},
              {"exclude_modules", nullptr},
              {"bias", "none"},
              {"use_rslora", o.rslora},
              {"use_dora", false},
              {"lora_bias", false},
              {"fan_in_fan_out", false},
              {"init_lora_weights", true},
              {"base_model_name_or_path", base_model},
              {"inference_mode", true},
              {"modules_to_save", nullptr},
              {"layers_to_transform", nullptr},
              {"layers_pattern", nullptr},
              {"rank_pattern", json::object()},
              {"alpha_pattern", json::object()},
              {"revision", nullptr}};
  write_file_atomic(dir / kAdapterConfigFile, cfg.dump(2) + "\n");
}

std::vector<io::TensorSpec> adapter_weight_specs(model::LlamaForCausalLM& m) {
  std::vector<io::TensorSpec> specs;
  for (const auto& [name, p] : adapter_parameters(m)) {
    specs.push_back({kPeftKeyPrefix + name, at::kFloat, p.sizes().vec()});
  }
  return specs;
}

io::TensorList adapter_weights(model::LlamaForCausalLM& m, int64_t unit) {
  io::TensorList tensors;
  for (const auto& [name, p] : adapter_parameters(m)) {
    if (unit >= 0 && model::unit_of(name, m->config()) != unit) continue;
    tensors.emplace_back(kPeftKeyPrefix + name,
                         p.detach().to(at::TensorOptions().dtype(at::kFloat).device(at::kCPU)));
  }
  return tensors;
}

void save_adapter(const fs::path& dir, model::LlamaForCausalLM& m, const std::string& base_model) {
  fs::create_directories(dir);
  io::save_safetensors(dir / kAdapterWeightsFile, adapter_weights(m), {{"format", "pt"}});
  save_adapter_config(dir, m, base_model);
}

namespace {

// The adapter each adapted module must find in the file: its base linear's dims and the rank.
struct AdaptedModule {
  int64_t in = 0, out = 0, r = 0;
};

// <dir>/adapter_model.safetensors, which must exist.
fs::path adapter_weights_path(const fs::path& dir) {
  const fs::path p = dir / kAdapterWeightsFile;
  FTUNE_CHECK(fs::is_regular_file(p), p.string(), ": missing",
              fs::exists(dir / "adapter_model.bin") ? " (adapter_model.bin, a pickle, is not read; "
                                                      "save with safe_serialization=True)" : "");
  return p;
}

// Checks the adapter file against `adapted` (every key present with its shape, no other key).
// load_adapter runs it before any adapter is allocated, so a config's r cannot make ftune allocate
// more than the file holds (r = 2e9 in adapter_config.json is refused instead of exhausting memory).
void check_adapter_weights(const io::SafetensorsReader& reader, const std::string& origin,
                           model::LlamaForCausalLM& m,
                           const std::map<std::string, AdaptedModule>& adapted) {
  std::set<std::string> modules;  // every module path of the base model
  for (const auto& item : m->named_modules()) modules.insert(item.key());
  const std::string prefix = kPeftKeyPrefix;
  for (const auto& key : reader.names()) {
    FTUNE_CHECK(key.rfind(prefix, 0) == 0, origin, ": ", key, ": unexpected tensor (expected ",
                prefix, "<module>.lora_A.weight or .lora_B.weight)");
    FTUNE_CHECK(key.find("lora_magnitude_vector") == std::string::npos, origin, ": ", key,
                ": DoRA weights are not supported");
    FTUNE_CHECK(!ends_with(key, ".lora_B.bias"), origin, ": ", key,
                ": lora_bias is not supported");
    std::string module;
    for (const char* suffix : {".lora_A.weight", ".lora_B.weight"}) {
      if (ends_with(key, suffix)) {
        module = key.substr(prefix.size(), key.size() - prefix.size() - std::string(suffix).size());
      }
    }
    FTUNE_CHECK(!module.empty(), origin, ": ", key, ": unexpected tensor (ftune reads LoRA's ",
                "lora_A.weight and lora_B.weight only)");
    FTUNE_CHECK(modules.count(module), origin, ": ", key, ": this model has no module ", module,
                " (an adapter for another base model?)");
    FTUNE_CHECK(adapted.count(module), origin, ": ", key, ": ", module, " is not selected by ",
                kAdapterConfigFile, "'s target_modules");
  }
  for (const auto& [module, a] : adapted) {
    struct Want {
      const char* suffix;
      int64_t rank_dim, base_dim, base_size;
      const char* base_what;
    };
    for (const Want& w : {Want{".lora_A.weight", 0, 1, a.in, "in_features"},
                          Want{".lora_B.weight", 1, 0, a.out, "out_features"}}) {
      const std::string key = prefix + module + w.suffix;
      FTUNE_CHECK(reader.contains(key), origin, ": ", key, ": missing (",
                  kAdapterConfigFile, "'s target_modules select ", module, ")");
      const auto& e = reader.entry(key);
      FTUNE_CHECK(at::isFloatingType(e.dtype), origin, ": ", key, ": expected a float tensor");
      FTUNE_CHECK(e.shape.size() == 2, origin, ": ", key, ": expected a matrix, got shape ",
                  at::IntArrayRef(e.shape));
      FTUNE_CHECK(e.shape[w.base_dim] == w.base_size, origin, ": ", key, ": shape ",
                  at::IntArrayRef(e.shape), " does not fit ", module, " of this model (",
                  w.base_what, " ", w.base_size, "; an adapter for another base model?)");
      FTUNE_CHECK(e.shape[w.rank_dim] == a.r, origin, ": ", key, ": shape ",
                  at::IntArrayRef(e.shape), " has rank ", e.shape[w.rank_dim], ", but ",
                  kAdapterConfigFile, " says r = ", a.r);
    }
  }
}

void copy_adapter_weights(const io::SafetensorsReader& reader, model::LlamaForCausalLM& m) {
  torch::NoGradGuard no_grad;
  for (const auto& [name, t] : adapter_parameters(m)) reader.read_into(kPeftKeyPrefix + name, t);
}

}  // namespace

void load_adapter(const fs::path& dir, model::LlamaForCausalLM& m) {
  const AdapterConfig c = read_adapter_config(dir);
  const std::string origin = (dir / kAdapterConfigFile).string();
  const auto modules = select_adapter_modules(c, m, origin);
  const std::set<std::string> chosen(modules.begin(), modules.end());
  std::map<std::string, AdaptedModule> adapted;
  for (auto& [name, lin] : decoder_linears(m)) {
    if (chosen.count(name)) adapted[name] = {lin->in_features(), lin->out_features(), c.options.r};
  }
  const fs::path weights = adapter_weights_path(dir);
  const io::SafetensorsReader reader(weights);
  check_adapter_weights(reader, weights.string(), m, adapted);
  apply_lora_to(m, c.options, 0, [&](const std::string& name) { return chosen.count(name) > 0; });
  copy_adapter_weights(reader, m);
}

void load_adapter_weights(const fs::path& dir, model::LlamaForCausalLM& m) {
  std::map<std::string, AdaptedModule> adapted;
  for (auto& [name, lin] : decoder_linears(m)) {
    if (lin->lora_A) {
      adapted[name] = {lin->in_features(), lin->out_features(), lin->lora_A->weight.size(0)};
    }
  }
  const fs::path weights = adapter_weights_path(dir);
  const io::SafetensorsReader reader(weights);
  check_adapter_weights(reader, weights.string(), m, adapted);
  copy_adapter_weights(reader, m);
}

}  // namespace ftune::lora
