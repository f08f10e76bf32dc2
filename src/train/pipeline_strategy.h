// Pipeline parallelism through the Strategy seam (parallel.strategy: pipeline): world = pp x dp
// ranks, rank = stage * dp + replica. Each stage owns a contiguous block of decoder layers
// (stage_split), the first also the embedding, the last the final norm, the head and the loss;
// the layers it does not own give their memory back (their shapes stay, for the export).
// Each optimizer step's micro-batches run through parallel::PipelineStage under the schedule
// (parallel.schedule, parallel.micro_batches per round); every stage reads the same rows (its
// replica's share), so only activations and their gradients travel between stages. The loss is
// normalized by the replicas' global target count as in one process; a tied embedding is a
// parameter of both the first and the last stage, whose gradients are summed before the step.
// A stage's replicas run DDP among themselves; clipping takes the norm over the stages.
// Checkpoints are sharded by parameter (each owner writes its own); the export streams every
// unit to rank 0 from its owner. Each step's measured timeline goes to the metrics and
// <output_dir>/pipeline_timeline.json.
// Defines make_pipeline_strategy.
#pragma once

#include <memory>

#include "config/train_config.h"
#include "parallel/process_group.h"
#include "train/strategy.h"

namespace ftune::train {

// `world` is the run's group; parallel.pp must divide its size (a config error otherwise).
std::unique_ptr<Strategy> make_pipeline_strategy(parallel::ProcessGroup& world, at::Device device,
                                                 const config::TrainConfig& cfg);

}  // namespace ftune::train
