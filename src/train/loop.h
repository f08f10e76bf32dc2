// The training loop: for each optimizer step, grad_accum micro-batches are forwarded and
// backpropagated with the loss normalized by the target tokens of the WHOLE accumulated batch (so
// accumulation equals one larger batch), then the strategy syncs, clips and steps. Around it:
// warmup + schedule, bf16 autocast, periodic evaluation, checkpoints, metrics and progress.
// Everything the loop does to the model goes through Strategy, so DDP/FSDP/LoRA reuse it as is.
// Defines LoopOptions, EvalResult, evaluate, train_loop.
#pragma once

#include <filesystem>
#include <functional>
#include <vector>

#include "data/dataset.h"
#include "optim/adamw.h"
#include "optim/lr_schedule.h"
#include "train/checkpoint.h"
#include "train/metrics.h"
#include "train/strategy.h"

namespace ftune::train {

struct LoopOptions {
  int64_t total_steps = 1;        // optimizer steps of the whole run
  int64_t micro_batch = 1;        // rows per forward/backward
  int64_t grad_accum = 1;         // micro-batches per optimizer step
  double max_grad_norm = 1.0;     // 0 = no clipping (the norm is still reported)
  optim::LrScheduleOptions schedule;
  int64_t log_every = 1;          // metrics line every N steps (and on eval steps, and the last)
  int64_t eval_every = 0;         // 0 = evaluate only after the last step
  bool eval_at_start = false;     // evaluate before the first step of a fresh run (step 0)
  int64_t save_every = 0;         // 0 = no checkpoints (except when stopping early)
  int64_t keep_last = 2;
  int64_t stop_after = 0;         // stop after this step (checkpointed); 0 = run to the end
  bool bf16_autocast = false;     // forward in bf16 autocast; weights, grads, optimizer stay fp32
  bool dump_batches = false;      // write each step's micro-batches to <output_dir>/batches
  bool skip_nonfinite = false;    // a non-finite loss or grad norm: drop the update and go on
                                  // (training.nonfinite: skip) instead of stopping with an error
  int64_t max_skipped = 5;        // ... at most this many steps in a row
  bool progress_bar = false;      // redrawn bar (terminal) instead of log lines
  double peak_flops = 0;          // MFU denominator, FLOP/s
  double flops_per_token = 0;     // see train_flops_per_token
  at::Device device = at::kCPU;
  // Measure each step's peak of live tensor bytes (memory/tracker.h: the CUDA allocator, or the
  // CPU tracker when it is installed) and log it next to predict_peak_bytes (the estimator's
  // figure for this rank, tensors only, given the share of the step's positions that are loss
  // targets; unset or 0 = no prediction).
  bool measure_memory = false;
  std::function<int64_t(double target_fraction)> predict_peak_bytes;
  std::filesystem::path output_dir;
  nlohmann::json checkpoint_meta = nlohmann::json::object();  // stored in each checkpoint
  std::filesystem::path tokenizer_dir;  // its tokenizer files go into each checkpoint
  std::string base_model;         // a LoRA checkpoint's base_model_name_or_path
  double save_wait_s = 1800;      // how long the other ranks wait for rank 0 to save a checkpoint
  // The stop signal this process received (preempt.h), polled after every step; null = none.
  std::function<int()> stop_signal;
};

struct EvalResult {
  double loss = 0;     // mean NLL over target tokens
  double ppl = 0;      // exp(loss)
  int64_t tokens = 0;  // target tokens evaluated
};

// Mean next-token loss over `batches` (no grad).
EvalResult evaluate(model::LlamaForCausalLM& m, const std::vector<data::Batch>& batches,
                    bool bf16_autocast, at::Device device);

// Runs steps state.step+1 .. total_steps (or stop_after, or the step in which any rank received a
// stop signal: then state.stop_signal says which, after the checkpoint). `train` must already be positioned at
// state.epoch/position. Returns the state after the last step run. A non-finite loss on the first
// step it runs is an error (naming the step).
TrainState train_loop(model::LlamaForCausalLM& m, Strategy& strategy, optim::AdamW& opt,
                      data::BatchStream& train, const std::vector<data::Batch>& valid,
                      TrainState state, const LoopOptions& o, MetricsLog& metrics);

}  // namespace ftune::train
