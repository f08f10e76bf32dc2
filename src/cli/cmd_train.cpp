// `ftune train --config FILE [--set section.key=value ...]`: full fine-tuning (for now) of a
// Llama-family model from a YAML recipe (see configs/ and docs/training.md). Parsing, overrides
// and validation happen before anything is allocated; the run itself lives in train/run.h.
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "config/train_config.h"
#include "train/run.h"

namespace ftune::cli {
namespace {

struct TrainArgs {
  std::string config;
  std::vector<std::string> sets;
};

void run_train(const TrainArgs& a) {
  // run_training validates the whole config before it allocates anything.
  train::run_training(config::load_train_config(a.config, a.sets));
}

}  // namespace

void register_train(CLI::App& app) {
  auto a = std::make_shared<TrainArgs>();
  auto* cmd = app.add_subcommand(
      "train", "Fine-tune every parameter of a model on one CPU or GPU, from a YAML config");
  cmd->add_option("--config", a->config, "YAML config: sections model, data, training, logging")
      ->required()
      ->type_name("FILE");
  cmd->add_option("--set", a->sets,
                  "Override one key, e.g. --set training.lr=1e-4 (repeatable; applied in order)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->callback([a] { run_train(*a); });
}

}  // namespace ftune::cli
