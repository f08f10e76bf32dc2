// `ftune merge`: folds a PEFT LoRA adapter into its base model and writes a plain HF model dir
// (config, weights, generation config, the base's tokenizer files), as PEFT's merge_and_unload +
// save_pretrained would. Every input is checked (the adapter against the loaded base) before
// anything is written; the output dir is written atomically (common.h write_model_dir).
#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "lora/adapter.h"
#include "model/hf_io.h"

namespace ftune::cli {
namespace {

struct MergeArgs {
  std::string model, adapter, out, dtype;
  bool force = false;
};

void run_merge(const MergeArgs& a) {
  require_model_dir(a.model, "--model");
  require_adapter_dir(a.adapter, "--adapter");
  for (const auto& [in, flag] : {std::pair{a.model, "--model"}, std::pair{a.adapter, "--adapter"}}) {
    std::error_code ec;
    FTUNE_CHECK(!std::filesystem::equivalent(a.out, in, ec), a.out, ": --out: is the ", flag,
                " dir (write the merged model to a new directory)");
  }
  check_model_out_dir(a.out, "--out", a.force);
  model::LoadOptions opts;
  if (!a.dtype.empty()) opts.dtype = model::dtype_from_name(a.dtype, "merge: --dtype");
  auto m = model::load_model(a.model, opts);
  lora::load_adapter(a.adapter, m);
  const int64_t merged = lora::merge_lora(m);
  write_model_dir(a.out, "--out", a.force, [&](const std::filesystem::path& dir) {
    model::save_model(dir, m);
    model::copy_tokenizer_files(a.model, dir);
  });
  std::cout << "wrote " << a.out << ": " << a.adapter << " merged into " << merged
            << " linear modules of " << a.model << ", "
            << model::dtype_name(m->lm_head_weight().scalar_type()) << "\n";
}

}  // namespace

void register_merge(CLI::App& app) {
  auto a = std::make_shared<MergeArgs>();
  auto* cmd = app.add_subcommand("merge", "Merge a PEFT LoRA adapter into its base model");
  cmd->add_option("--model", a->model, "Base HF model directory")->required()->type_name("DIR");
  cmd->add_option("--adapter", a->adapter, "PEFT LoRA adapter dir made for --model")
      ->required()
      ->type_name("DIR");
  cmd->add_option("--out", a->out, "Output model directory: new or empty, or any with --force")
      ->required()
      ->type_name("DIR");
  cmd->add_option("--dtype", a->dtype,
                  "Weight dtype of the merged model: fp32 or bf16 (default: the base's)");
  cmd->add_flag("--force", a->force,
                "Write into a non-empty --out, replacing only its model files (config, weights, "
                "tokenizer files)");
  cmd->callback([a] { run_merge(*a); });
}

}  // namespace ftune::cli
