// The seams through which a training strategy (DDP, FSDP, ZeRO, LoRA) changes what the loop does
// without forking it: who this process is (rank, device, which rows it reads), which parameters
// train, when and how gradients are synchronized, how the clipped optimizer step runs, how
// per-rank counts are summed, and what the communication cost. SingleDevice is the plain case; a
// strategy overrides only what it changes. The algorithms (buckets, shards, c10d) live in
// src/parallel; a Strategy adapts one of them to the loop.
// Defines DataShard, PieceInfo, MicroBatchRunner, Strategy, SingleDevice.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/dataset.h"
#include "model/llama.h"
#include "optim/adamw.h"
#include "optim/grad_clip.h"
#include "parallel/process_group.h"

namespace ftune::train {

// Which share of each global micro-batch this rank reads: rows [index * mb, (index + 1) * mb) of
// the mb * count rows the global stream yields (data::BatchStream::next).
struct DataShard {
  int64_t index = 0;
  int64_t count = 1;
};

// Where one of the optimizer's tensors sits in the model: it covers elements
// [offset, offset + numel) of the flattened parameter `name` (named_parameters() name), whose
// full shape is `shape`. A sharded strategy's optimizer holds such 1-D pieces.
struct PieceInfo {
  std::string name;
  std::vector<int64_t> shape;
  int64_t offset = 0;
  // Another rank holds the same values and writes them (a data-parallel replica, the last
  // pipeline stage's copy of a tied embedding): a checkpoint skips it; resuming still loads it.
  bool replica = false;
};

// How a strategy that cuts the model into pipeline stages runs the loop's micro-batches: each
// rank computes only its stage, in the order its schedule says. Every rank gets the results.
class MicroBatchRunner {
 public:
  virtual ~MicroBatchRunner() = default;
  // Forward and backward of one optimizer step's micro-batches, each loss sum divided by `denom`
  // before its backward; returns the sum of their loss sums (before the division).
  virtual double train_step(model::LlamaForCausalLM& m, const std::vector<data::Batch>& micro,
                            double denom, bool bf16_autocast) = 0;
  // Forward only over `batches`: the NLL sum and the target count.
  virtual std::pair<double, int64_t> eval_sums(model::LlamaForCausalLM& m,
                                               const std::vector<data::Batch>& batches,
                                               bool bf16_autocast) = 0;
  // What to add to the metrics line of a logged step (the measured timeline's bubble, ...).
  virtual nlohmann::json step_metrics() = 0;
};

class Strategy {
 public:
  virtual ~Strategy() = default;

  // This process's place in the run (one process: rank 0 of 1). Rank 0 alone logs and saves.
  virtual std::string name() const { return "none"; }  // parallel.strategy, resolved
  virtual int rank() const { return 0; }
  virtual int world_size() const { return 1; }
  bool is_main() const { return rank() == 0; }
  virtual DataShard data_shard() const { return {}; }

  // Where the model is built before prepare() sees it: the run's device, or (a strategy that
  // places parts of it on several devices) the host, so no single device holds it whole.
  virtual at::Device load_device(at::Device run_device) const { return run_device; }

  // Prepares the model (wrap, shard, inject adapters) and returns the parameters to train, by
  // name: by default every parameter that requires grad (frozen ones never reach the optimizer).
  // Called once, before the optimizer is built.
  virtual optim::NamedTensors prepare(model::LlamaForCausalLM& m) {
    optim::NamedTensors out;
    for (const auto& p : m->named_parameters()) {
      if (p.value().requires_grad()) out.emplace_back(p.key(), p.value());
    }
    return out;
  }

  // The weight-decay flags of prepare()'s tensors for the optimizer; empty = by dimension.
  virtual std::vector<bool> decay_flags() const { return {}; }

  // The optimizer state in the single-process format, for a checkpoint (a sharded strategy
  // gathers it: every rank must call this), and its inverse when resuming (called after the
  // checkpoint's weights are in the model).
  virtual optim::NamedTensors optimizer_state(const optim::AdamW& opt) { return opt.state(); }
  virtual void load_optimizer_state(optim::AdamW& opt, const std::map<std::string, at::Tensor>& st,
                                    const std::string& origin) {
    opt.load_state(st, origin);
  }

  // Sharded strategies: one entry per optimizer parameter (opt.params() order) saying which part
  // of which model parameter it is; empty when the optimizer holds whole parameters (then rank 0
  // alone writes consolidated checkpoints). pieces_loaded() runs after a checkpoint overwrote the
  // pieces' values (and their optimizer state), so the model's parameters follow them.
  virtual std::vector<PieceInfo> piece_layout() const { return {}; }
  virtual void pieces_loaded() {}

  // Runs fn(u) for every unit u = 0 .. model::unit_count - 1 in order, with unit u's parameters
  // (and 4-bit weights) holding their full values on every rank while fn runs: what a streamed
  // export reads; a LoRA model's frozen base may stay sharded (its export reads the adapters
  // alone). Every rank must call it. A strategy that keeps whole parameters just calls fn.
  virtual void for_each_unit_gathered(model::LlamaForCausalLM& m,
                                      const std::function<void(int64_t unit)>& fn) {
    for (int64_t u = 0; u < model::unit_count(m->config()); ++u) fn(u);
  }

  // Before each micro-batch's backward: whether it is the last one of the optimizer step (DDP
  // communicates only then).
  virtual void before_backward(bool /*last_micro_batch*/) {}

  // Sums a per-rank quantity over ranks (target tokens of the accumulated batch, loss sums), so
  // the loss is normalized by the global token count.
  virtual int64_t global_sum(int64_t local) { return local; }
  virtual double global_sum(double local) { return local; }

  // Runs after every micro-batch of an optimizer step has been backpropagated: gradient sync.
  virtual void after_backward(const optim::NamedTensors& /*params*/) {}

  // Clips the total gradient norm (0 = no clipping) and updates; returns the norm before
  // clipping. A sharded strategy computes the norm across shards here.
  virtual double clip_and_step(optim::AdamW& opt, double lr, double max_grad_norm) {
    return opt.clip_and_step(lr, max_grad_norm);
  }

  // Whether `local` holds on any rank (every rank must call it): a stop signal one rank got.
  virtual bool any_rank(bool local) { return local; }

  // Waits until every rank gets here; timeout_s 0 = the group's (parallel.timeout_s).
  virtual void barrier(const std::string& /*what*/, double /*timeout_s*/ = 0) {}

  // Records the step this rank is at (timeout messages name the ranks behind), and this rank's
  // fatal error (so the others name it instead of waiting out their timeout).
  virtual void mark_step(int64_t /*step*/) {}
  virtual void mark_failed(const std::string& /*message*/) {}

  // Null: the loop forwards and backpropagates each micro-batch through the whole model itself.
  virtual MicroBatchRunner* runner() { return nullptr; }

  // Bytes of the communication buffers the strategy keeps between steps (DDP's buckets).
  virtual int64_t buffer_bytes() const { return 0; }
  // Bytes of parameters this rank holds between steps when the strategy shards them (FSDP: its
  // pieces and the frozen tensors' row blocks); -1 = the model's own tensors (param_report).
  virtual int64_t held_param_bytes() const { return -1; }
  // The largest footprint of gathered full parameters since the last call (FSDP); 0 = none.
  virtual int64_t take_peak_gathered_bytes() { return 0; }

  // What this rank's collectives moved and waited since the last call.
  virtual parallel::CommStats take_comm_stats() { return {}; }

  // After training: checks that the replicas agree bit for bit; a line for the summary ("" when
  // there is nothing to check).
  virtual std::string check_replicas() { return ""; }
};

class SingleDevice : public Strategy {};

}  // namespace ftune::train
