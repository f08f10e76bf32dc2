// Naive model parallelism in one process (parallel.strategy: model_parallel): the decoder layers
// are cut into contiguous blocks of balanced parameter counts (parallel::balanced_split) or at the
// points of parallel.split, one per device of parallel.devices; the embedding goes with the first block, the final norm and head
// with the last. The hidden state moves to the next device between blocks (a differentiable
// copy, so gradients flow back the same way) and one optimizer covers every device. Only one
// device computes at a time: the pipeline schedules (issue #10) are what fill that bubble.
// Defines make_model_parallel_strategy.
#pragma once

#include <memory>
#include <vector>

#include "config/train_config.h"
#include "train/strategy.h"

namespace ftune::train {

// One stage per device of `devices` (parallel.devices, parsed; at most one stage per layer,
// checked when the model is prepared), cut at parallel.split or balanced.
std::unique_ptr<Strategy> make_model_parallel_strategy(std::vector<at::Device> devices,
                                                       const config::TrainConfig& cfg);

}  // namespace ftune::train
