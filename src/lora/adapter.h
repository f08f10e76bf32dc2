// PEFT adapter directories (../shared/REFERENCE.md §2): adapter_config.json and
// adapter_model.safetensors with keys base_model.model.<module>.lora_{A,B}.weight. Saving writes
// what PEFT's save_pretrained writes for a LoRA model; loading takes what PEFT 0.17 writes
// (target_modules and exclude_modules as names, full module paths or a regex, matched as PEFT's
// check_target_module_exists does; "all-linear") and rejects anything ftune would silently compute
// differently (DoRA, rank/alpha patterns, bias training, lora_bias, layers_to_transform,
// modules_to_save, fan_in_fan_out, ...). Every error names the file and field.
// Defines AdapterConfig, read_adapter_config, select_adapter_modules, save_adapter, load_adapter.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "lora/lora.h"

namespace ftune::lora {

constexpr char kAdapterConfigFile[] = "adapter_config.json";
constexpr char kAdapterWeightsFile[] = "adapter_model.safetensors";
constexpr char kPeftKeyPrefix[] = "base_model.model.";

// PEFT's target_modules / exclude_modules: a list of names (a module matches a name when its path
// is the name or ends in ".<name>"), or one string matched whole as a regex (re.fullmatch).
struct ModuleMatcher {
  std::vector<std::string> names;  // the list form
  std::string regex;               // the string form (set when is_regex)
  bool is_regex = false;
  bool all_linear = false;         // the string "all-linear" (case-insensitive, as PEFT)
  bool matches(const std::string& path) const;
};

struct AdapterConfig {
  LoraOptions options;  // r, alpha, dropout, rslora; targets unused (see `targets`)
  ModuleMatcher targets;
  ModuleMatcher exclude;  // empty names and no regex: nothing excluded
  std::string base_model_name_or_path;
};

// Parses and checks <dir>/adapter_config.json (no model needed).
AdapterConfig read_adapter_config(const std::filesystem::path& dir);

// The decoder linears of `m` the config adapts, as module paths in named_modules() order. Errors
// (naming `origin`'s target_modules) when a target name matches no module of `m`, when the
// targets reach a module ftune cannot adapt (lm_head, embed_tokens, a norm, a whole layer) or
// when nothing is selected.
std::vector<std::string> select_adapter_modules(const AdapterConfig& c,
                                                model::LlamaForCausalLM& m,
                                                const std::string& origin);

// Writes <dir>/adapter_config.json and <dir>/adapter_model.safetensors (fp32), each atomically, for
// the adapters `m` carries. `base_model` goes to base_model_name_or_path.
void save_adapter(const std::filesystem::path& dir, model::LlamaForCausalLM& m,
                  const std::string& base_model);

// save_adapter in parts, for a writer that sees the model one unit at a time (a sharded model's
// streamed export). adapter_weight_specs: the names (PEFT keys), dtype (fp32) and shapes of
// adapter_model.safetensors' tensors in file order, without reading any data. adapter_weights:
// those tensors as fp32 CPU values, all or only those of unit `unit` (model::unit_of).
// save_adapter_config writes adapter_config.json.
std::vector<io::TensorSpec> adapter_weight_specs(model::LlamaForCausalLM& m);
io::TensorList adapter_weights(model::LlamaForCausalLM& m, int64_t unit = -1);
void save_adapter_config(const std::filesystem::path& dir, model::LlamaForCausalLM& m,
                         const std::string& base_model);

// Injects the adapters <dir> describes into `m` (which must carry none) and loads their weights,
// after checking every key and shape against the model. Adapters are fp32 on m's device. On error
// `m` may carry partly loaded adapters: discard it.
void load_adapter(const std::filesystem::path& dir, model::LlamaForCausalLM& m);

// Loads only the adapter weights of <dir> into the adapters `m` already carries (same modules and
// ranks; checkpoint resume).
void load_adapter_weights(const std::filesystem::path& dir, model::LlamaForCausalLM& m);

}  // namespace ftune::lora
