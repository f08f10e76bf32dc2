// Shifted, fp32 causal-LM cross-entropy sum; see loss.h.
#include "model/loss.h"

namespace ftune::model {

LossSum causal_lm_loss_sum(const at::Tensor& logits, const at::Tensor& labels) {
  const int64_t V = logits.size(-1);
  at::Tensor shift_logits = logits.slice(1, 0, -1).to(at::kFloat).reshape({-1, V});  // [B*(T-1), V]
  at::Tensor shift_labels = labels.slice(1, 1).reshape({-1});                        // [B*(T-1)]
  at::Tensor sum = at::cross_entropy_loss(shift_logits, shift_labels, {},
                                          at::Reduction::Sum, kIgnoreIndex);
  int64_t count = shift_labels.ne(kIgnoreIndex).sum().item<int64_t>();
  return {sum, count};
}

}  // namespace ftune::model
