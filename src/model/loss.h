// Causal-LM loss as transformers computes it: logits at position t predict labels[t + 1]; labels
// equal to kIgnoreIndex (-100) are skipped; logits are upcast to fp32 first. Returning the SUM and
// the target count (instead of a mean) lets callers normalize over a whole accumulated batch.
#pragma once

#include <ATen/ATen.h>

namespace ftune::model {

constexpr int64_t kIgnoreIndex = -100;

struct LossSum {
  at::Tensor sum;     // scalar fp32, differentiable
  int64_t count = 0;  // number of predicted (non-ignored) targets
};

// logits: [B, T, V]; labels: [B, T] (unshifted, like HF `labels=`).
LossSum causal_lm_loss_sum(const at::Tensor& logits, const at::Tensor& labels);

}  // namespace ftune::model
