// `ftune train --config FILE [--set section.key=value ...]`: full fine-tuning (for now) of a
// Llama-family model from a YAML recipe (see configs/ and docs/training.md). Parsing, overrides
// and validation happen before anything is allocated; the run itself lives in train/run.h.
// `--nproc N` (N > 1) is shorthand for `ftune launch --nproc N --master-port 0 -- train --config
// FILE --set ...` (like torchrun --standalone: one node, a free port).
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/common.h"
#include "config/train_config.h"
#include "core/error.h"
#include "parallel/launcher.h"
#include "train/run.h"

namespace ftune::cli {
namespace {

struct TrainArgs {
  std::string config;
  std::vector<std::string> sets;
  int nproc = 1;
};

void run_train(const TrainArgs& a) {
  if (a.nproc > 1) {
    const char* rank = std::getenv("RANK");
    FTUNE_CHECK(rank == nullptr, "train: --nproc: this process is already a worker (RANK=", rank,
                " is set); run it without --nproc, or unset RANK to launch workers from here");
    // One error line here rather than the same one from every worker.
    config::load_train_config(a.config, a.sets);
    std::vector<std::string> command = {"train", "--config", a.config};
    for (const std::string& s : a.sets) {
      command.push_back("--set");
      command.push_back(s);
    }
    parallel::LaunchOptions opts;
    opts.nproc = a.nproc;
    opts.master_port = 0;  // one node: a free port, so two such runs on a machine never collide
    run_workers(opts, command);
    return;
  }
  // run_training validates the whole config before it allocates anything.
  const train::RunSummary s = train::run_training(config::load_train_config(a.config, a.sets));
  // Preempted: the checkpoint is written; exit as a process the signal ended would (143, 130).
  if (s.stop_signal != 0) std::exit(128 + s.stop_signal);
}

}  // namespace

void register_train(CLI::App& app) {
  auto a = std::make_shared<TrainArgs>();
  auto* cmd = app.add_subcommand(
      "train", "Fine-tune a model (full, LoRA or QLoRA) on one CPU or GPU, or with DDP over several "
               "processes, from a YAML config");
  cmd->add_option("--config", a->config,
                  "YAML config: sections model, data, training, logging, parallel, lora, quant")
      ->required()
      ->type_name("FILE");
  cmd->add_option("--set", a->sets,
                  "Override one key, e.g. --set training.lr=1e-4 (repeatable; applied in order)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_option("--nproc", a->nproc,
                  "Run N worker processes on this node (ftune launch --nproc N --master-port 0 -- "
                  "train ...; default 1: train in this process)")
      ->check(int_at_least(1))
      ->type_name("N");
  cmd->callback([a] { run_train(*a); });
}

}  // namespace ftune::cli
