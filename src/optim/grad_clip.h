// Total-gradient-norm clipping as torch.nn.utils.clip_grad_norm_ (L2, foreach path): per-tensor
// norms, the norm of their stack, then every gradient times min(1, max_norm / (norm + 1e-6)).
// The same ATen ops in the same order keep fp32 results identical to PyTorch's.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace ftune::optim {

// L2 norm of all defined gradients of `params`, as a float32 scalar tensor (0 when none).
at::Tensor grad_norm(const std::vector<at::Tensor>& params);

// Scales the gradients so their total norm is at most max_norm (given the precomputed
// total_norm); max_norm <= 0 leaves them alone.
void clip_grads_with_norm(const std::vector<at::Tensor>& params, double max_norm,
                          const at::Tensor& total_norm);

// grad_norm + clip_grads_with_norm; returns the norm before clipping, as a double.
double clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm);

}  // namespace ftune::optim
