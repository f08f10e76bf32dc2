// `ftune init-model`: writes a randomly initialized Llama model in HF layout, from a config.json
// or a named preset, with either a given tokenizer or ftune's byte-level one.
#include <nlohmann/json.hpp>

#include <iostream>

#include "cli/commands.h"
#include "core/error.h"
#include "core/fs.h"
#include "model/hf_io.h"

namespace ftune::cli {
namespace {

struct InitArgs {
  std::string config, preset, out, tokenizer, dtype;
  uint64_t seed = 0;
};

void run_init_model(const InitArgs& a) {
  FTUNE_CHECK(a.config.empty() != a.preset.empty(), "init-model: give exactly one of --config or --preset");
  model::LlamaConfig cfg;
  if (!a.config.empty()) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(read_file(a.config));
    } catch (const nlohmann::json::parse_error& e) {
      fail(a.config, ": not valid JSON: ", e.what());
    }
    cfg = model::LlamaConfig::from_json(j, a.config);
  } else {
    cfg = model::preset_config(a.preset);
  }
  if (!a.dtype.empty()) {
    cfg.torch_dtype = model::dtype_name(model::dtype_from_name(a.dtype, "--dtype"));
  }
  model::LlamaForCausalLM m(cfg, cfg.torch_dtype == "bfloat16" ? at::kBFloat16 : at::kFloat);
  model::init_weights(m, a.seed);
  model::save_model(a.out, m);
  if (a.tokenizer.empty()) {
    model::write_byte_level_tokenizer(a.out);
  } else {
    FTUNE_CHECK(std::filesystem::exists(std::filesystem::path(a.tokenizer) / "tokenizer.json") ||
                    std::filesystem::exists(std::filesystem::path(a.tokenizer) / "tokenizer.model"),
                a.tokenizer, ": --tokenizer: no tokenizer.json or tokenizer.model");
    model::copy_tokenizer_files(a.tokenizer, a.out);
  }
  std::cout << "wrote " << a.out << ": " << cfg.num_parameters() << " parameters, "
            << cfg.torch_dtype << "\n";
}

}  // namespace

void register_init_model(CLI::App& app) {
  auto a = std::make_shared<InitArgs>();
  auto* cmd = app.add_subcommand("init-model", "Write a randomly initialized model in HF layout");
  std::string presets;
  for (const auto& n : model::preset_names()) presets += (presets.empty() ? "" : ", ") + n;
  auto* c = cmd->add_option("--config", a->config, "HF config.json to build the model from");
  auto* p = cmd->add_option("--preset", a->preset, "Named shape: " + presets);
  c->excludes(p);
  cmd->add_option("--out", a->out, "Output model directory")->required();
  cmd->add_option("--seed", a->seed, "Seed of the random initialization (default 0)");
  cmd->add_option("--tokenizer", a->tokenizer,
                  "Model dir whose tokenizer files to copy (default: a byte-level tokenizer)");
  cmd->add_option("--dtype", a->dtype, "Weight dtype: fp32 or bf16 (default: the config's)");
  cmd->callback([a] { run_init_model(*a); });
}

}  // namespace ftune::cli
