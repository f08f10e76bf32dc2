// One `ftune train` run from a validated config: resolve the model (dir or preset:NAME), tokenize
// the data, check a checkpoint to resume against the config, build the model/optimizer/schedule,
// resume, run the loop, save the final model in HF layout (an adapter dir in PEFT layout for a
// LoRA run, whose strategy is wrapped in LoraStrategy) and report. Each component gets only its
// own options, built here from the config sections. Defines RunSummary, run_training.
#pragma once

#include <filesystem>
#include <string>

#include "config/train_config.h"
#include "train/report.h"
#include "train/strategy.h"

namespace ftune::train {

struct RunSummary {
  int64_t steps = 0;          // optimizer steps completed (including before a resume)
  int64_t total_steps = 0;
  int64_t tokens = 0;
  double train_seconds = 0;
  double final_loss = 0;
  double eval_loss = 0;       // of the last evaluation; NaN when there was none
  int64_t eval_step = -1;     // the step eval_loss was measured at
  bool finished = false;      // false when stopped early (training.stop_after, a stop signal)
  int stop_signal = 0;        // SIGTERM or SIGINT when a stop signal ended the run early
  ParamReport params;         // parameter counts and memory by role, at the end
  std::string strategy = "none";  // parallel.strategy as resolved (none, ddp, zero1, zero2)
  int world_size = 1;         // ranks that trained
  int64_t comm_bytes = 0;     // ring bytes rank 0 sent over this process's part of the run
  double comm_exposed_s = 0;  // seconds it waited on communication compute did not hide
  std::string replicas;       // DDP: the bit-identity check of the replicas ("" otherwise)
  int64_t measured_peak_bytes = 0;   // rank 0's most live tensor bytes in a step (0: unmeasured)
  int64_t predicted_peak_bytes = 0;  // the estimator's figure for rank 0, tensors only (0: none)
  std::filesystem::path output_dir, final_dir, last_checkpoint;
};

// Runs training as `cfg` says. Calls cfg.validate() first. Prints the resolved config to stdout
// and writes it to <output_dir>/config.yaml; progress goes to stderr; returns the summary (also
// printed). `strategy` defaults to SingleDevice.
RunSummary run_training(const config::TrainConfig& cfg, Strategy* strategy = nullptr);

}  // namespace ftune::train
