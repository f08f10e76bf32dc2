// Turns the `parallel` config section and the launcher's environment (torchrun, `ftune launch`,
// SLURM, Open MPI) into the run's Strategy: one process (SingleDevice) or DDP over a c10d group,
// and the device this rank computes on (model.device "cuda" -> cuda:LOCAL_RANK).
// Defines ParallelRun, parallelize.
#pragma once

#include <memory>

#include "config/train_config.h"
#include "parallel/process_group.h"
#include "train/strategy.h"

namespace ftune::train {

struct ParallelRun {
  std::unique_ptr<parallel::ProcessGroup> group;  // null for one process
  std::unique_ptr<Strategy> strategy;
  at::Device device = at::kCPU;
};

// Reads the environment, checks it against parallel.strategy (none with several processes is an
// error: they would all write the same output_dir), and rendezvouses. `configured` is model.device.
ParallelRun parallelize(const config::TrainConfig& cfg, at::Device configured);

}  // namespace ftune::train
