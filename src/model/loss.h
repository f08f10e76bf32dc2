// Causal-LM loss as transformers computes it: logits at position t predict labels[t + 1]; labels
// equal to kIgnoreIndex (-100) are skipped; logits are upcast to fp32 first. Returning the SUM and
// the target count (instead of a mean) lets callers normalize over a whole accumulated batch.
// Two forms: causal_lm_loss_sum on full logits (the reference), and chunked_lm_loss_sum, which
// projects only the positions that carry a target, a chunk of rows at a time, so the
// [tokens, vocab] fp32 logits and their gradient never exist at once (the training path).
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

// The same loss from the final hidden states and the output projection, without the full logits:
// hidden [B, T, H], weight [V, H] (lm_head or the tied embedding), labels [B, T] unshifted.
// Gathers the N rows whose next label is a target, then per chunk of `chunk_rows` rows computes
// fp32 logits, the loss and, when a gradient is needed, d/dhidden and d/dweight right away
// (softmax - onehot), so only [N, H] and [V, H] gradients are kept for backward (none for a
// frozen weight). Under autocast the projection runs in the autocast dtype and the logits are
// upcast, as at::linear + .to(float) do on the plain path. chunk_rows 0 picks ~2^24 logits per
// chunk. In fp32 it equals causal_lm_loss_sum(at::linear(hidden, weight), labels) and its
// gradients up to summation order (~1e-7 relative). A second backward through it is an error.
LossSum chunked_lm_loss_sum(const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& labels, int64_t chunk_rows = 0);

}  // namespace ftune::model
