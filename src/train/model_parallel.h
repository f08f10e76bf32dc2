// Naive model parallelism in one process (parallel.strategy: model_parallel): the decoder layers
// are cut into contiguous blocks of balanced parameter counts (parallel::balanced_split) or at the
// points of parallel.split, one per device of parallel.devices; the embedding goes with the first block, the final norm and head
// with the last. The hidden state moves to the next device between blocks (a differentiable
// copy, so gradients flow back the same way) and one optimizer covers every device. Only one
// device computes at a time: the pipeline schedules (issue #10) are what fill that bubble.
// Defines stage_split, make_model_parallel_strategy.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "config/train_config.h"
#include "train/strategy.h"

namespace ftune::train {

// The layer blocks of `stages` stages as split points [0, b1, ..., layers] (stage k owns layers
// [split[k], split[k + 1])): `split` (parallel.split, checked; errors name `split_where`) when
// given, else balanced by each layer's parameter elements plus its 4-bit weights'. More stages
// than layers is an error naming `stages_where`. Model and pipeline parallelism share it.
std::vector<int64_t> stage_split(model::LlamaForCausalLM& m, int64_t stages,
                                 const std::vector<int64_t>& split, const std::string& split_where,
                                 const std::string& stages_where);

// One stage per device of `devices` (parallel.devices, parsed; at most one stage per layer,
// checked when the model is prepared), cut at parallel.split or balanced.
std::unique_ptr<Strategy> make_model_parallel_strategy(std::vector<at::Device> devices,
                                                       const config::TrainConfig& cfg);

}  // namespace ftune::train
