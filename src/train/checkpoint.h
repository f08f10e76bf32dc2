// Training checkpoints: <output_dir>/checkpoints/step-<N>/ with the model (HF layout, loadable by
// transformers), optimizer state, RNG states and trainer_state.json (step, data position, counters).
// A checkpoint is written into a hidden temp dir and renamed into place only when complete;
// trainer_state.json, written last, marks completeness; older checkpoints beyond keep_last are
// removed only after the new one is in place. So a run killed at any moment leaves every earlier
// checkpoint intact. Defines TrainState, save_checkpoint, latest_checkpoint, load_checkpoint.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>

#include "model/llama.h"
#include "optim/adamw.h"

namespace ftune::train {

// Everything besides tensors needed to continue a run exactly.
struct TrainState {
  int64_t step = 0;         // optimizer steps completed
  int64_t epoch = 0;        // data stream position after `step` (BatchStream::epoch/position)
  int64_t position = 0;
  int64_t tokens_seen = 0;  // input tokens processed (rows x length, padding included)
  double elapsed_s = 0.0;   // training wall time so far (excludes start-up)
  double last_loss = std::numeric_limits<double>::quiet_NaN();
  double last_eval_loss = std::numeric_limits<double>::quiet_NaN();

  nlohmann::json to_json() const;
  static TrainState from_json(const nlohmann::json& j, const std::string& origin);
};

std::filesystem::path checkpoint_dir(const std::filesystem::path& output_dir, int64_t step);

// Writes checkpoints/step-<state.step> atomically, then deletes all but the newest `keep_last`
// checkpoints. `meta` is stored in trainer_state.json beside the state (config, total steps).
// Env FTUNE_TEST_SLOW_CHECKPOINT_WRITE=<seconds> sleeps midway (after the weights), so tests can
// kill -9 a run during a write.
std::filesystem::path save_checkpoint(const std::filesystem::path& output_dir,
                                      model::LlamaForCausalLM& m, const optim::AdamW& opt,
                                      const TrainState& state, int64_t keep_last,
                                      const nlohmann::json& meta = nlohmann::json::object());

// The complete checkpoint with the highest step in output_dir, if any (temp dirs are ignored).
std::optional<std::filesystem::path> latest_checkpoint(const std::filesystem::path& output_dir);

// Removes temp dirs a killed run left in output_dir/checkpoints.
void remove_stale_checkpoint_temps(const std::filesystem::path& output_dir);

// Restores model weights, optimizer state and the CPU (and CUDA) RNG states from `dir`; returns
// the saved TrainState. Errors name the checkpoint file.
TrainState load_checkpoint(const std::filesystem::path& dir, model::LlamaForCausalLM& m,
                           optim::AdamW& opt);

}  // namespace ftune::train
