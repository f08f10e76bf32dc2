// See fsdp_strategy.h.
#include "train/fsdp_strategy.h"

#include "core/error.h"

namespace ftune::train {

std::unique_ptr<Strategy> make_fsdp_strategy(parallel::ProcessGroup& /*group*/,
                                             at::Device /*device*/,
                                             const config::TrainConfig& cfg) {
  fail(cfg.where("parallel.strategy"), ": parallel.strategy: fsdp is not built yet");
}

}  // namespace ftune::train
