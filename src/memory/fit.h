// `ftune memory --fit`: searches the strategies ftune train runs x {full, LoRA, QLoRA} x micro-batch
// x activation checkpointing x optimizer offload for configurations whose estimate fits the GPU,
// and ranks them by a deliberately simple speed model: compute at an assumed sustained FLOP rate,
// plus each strategy's ring-collective bytes over an assumed link bandwidth, plus the offload's
// host round trip; nothing overlaps (docs/memory.md "Speed model"). The trade-off: the ranking is
// only as good as those constants, which `ftune plan` (issue #11 item 4) is to calibrate; the
// memory side is the estimator's. Defines Method, SpeedModel, StepTime, FitOptions, Candidate,
// FitResult, step_time(), fit() and train_overrides().
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "memory/estimate.h"

namespace ftune::memory {

enum class Method { kFull, kLora, kQlora };
const char* method_name(Method m);  // "full" | "lora" | "qlora"
Method method_of(const EstimateOptions& o);

struct SpeedModel {
  double bf16_flops = 400e12;        // sustained dense bf16 FLOP/s per GPU (~40% of an H100's peak)
  double fp32_flops = 50e12;         // the same in fp32 (no TF32)
  double link_bytes_per_s = 100e9;   // per-GPU bandwidth of the collectives' ring
  double host_bytes_per_s = 25e9;    // PCIe, for the offloaded optimizer's round trip
  double cpu_adam_params_per_s = 2e9;  // parameters the CPU optimizer updates per second
  double qlora_slowdown = 1.28;      // dequantization: torchtune's LoRA / QLoRA tok/s on Llama-3.1-8B
                                     // (REFERENCE.md §6: 3083 / 2413)
  double hbm_bytes_per_s = 2e12;     // sustained device memory bandwidth, for the optimizer step
  double optimizer_bytes_per_param = 32;  // AdamW in fp32: read p, g, m, v; write p, m, v; bf16 copy
  double launch_s_per_layer = 1e-4;  // fixed cost of one layer's forward + backward (kernel
                                     // launches, small ops), whatever the micro-batch
  int64_t pipeline_micro_batches_per_stage = 4;  // a pipeline step runs M = 4 P micro-batches
};

struct StepTime {
  double compute_s = 0, comm_s = 0, offload_s = 0;  // compute includes the GPU optimizer step
  int64_t tokens = 0;  // per step, over every data-parallel rank
  double total_s() const { return compute_s + comm_s + offload_s; }
  double tokens_per_s() const { return total_s() > 0 ? static_cast<double>(tokens) / total_s() : 0; }
};

// FLOPs per token: 6 x (parameters in matmuls) + 12 L h S for full fine-tuning, 4 x ... + 12 L h S
// with frozen weights (no weight gradients); checkpointing adds a forward (2 x ... + 4 L h S).
double flops_per_token(const model::LlamaConfig& c, const EstimateOptions& o);
StepTime step_time(const model::LlamaConfig& c, const EstimateOptions& o, const Estimate& e,
                   const SpeedModel& s);

// The pieces step_time adds up, shared with `ftune plan` (memory/plan.h):
// one micro-batch's forward + backward on one GPU (FLOPs at the dtype's rate, QLoRA's slowdown,
// the fixed per-layer cost), and the optimizer step streaming its (shard of the) state.
double micro_batch_s(const model::LlamaConfig& c, const EstimateOptions& o, const SpeedModel& s);
double optimizer_step_s(const EstimateOptions& o, const Estimate& e, const SpeedModel& s);

// One step's collectives, in the bytes ftune hands them (fp32 gradients and master pieces; FSDP's
// gathered units in the compute dtype), with `micro_batches` forward/backward passes per rank in
// the step (pipeline: M, the stage's micro-batches). all_reduce: payload of ring all-reduces over
// the data-parallel group; gather: all-gathers plus reduce-scatters; p2p: bytes a pipeline stage
// sends (activations forward, their gradients back). The calls count the collectives (for the
// latency term): DDP one per bucket of `bucket_bytes`, FSDP one per unit and pass.
struct CommVolume {
  double all_reduce_bytes = 0, gather_bytes = 0, p2p_bytes = 0;
  int64_t all_reduce_calls = 0, gather_calls = 0, p2p_calls = 0;
};
constexpr int64_t kDdpBucketBytes = int64_t{25} << 20;  // parallel.bucket_mb's default
CommVolume comm_volume(const model::LlamaConfig& c, const EstimateOptions& o, const Estimate& e,
                       int64_t micro_batches);

// The strategies ftune train can run today, which --fit chooses from (pipeline joins with issue
// #10's runtime): single (one GPU), ddp, zero1, zero2, fsdp, model_parallel.
const std::vector<Strategy>& fit_strategies();

struct FitOptions {
  int64_t gpu_mem = 0;   // bytes per GPU
  int64_t gpus = 1;
  EstimateOptions base;  // dtype, optimizer, seq_len, LoRA rank/targets, NF4 options, overhead
  std::vector<Method> methods = {Method::kFull, Method::kLora, Method::kQlora};
  std::vector<int64_t> micro_batches = {1, 2, 4, 8, 16, 32, 64};
  std::vector<Strategy> strategies = fit_strategies();  // searched, where the GPU count allows
  SpeedModel speed;
};

struct Candidate {
  EstimateOptions opts;
  Estimate est;
  StepTime time;
  bool fits = false;
};

struct FitResult {
  std::vector<Candidate> fitting;  // fastest first (ties: less memory first)
  Candidate closest;               // the smallest total of all, for when nothing fits
  int64_t searched = 0;
};

FitResult fit(const model::LlamaConfig& c, const FitOptions& f);

// The `--set section.key=value` overrides of `ftune train` that run `o` (config keys of
// docs/training.md), `model_path` going to model.path.
std::vector<std::string> train_overrides(const EstimateOptions& o, const std::string& model_path);

}  // namespace ftune::memory
