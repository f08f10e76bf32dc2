// `ftune init-model`: writes a randomly initialized Llama model in HF layout, from a config.json
// or a named preset, with either a given tokenizer or ftune's byte-level one. An existing
// non-empty --out is refused unless --force, which replaces only the model files (common.h).
#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "model/hf_io.h"

namespace ftune::cli {
namespace {

struct InitArgs {
  std::string config, preset, out, tokenizer, dtype;
  int64_t seed = 0;
  bool force = false;
};

void run_init_model(const InitArgs& a) {
  model::LlamaConfig cfg;
  if (!a.config.empty()) {
    cfg = read_config_file(a.config, "--config");
  } else {
    cfg = model::preset_config(a.preset);
  }
  if (!a.dtype.empty()) {
    cfg.torch_dtype = model::dtype_name(model::dtype_from_name(a.dtype, "init-model: --dtype"));
  }
  if (!a.tokenizer.empty()) require_tokenizer_dir(a.tokenizer, "--tokenizer");
  const at::ScalarType dtype = cfg.torch_dtype == "bfloat16" ? at::kBFloat16 : at::kFloat;
  cfg.check_fits_in_memory(dtype, a.config.empty() ? "init-model: --preset " + a.preset : a.config);
  write_model_dir(a.out, "--out", a.force, [&](const std::filesystem::path& dir) {
    model::LlamaForCausalLM m(cfg, dtype);  // uninitialized storage, filled once by init_weights
    model::init_weights(m, static_cast<uint64_t>(a.seed));
    model::save_model(dir, m);
    if (a.tokenizer.empty()) {
      model::write_byte_level_tokenizer(dir);
    } else {
      model::copy_tokenizer_files(a.tokenizer, dir);
    }
  });
  std::cout << "wrote " << a.out << ": " << cfg.num_parameters() << " parameters, "
            << model::dtype_name(dtype) << "\n";
}

}  // namespace

void register_init_model(CLI::App& app) {
  auto a = std::make_shared<InitArgs>();
  auto* cmd = app.add_subcommand("init-model", "Write a randomly initialized model in HF layout");
  std::string presets;
  for (const auto& n : model::preset_names()) presets += (presets.empty() ? "" : ", ") + n;
  auto* shape = cmd->add_option_group("shape", "The model's shape (exactly one)");
  shape->add_option("--config", a->config, "HF config.json to build the model from")
      ->type_name("FILE");
  shape->add_option("--preset", a->preset, "Named shape: " + presets)->type_name("NAME");
  shape->require_option(1);
  cmd->add_option("--out", a->out,
                  "Output model directory: new or empty, or any with --force")
      ->required()
      ->type_name("DIR");
  cmd->add_flag("--force", a->force,
                "Write into a non-empty --out, replacing only its model files (config, weights, "
                "tokenizer files)");
  cmd->add_option("--seed", a->seed, "Seed of the random initialization, >= 0 (default 0)")
      ->type_name("INT")
      ->check(int_at_least(0));
  cmd->add_option("--tokenizer", a->tokenizer,
                  "Model dir whose tokenizer files to copy (default: a byte-level tokenizer)")
      ->type_name("DIR");
  cmd->add_option("--dtype", a->dtype, "Weight dtype: fp32 or bf16 (default: the config's)");
  cmd->callback([a] { run_init_model(*a); });
}

}  // namespace ftune::cli
