// What a training run holds in memory, by role: parameter counts (trainable and total) and the
// bytes of the frozen base, of the trainable parameters and of the optimizer state, from the
// tensors themselves (not a formula), logged at start and in the run summary.
// Defines ParamReport, param_report, frozen_base_bytes, format_param_report.
#pragma once

#include <cstdint>
#include <string>

#include "model/llama.h"
#include "optim/adamw.h"

namespace ftune::train {

struct ParamReport {
  int64_t trainable = 0;        // parameters the optimizer updates
  int64_t total = 0;            // every parameter of the model (base + adapters)
  int64_t base_bytes = 0;       // frozen base (see frozen_base_bytes); 0 in full fine-tuning
  int64_t trainable_bytes = 0;  // the trainable parameters' storage
  int64_t optimizer_bytes = 0;  // optimizer state (AdamW: exp_avg, exp_avg_sq, step)
};

// Bytes of the frozen (requires_grad false) parameters of `m`. A 4-bit linear's packed weight and
// statistics are counted here too once they exist as module tensors: extend this function.
int64_t frozen_base_bytes(model::LlamaForCausalLM& m);

ParamReport param_report(model::LlamaForCausalLM& m, const optim::AdamW& opt);

// "parameters: 1234 trainable of 56789 (2.17%); memory: frozen base 12.34 MB, trainable
// 1.23 MB, optimizer state 2.46 MB" (MB = 1e6 bytes).
std::string format_param_report(const ParamReport& r);

}  // namespace ftune::train
