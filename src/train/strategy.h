// The seams through which a training strategy (DDP, FSDP, ZeRO, LoRA) changes what the loop does
// without forking it: which parameters train, how gradients are synchronized, how the clipped
// optimizer step runs, and how per-rank counts are summed. SingleDevice is the plain case; a
// strategy overrides only what it changes (DDP: after_backward + global_sum; LoRA: prepare).
// Defines Strategy, SingleDevice.
#pragma once

#include <cstdint>

#include "model/llama.h"
#include "optim/adamw.h"
#include "optim/grad_clip.h"

namespace ftune::train {

class Strategy {
 public:
  virtual ~Strategy() = default;

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

  // Whether this process writes files and logs (rank 0).
  virtual bool is_main() const { return true; }
};

class SingleDevice : public Strategy {};

}  // namespace ftune::train
