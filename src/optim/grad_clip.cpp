// Gradient-norm clipping mirroring torch/nn/utils/clip_grad.py; see grad_clip.h.
#include "optim/grad_clip.h"

#include <ATen/core/grad_mode.h>

namespace ftune::optim {
namespace {
std::vector<at::Tensor> defined_grads(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> grads;
  for (const auto& p : params) {
    if (p.grad().defined()) grads.push_back(p.grad());
  }
  return grads;
}
}  // namespace

at::Tensor grad_norm(const std::vector<at::Tensor>& params) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads = defined_grads(params);
  if (grads.empty()) return at::scalar_tensor(0.0, at::kFloat);
  // PyTorch groups by (device, dtype) and keeps group order; ftune's params share one of each
  // unless a strategy mixes them, in which case norms are moved to the first device as there.
  std::vector<at::Tensor> norms = at::_foreach_norm(grads, 2);
  for (auto& n : norms) n = n.to(grads[0].device());
  return at::linalg_vector_norm(at::stack(norms), 2);
}

void clip_grads_with_norm(const std::vector<at::Tensor>& params, double max_norm,
                          const at::Tensor& total_norm) {
  if (max_norm <= 0) return;
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads = defined_grads(params);
  if (grads.empty()) return;
  at::Tensor clip_coef = (total_norm + 1e-6).reciprocal() * max_norm;  // Python max_norm / t
  at::Tensor clamped = at::clamp(clip_coef, std::nullopt, 1.0);
  at::_foreach_mul_(grads, clamped.to(grads[0].device()));
}

double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm) {
  at::Tensor norm = grad_norm(params);
  clip_grads_with_norm(params, max_norm, norm);
  return norm.item<double>();
}

}  // namespace ftune::optim
