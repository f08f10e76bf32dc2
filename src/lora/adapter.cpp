// PEFT adapter directories: reading, checking, writing; see adapter.h.
#include "lora/adapter.h"

#include <nlohmann/json.hpp>

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

// Which decoder linears an adapter config selects, as PEFT matches target_modules: a list of
// names matches modules whose path ends in ".<name>"; a string is matched whole against the path
// (re.fullmatch), except "all-linear".
std::function<bool(const std::string&)> selector(const AdapterConfig& c) {
  if (c.target_regex.empty()) {
    const auto names = c.options.targets;
    return [names](const std::string& path) {
      const std::string leaf = path.substr(path.rfind('.') + 1);
      return std::find(names.begin(), names.end(), leaf) != names.end();
    };
  }
  const std::regex re(c.target_regex);
  return [re](const std::string& path) { return std::regex_match(path, re); };
}

// Field checks of adapter_config.json.
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

AdapterConfig read_adapter_config(const fs::path& dir) {
  const fs::path p = dir / kAdapterConfigFile;
  const std::string origin = p.string();
  FTUNE_CHECK(fs::is_directory(dir), dir.string(), ": no such adapter directory");
  FTUNE_CHECK(fs::is_regular_file(p), origin, ": missing (not a PEFT adapter directory)");
  json j;
  try {
    j = json::parse(read_file(p));
  } catch (const json::parse_error& e) {
    fail(origin, ": not valid JSON: ", e.what());
  }
  FTUNE_CHECK(j.is_object(), origin, ": expected a JSON object");
  AdapterConfig c;
  const std::string type = j.value("peft_type", std::string());
  FTUNE_CHECK(type == "LORA", origin, ": peft_type: expected \"LORA\", got ",
              j.contains("peft_type") ? j.at("peft_type").dump() : "nothing");
  FTUNE_CHECK(j.contains("r"), origin, ": r: missing");
  c.options.r = get_field<int64_t>(j, "r", origin, "a positive integer");
  FTUNE_CHECK(c.options.r > 0, origin, ": r: expected a positive integer, got ", c.options.r);
  c.options.alpha = j.contains("lora_alpha") && !j.at("lora_alpha").is_null()
                        ? get_field<double>(j, "lora_alpha", origin, "a number")
                        : 8.0;
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
  auto nonempty = [&](const char* key) {
    return j.contains(key) && !j.at(key).is_null() &&
           !((j.at(key).is_object() || j.at(key).is_array()) && j.at(key).empty());
  };
  if (j.contains("bias")) refuse_if("bias", j.at("bias") != "none", "\"none\"");
  if (j.contains("use_dora")) refuse_if("use_dora", j.at("use_dora") == true, "false");
  if (j.contains("fan_in_fan_out")) refuse_if("fan_in_fan_out", j.at("fan_in_fan_out") == true, "false");
  for (const char* key : {"rank_pattern", "alpha_pattern", "layers_to_transform",
                          "modules_to_save", "layers_pattern", "trainable_token_indices"}) {
    if (nonempty(key)) refuse_if(key, true, "null or empty");
  }
  FTUNE_CHECK(j.contains("target_modules") && !j.at("target_modules").is_null(), origin,
              ": target_modules: missing");
  const json& t = j.at("target_modules");
  if (t.is_array()) {
    std::vector<std::string> names;
    for (const auto& n : t) {
      FTUNE_CHECK(n.is_string(), origin, ": target_modules: expected module names, got ", n.dump());
      names.push_back(n.get<std::string>());
    }
    c.options.targets = resolve_targets(names, origin + ": target_modules");
  } else {
    FTUNE_CHECK(t.is_string(), origin, ": target_modules: expected a list of names or a string");
    const std::string s = t.get<std::string>();
    if (s == "all-linear" ||
        std::find(kLinearModules.begin(), kLinearModules.end(), s) != kLinearModules.end()) {
      c.options.targets = resolve_targets({s}, origin + ": target_modules");
    } else {
      try {
        std::regex check(s);
      } catch (const std::regex_error& e) {
        fail(origin, ": target_modules: '", s, "' is neither a module name nor a valid regex");
      }
      c.target_regex = s;
    }
  }
  c.base_model_name_or_path = j.value("base_model_name_or_path", std::string());
  return c;
}

void save_adapter(const fs::path& dir, model::LlamaForCausalLM& m, const std::string& base_model) {
  const LoraOptions o = lora_options_of(m);
  // PEFT names target types; an adapter on only some layers of a type is written as the regex of
  // its exact module paths, which PEFT matches whole.
  std::set<std::string> adapted;
  bool every_layer = true;
  for (auto& [name, lin] : decoder_linears(m)) {
    const std::string leaf = name.substr(name.rfind('.') + 1);
    const bool targeted = std::find(o.targets.begin(), o.targets.end(), leaf) != o.targets.end();
    if (lin->lora_A) adapted.insert(name);
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
  json cfg = {{"peft_type", "LORA"},
              {"task_type", "CAUSAL_LM"},
              {"r", o.r},
              {"lora_alpha", o.alpha},
              {"lora_dropout", o.dropout},
              {"target_modules", targets},
              {"bias", "none"},
              {"use_rslora", o.rslora},
              {"use_dora", false},
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
  io::TensorList tensors;
  for (const auto& [name, p] : adapter_parameters(m)) {
    tensors.emplace_back(kPeftKeyPrefix + name, p.detach().to(at::kFloat));
  }
  fs::create_directories(dir);
  io::save_safetensors(dir / kAdapterWeightsFile, tensors, {{"format", "pt"}});
  write_file_atomic(dir / kAdapterConfigFile, cfg.dump(2) + "\n");
}

namespace {

// Checks the adapter file against the adapters `m` carries (every key present with its shape, no
// other key), then copies the weights in.
void copy_adapter_weights(const fs::path& dir, model::LlamaForCausalLM& m) {
  const fs::path p = dir / kAdapterWeightsFile;
  const std::string origin = p.string();
  FTUNE_CHECK(fs::is_regular_file(p), origin, ": missing",
              fs::exists(dir / "adapter_model.bin") ? " (adapter_model.bin, a pickle, is not read; "
                                                      "save with safe_serialization=True)" : "");
  io::SafetensorsReader reader(p);
  const auto params = adapter_parameters(m);
  std::set<std::string> expected;
  for (const auto& [name, t] : params) {
    const std::string key = kPeftKeyPrefix + name;
    expected.insert(key);
    FTUNE_CHECK(reader.contains(key), origin, ": ", key, ": missing (the config targets this "
                "module; the file has no weight for it)");
    const auto& e = reader.entry(key);
    FTUNE_CHECK(e.shape == t.sizes().vec(), origin, ": ", key, ": shape ",
                at::IntArrayRef(e.shape), " does not match the model's ", t.sizes(),
                " (r or the base model differ)");
    FTUNE_CHECK(at::isFloatingType(e.dtype), origin, ": ", key, ": expected a float tensor");
  }
  for (const auto& name : reader.names()) {
    FTUNE_CHECK(expected.count(name), origin, ": ", name, ": unexpected tensor (no such adapter ",
                "in this model with this adapter_config.json)");
  }
  torch::NoGradGuard no_grad;
  for (const auto& [name, t] : params) reader.read_into(kPeftKeyPrefix + name, t);
}

}  // namespace

void load_adapter(const fs::path& dir, model::LlamaForCausalLM& m) {
  const AdapterConfig c = read_adapter_config(dir);
  const std::string origin = (dir / kAdapterConfigFile).string();
  const auto select = selector(c);
  int64_t matched = 0;
  for (auto& [name, lin] : decoder_linears(m)) {
    if (!select(name)) continue;
    ++matched;
    FTUNE_CHECK(c.options.r <= std::min(lin->in_features(), lin->out_features()), origin, ": r: ",
                c.options.r, " exceeds the dims of ", name);
  }
  FTUNE_CHECK(matched > 0, origin, ": target_modules: matches no linear module of this model");
  apply_lora_to(m, c.options, 0, select);
  copy_adapter_weights(dir, m);
}

void load_adapter_weights(const fs::path& dir, model::LlamaForCausalLM& m) {
  copy_adapter_weights(dir, m);
}

}  // namespace ftune::lora
