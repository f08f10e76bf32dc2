// FSDP (ZeRO-3) through the Strategy seam: parallel::Fsdp shards every parameter of the model
// (and QLoRA's packed 4-bit weights) across the ranks unit by unit, gathers a unit's around its
// forward and backward through the model's UnitHooks, reduce-scatters its gradients as soon as
// its backward is done, and steps the optimizer on each rank's fp32 shards.
// Defines make_fsdp_strategy.
#pragma once

#include <memory>

#include "config/train_config.h"
#include "parallel/process_group.h"
#include "train/strategy.h"

namespace ftune::train {

std::unique_ptr<Strategy> make_fsdp_strategy(parallel::ProcessGroup& group, at::Device device,
                                             const config::TrainConfig& cfg);

}  // namespace ftune::train
