// What a training run holds in memory, by role: parameter counts (trainable and total) and the
// bytes of the frozen base, of the trainable parameters and of the optimizer state, from the
// tensors themselves (not a formula), logged at start and in the run summary.
// Defines ParamReport, BaseSize, frozen_base_size, param_report, gradient_bytes,
// format_param_report.
#pragma once

#include <cstdint>
#include <string>

#include "model/llama.h"
#include "optim/adamw.h"

namespace ftune::train {

struct ParamReport {
  int64_t trainable = 0;        // parameters the optimizer updates
  int64_t total = 0;            // trainable + frozen base parameters
  int64_t base_bytes = 0;       // frozen base (see frozen_base_size); 0 in full fine-tuning
  int64_t trainable_bytes = 0;  // the trainable parameters' storage
  int64_t optimizer_bytes = 0;  // optimizer state (AdamW: exp_avg, exp_avg_sq, step)
};

// The frozen base: parameters (the count of the weights they stand for) and bytes held.
struct BaseSize {
  int64_t params = 0;
  int64_t bytes = 0;
};

// The frozen base of `m`: its frozen (requires_grad false) dense parameters plus its 4-bit linears
// (their logical weight count, and the bytes of the packed data and statistics).
BaseSize frozen_base_size(model::LlamaForCausalLM& m);

ParamReport param_report(model::LlamaForCausalLM& m, const optim::AdamW& opt);

// Bytes of the distinct storages that hold the gradients of the model's parameters and of the
// optimizer's tensors right now (a sharded strategy's shard gradients, which may be views into
// one buffer, count once, as that buffer).
int64_t gradient_bytes(model::LlamaForCausalLM& m, const optim::AdamW& opt);

// "parameters: 1234 trainable of 56789 (2.17%); memory: frozen base 12.34 MB, trainable
// 1.23 MB, optimizer state 2.46 MB" (MB = 1e6 bytes).
std::string format_param_report(const ParamReport& r);

}  // namespace ftune::train
