// The VRAM estimator behind `ftune memory` (issue #11): pure arithmetic on a LlamaConfig and a
// training setup, no tensors, every figure per rank and in bytes. Model states are the ZeRO
// paper's terms exactly (../shared/REFERENCE.md §5); activations count what autograd saves in
// ftune's decoder layer op by op (the ops of transformers' LlamaDecoderLayer with SDPA, which keeps
// no [T, T] scores); where ftune's implementation holds more than the paper's layout, that is a
// separate, itemized row, so the paper's terms stay checkable to the byte. See docs/memory.md.
// Defines EstimateOptions, ParamCounts, ModelStates, Breakdown, Estimate and estimate().
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"

namespace ftune::config {
struct TrainConfig;
}

namespace ftune::memory {

enum class Strategy { kSingle, kDdp, kZero1, kZero2, kFsdp, kPipeline, kModelParallel };
enum class Optimizer { kAdamW, kSgd };  // sgd: with momentum (one fp32 buffer per parameter)

// "single" | "ddp" | "zero1" | "zero2" | "fsdp" | "pipeline" | "model_parallel"; throws naming
// `where` otherwise.
Strategy parse_strategy(const std::string& name, const std::string& where);
const char* strategy_name(Strategy s);
const std::vector<std::string>& strategy_names();
// The ZeRO stage a strategy shards like: 0 (replicas), 1, 2, or 3 (fsdp).
int zero_stage(Strategy s);

// CUDA context, cuBLAS/cuDNN workspaces and caching-allocator fragmentation: a fixed allowance,
// not derived (docs/memory.md says where it comes from).
constexpr int64_t kFrameworkOverheadBytes = int64_t{1} << 30;
// ftune's chunked loss projects about this many logits at a time (src/model/loss.cpp).
constexpr int64_t kLossChunkLogits = int64_t{1} << 24;

struct EstimateOptions {
  Strategy strategy = Strategy::kSingle;
  int64_t world_size = 1;  // N: ranks, one GPU each (model_parallel: the devices of its process)
  int64_t pp = 1;          // pipeline / model_parallel stages; N / pp is the data-parallel degree
  bool bf16 = true;        // bf16 autocast over fp32 master weights (full fine-tuning, as ftune
                           // trains); with LoRA the frozen base is stored in bf16. false = fp32
  Optimizer optimizer = Optimizer::kAdamW;
  int64_t lora_r = 0;      // adapter rank; 0 = full fine-tuning
  std::vector<std::string> lora_targets = {"q_proj", "v_proj"};  // or all-linear
  double lora_dropout = 0;  // dropout on each adapter's input: its mask and its own dropped copy
  bool cuda = true;         // the device: dropout keeps a bool mask on CUDA, a float noise on CPU
  bool qlora = false;      // the frozen base's decoder linears in NF4 (needs lora_r > 0)
  int64_t nf4_blocksize = 64;
  bool nf4_double_quant = true;
  int64_t micro_batch = 1;  // rows per forward/backward per rank
  int64_t grad_accum = 1;   // micro-batches per optimizer step: past the first, each forward runs
                            // while the earlier ones' gradients are held (not pipeline: its
                            // schedule's in-flight count covers the micro-batches)
  int64_t seq_len = 2048;
  bool grad_ckpt = false;   // recompute each decoder layer in backward
  bool chunked_loss = true; // ftune's target-only chunked loss (false: full [B, S, V] logits)
  double target_fraction = 1.0;  // share of the positions that are loss targets (response-only
                                 // data has fewer); the chunked loss works on the targets only
  bool packed_mask = false;  // packed rows with a block-diagonal [B, 1, S, S] bool mask
                             // (data.packing): SDPA's memory-efficient and CPU flash kernels keep
                             // their own copy in the compute dtype per layer for the backward
  bool offload_optimizer = false;  // zero1/zero2/fsdp: master weights + optimizer state on host
  int64_t overhead_bytes = kFrameworkOverheadBytes;

  bool lora() const { return lora_r > 0; }
  int64_t dp() const { return world_size / pp; }  // data-parallel degree
  // Throws "memory: --<flag>: ..." naming the flag a bad value came from.
  void validate(const model::LlamaConfig& c) const;
};

// What the model holds, in elements.
struct ParamCounts {
  int64_t embedding = 0;      // V x h
  int64_t per_layer = 0;      // one decoder layer: 7 linears (+ biases) and 2 norms
  int64_t layer_linears = 0;  // the 7 linear weights of one layer (what QLoRA quantizes)
  int64_t largest_linear = 0; // elements of the largest of them
  int64_t final_norm = 0;     // h
  int64_t lm_head = 0;        // V x h; 0 when tied to the embedding
  int64_t total = 0;
  int64_t lora_per_layer = 0; // adapter elements of one layer: r (in + out) per target
  int64_t trainable = 0;      // total (full fine-tuning) or every layer's adapters
};
ParamCounts count_parameters(const model::LlamaConfig& c, const EstimateOptions& o);

// Bytes ftune (and bitsandbytes) hold for one weight of `numel` elements in NF4: packed nibbles,
// the absmax (fp32, or uint8 with double quantization plus the fp32 nested absmax, the 256-entry
// nested map and the offset) and the 16-entry code table (REFERENCE.md §3; quant::Nf4Tensor).
int64_t nf4_bytes(int64_t numel, int64_t blocksize, bool double_quant);

// The ZeRO paper's per-rank model states for `psi` trainable elements over `dp` data-parallel
// ranks at ZeRO stage 0-3. Mixed precision: 2 psi weights + 2 psi gradients + K psi with K = 12
// for AdamW (fp32 master 4, m 4, v 4) or 8 for SGD (master, momentum). fp32 (and LoRA adapters,
// which ftune keeps in fp32): 4 + 4 + K' with K' = 8 (AdamW m, v) or 4 (SGD), no master. Stage 1
// divides the master and optimizer terms by dp, stage 2 the gradients too, stage 3 everything; a
// divided term holds ceil(psi / dp) elements (ftune pads the flat space to a multiple of dp).
struct ModelStates {
  int64_t weights = 0, gradients = 0, master_weights = 0, optimizer_states = 0;
  int64_t total() const { return weights + gradients + master_weights + optimizer_states; }
};
ModelStates zero_model_states(int64_t psi, int64_t dp, int stage, bool mixed, Optimizer opt);

// One rank's bytes. The step has up to four moments, and total is the largest:
//   forward end / backward start: persistent - grad_timed + forward_backward + head_grad
//     (grad_timed stays when accumulating: the earlier micro-batches' gradients are held)
//   backward end: persistent + backward_end_extra + gathered_at_backward_end + comm_buffers
//   gradient sync (zero1/zero2): persistent + sync_buffers
//   optimizer step: persistent - step_released + step_buffers
// grad_timed is the part of the states and ftune_extra that exists only from the backward through
// the step (ftune's zero_grad frees the gradients, ZeRO-3's shard sums included): the
// activations are freed layer by layer as the gradients appear, so the two never peak together.
struct Breakdown {
  ModelStates states;            // the ZeRO terms (offloaded terms moved to host_bytes)
  int64_t frozen_base = 0;       // LoRA / QLoRA: the base model (bf16, fp32 or NF4 + dense)
  int64_t ftune_extra = 0;       // sum of Estimate::extra_items
  int64_t activations = 0;       // saved for backward, all micro-batches in flight
  int64_t logits = 0;            // the loss's working set (chunked or full, as configured)
  int64_t gathered_params = 0;   // fsdp: gathered units; QLoRA: one dequantized linear
  int64_t gathered_at_backward_end = 0;  // of those, what the backward's last unit holds
  int64_t comm_buffers = 0;      // during forward/backward: DDP buckets, FSDP unit gradients,
                                 // pipeline hand-offs
  int64_t backward_temps = 0;    // a layer's backward working set: SwiGLU's [T, f] gradients
                                 // (3, or 2 when down_proj keeps its input) beside the layer's
                                 // own activations
  int64_t sync_buffers = 0;      // zero1/zero2: the flat gradient sum, made while every gradient
                                 // is still held
  int64_t step_buffers = 0;      // during the optimizer step only: ZeRO's gather buffers (and
                                 // zero1's reduced gradients' view of the flat sum)
  int64_t step_released = 0;     // gradient bytes gone by the step (zero2: the full gradients,
                                 // replaced by the shard's fp32 sum)
  int64_t overhead = 0;
  int64_t grad_timed = 0;          // gradients (and ftune's gradient-sized extras) held only from
                                   // the backward through the step; included in the terms above
  int64_t head_grad = 0;           // the head's gradient, the first one the backward makes
  int64_t backward_end_extra = 0;  // a tied embedding: its fresh gradient beside the head's
  bool accumulating = false;       // grad_accum > 1 outside a pipeline
  int64_t persistent() const;
  int64_t forward_backward() const {
    return activations + logits + gathered_params + comm_buffers + backward_temps;
  }
  int64_t total() const;
};

struct Estimate {
  ParamCounts params;
  int64_t dp = 1;
  Breakdown rank;                 // the rank that needs the most (pipeline: the worst stage)
  int64_t stage = 0;              // which stage that is (0 when there are no stages)
  std::vector<int64_t> stage_split;   // pipeline / model_parallel: balanced_split's points
  std::vector<int64_t> stage_totals;  // per stage
  int64_t trainable_on_rank = 0;  // psi of the ZeRO terms (this stage's trainable elements)
  int64_t host_bytes = 0;         // offload: what moved to CPU memory
  std::vector<std::pair<std::string, int64_t>> extra_items;  // what ftune_extra is made of

  // Activations of one decoder layer for one micro-batch, without and with checkpointing.
  int64_t act_per_layer = 0;
  int64_t act_per_layer_ckpt = 0;
  int64_t layers_on_rank = 0;
  int64_t in_flight = 1;            // micro-batches a stage holds (1F1B: P - stage)
  int64_t logits_chunked = 0;       // the loss's working set with ftune's chunked loss
  int64_t logits_full = 0;          // and with full [B, S, V] fp32 logits and their gradient
};

Estimate estimate(const model::LlamaConfig& c, const EstimateOptions& o);

// Bytes autograd saves per token in one decoder layer (no checkpointing); the pieces are
// documented at the definition and in docs/memory.md.
int64_t layer_activation_bytes_per_token(const model::LlamaConfig& c, const EstimateOptions& o);

// The estimator's view of a training config at `world_size` ranks (the seam for comparing a
// run's measured memory with its prediction). Loss chunking is always on in ftune.
EstimateOptions options_from_train_config(const config::TrainConfig& t, int64_t world_size);

}  // namespace ftune::memory
