// Training checkpoints: <output_dir>/checkpoints/step-<N>/ with the model (HF layout, loadable by
// transformers) or, for a LoRA run, only its adapter (PEFT's adapter dir: the frozen base is not
// copied), optimizer state, RNG states and trainer_state.json (step, data position, counters).
// A checkpoint is written into a hidden temp dir and renamed into place only when complete;
// older checkpoints beyond keep_last are removed only after the new one is in place. So a run
// killed at any moment leaves every earlier checkpoint intact. checksums.json, written last,
// holds every other file's size and CRC-32C (core/crc32c.h); verify_checkpoint checks them before
// a resume, so a truncated or corrupted file is found by name, not deep in a load.
// Defines TrainState, save_checkpoint, latest_checkpoint, checkpoint_dirs, verify_checkpoint,
// load_checkpoint.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "model/llama.h"
#include "optim/adamw.h"

namespace ftune::train {

// Steps beyond this in a trainer_state.json are rejected as corrupt (2^40: decades of steps).
constexpr int64_t kMaxSteps = int64_t{1} << 40;
// The RNG states' file in a checkpoint dir (both formats).
constexpr char kRngFile[] = "rng.safetensors";

// Everything besides tensors needed to continue a run exactly.
struct TrainState {
  int64_t step = 0;         // optimizer steps completed
  int64_t epoch = 0;        // data stream position after `step` (BatchStream::epoch/position)
  int64_t position = 0;
  int64_t tokens_seen = 0;  // input tokens processed (rows x length, padding included)
  double elapsed_s = 0.0;   // training wall time so far (excludes start-up)
  double last_loss = std::numeric_limits<double>::quiet_NaN();
  double last_eval_loss = std::numeric_limits<double>::quiet_NaN();
  int64_t last_eval_step = -1;  // the step last_eval_loss was measured at; -1 = none
  // Communication of this process's part of the run (not checkpointed): ring bytes this rank
  // sent and seconds it waited on collectives.
  int64_t comm_bytes = 0;
  double comm_exposed_s = 0.0;
  // The run stopped early because a rank was signalled (preempt.h): this process's signal, or
  // SIGTERM when only another rank got one; 0 = not stopped by a signal. Not checkpointed.
  int stop_signal = 0;
  // The most live tensor bytes any step of this process's part of the run held (LoopOptions::
  // measure_memory); not checkpointed.
  int64_t step_peak_bytes = 0;
  // The largest share of loss targets among the micro-batches this process ran (the estimator's
  // target_fraction for the comparison); not checkpointed.
  double max_target_fraction = 0.0;

  nlohmann::json to_json() const;
  // Rejects negative or absurd counts and non-finite numbers: "<origin>: state.step: ...".
  static TrainState from_json(const nlohmann::json& j, const std::string& origin);
};

std::filesystem::path checkpoint_dir(const std::filesystem::path& output_dir, int64_t step);

// Writes checkpoints/step-<state.step> atomically, then deletes all but the newest `keep_last`
// checkpoints; a write that fails (a full disk) removes its temp dir and throws. `meta` is stored in trainer_state.json beside the state (config, total steps).
// The tokenizer files of `tokenizer_dir` (if given) are copied in, so the checkpoint is a model
// dir that eval/generate take as is. A model that carries LoRA adapters is saved as an adapter
// dir whose base_model_name_or_path is `base_model`. Test seam:
// crash_point("checkpoint:after_weights") (core/fs.h) runs midway, after the weights and optimizer
// state, before the RNG and trainer_state.json. `optimizer_state`, when given, is saved instead
// of opt.state(): a sharded strategy's state gathered into the single-process format.
std::filesystem::path save_checkpoint(const std::filesystem::path& output_dir,
                                      model::LlamaForCausalLM& m, const optim::AdamW& opt,
                                      const TrainState& state, int64_t keep_last,
                                      const nlohmann::json& meta = nlohmann::json::object(),
                                      const std::filesystem::path& tokenizer_dir = {},
                                      const std::string& base_model = {},
                                      const optim::NamedTensors* optimizer_state = nullptr);

// Writes `m` into `dir` as a training run's output: a model dir (HF layout), or an adapter dir
// (PEFT layout, base_model_name_or_path = `base_model`) when `m` carries LoRA adapters.
void save_trained(const std::filesystem::path& dir, model::LlamaForCausalLM& m,
                  const std::string& base_model);

// The parsed trainer_state.json of a checkpoint dir (format checked, not the tensors): the
// state, and the meta stored beside it ("config", "total_steps").
struct CheckpointInfo {
  TrainState state;
  nlohmann::json meta;
  std::filesystem::path state_file;
  bool has_checksums = false;  // false: format_version 1, written before checksums.json existed
};
CheckpointInfo read_checkpoint_info(const std::filesystem::path& dir);

// Checks checkpoint `dir` before it is loaded: each file checksums.json lists is present, of its
// size, then of its CRC-32C; then trainer_state.json as read_checkpoint_info. Throws one line
// naming the dir and the file: "checkpoint <dir>: <file>: expected <n> bytes (checksums.json),
// found <m>: truncated or overwritten". A checkpoint from before checksums (format_version 1, no
// checksums.json) passes unverified: its info says has_checksums false.
CheckpointInfo verify_checkpoint(const std::filesystem::path& dir);

// Every checkpoints/step-<N> dir of output_dir, newest first, complete or not: what
// `training.resume: auto` verifies in turn.
std::vector<std::filesystem::path> checkpoint_dirs(const std::filesystem::path& output_dir);

// The complete checkpoint with the highest step in output_dir, if any (temp dirs are ignored).
std::optional<std::filesystem::path> latest_checkpoint(const std::filesystem::path& output_dir);

// Removes temp dirs a killed run left in output_dir/checkpoints.
void remove_stale_checkpoint_temps(const std::filesystem::path& output_dir);

// Shared by both checkpoint formats (this one and checkpoint_sharded.h):
// The CPU RNG state (and `device`'s, when it is a GPU) into a safetensors file, and back.
void write_rng_state(const std::filesystem::path& file, at::Device device);
void restore_rng_state(const std::filesystem::path& file, at::Device device);
// Completes the checkpoint dir `tmp` whose tensors are written: trainer_state.json (state + meta),
// checksums.json (of every file in `tmp`) last, the atomic rename to checkpoints/step-<state.step>, then the keep_last pruning. Returns
// the checkpoint's dir.
std::filesystem::path finish_checkpoint(const std::filesystem::path& tmp,
                                        const std::filesystem::path& output_dir,
                                        const TrainState& state, int64_t keep_last,
                                        const nlohmann::json& meta);

// Restores model weights (the adapter weights into a model that carries adapters, which must
// match the checkpoint's), optimizer state and the CPU (and CUDA) RNG states from `dir`; returns
// the saved TrainState (as read_checkpoint_info). Errors name the checkpoint file. The checksums
// are not checked here: the caller runs verify_checkpoint first (run.cpp, on rank 0 only).
// `load_optimizer`, when given, takes the optimizer state (by name, single-process format) in
// place of opt.load_state: a sharded strategy keeps its own slices of it.
using OptimizerStateLoader =
    std::function<void(const std::map<std::string, at::Tensor>& state, const std::string& origin)>;
TrainState load_checkpoint(const std::filesystem::path& dir, model::LlamaForCausalLM& m,
                           optim::AdamW& opt, const OptimizerStateLoader& load_optimizer = {});

}  // namespace ftune::train
