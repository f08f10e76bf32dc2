// PEFT adapter directories (../shared/REFERENCE.md §2): adapter_config.json and
// adapter_model.safetensors with keys base_model.model.<module>.lora_{A,B}.weight. Saving writes
// what PEFT's save_pretrained writes for a LoRA model; loading takes what PEFT wrote (a list of
// module names, one name, or a regex matched against module paths as PEFT does) and rejects
// anything ftune would silently compute differently (DoRA, rank/alpha patterns, bias training,
// layers_to_transform, modules_to_save, fan_in_fan_out). Every error names the file and field.
// Defines AdapterConfig, read_adapter_config, save_adapter, load_adapter.
#pragma once

#include <filesystem>
#include <string>

#include "lora/lora.h"

namespace ftune::lora {

constexpr char kAdapterConfigFile[] = "adapter_config.json";
constexpr char kAdapterWeightsFile[] = "adapter_model.safetensors";
constexpr char kPeftKeyPrefix[] = "base_model.model.";

struct AdapterConfig {
  LoraOptions options;                 // targets as names (resolved against `m` by load_adapter)
  std::string target_regex;            // set when target_modules was a string that is a regex
  std::string base_model_name_or_path;
};

// Parses and checks <dir>/adapter_config.json.
AdapterConfig read_adapter_config(const std::filesystem::path& dir);

// Writes <dir>/adapter_config.json and <dir>/adapter_model.safetensors (fp32), each atomically, for
// the adapters `m` carries. `base_model` goes to base_model_name_or_path.
void save_adapter(const std::filesystem::path& dir, model::LlamaForCausalLM& m,
                  const std::string& base_model);

// Injects the adapters <dir> describes into `m` (which must carry none) and loads their weights,
// after checking every key and shape against the model. Adapters are fp32 on m's device.
void load_adapter(const std::filesystem::path& dir, model::LlamaForCausalLM& m);

// Loads only the adapter weights of <dir> into the adapters `m` already carries (same modules and
// ranks; checkpoint resume).
void load_adapter_weights(const std::filesystem::path& dir, model::LlamaForCausalLM& m);

}  // namespace ftune::lora
