// AdamW with decoupled weight decay, as torch.optim.AdamW. Two implementations: fused (default)
// runs ATen's multi-tensor kernel at::_fused_adamw_ once per weight-decay group, as
// torch.optim.AdamW(fused=True) and the HF Trainer's default "adamw_torch_fused" do (~7x faster
// on CPU than a per-tensor loop for 135M params); unfused repeats torch.optim.AdamW(foreach=False)
// op for op (the same ATen calls and scalars in the same order), so updates match it bit for bit.
// Parameters with fewer than 2 dims (norm weights, biases) get no weight decay, as the HF Trainer
// groups them. State (exp_avg, exp_avg_sq, step) is exposed by parameter name for checkpoints.
// cpu_kernel steps CPU fp32 tensors with optim::cpu_adamw_step (bit-identical to the fused kernel).
// Defines AdamWOptions, AdamW.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace ftune::optim {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

struct AdamWOptions {
  double beta1 = 0.9;          // decay of the first-moment average
  double beta2 = 0.999;        // decay of the second-moment average
  double eps = 1e-8;           // added to sqrt(v_hat)
  double weight_decay = 0.0;   // decoupled: p *= 1 - lr * wd, for params with dim >= 2 only
  bool fused = true;           // at::_fused_adamw_ (fused=True); false = foreach=False op for op
  bool cpu_kernel = false;     // CPU fp32 params: step with optim::cpu_adamw_step (for
                               // parallel.offload: optimizer), the others fused; implies fused
};

class AdamW {
 public:
  // `params`: trainable parameters by name (leaf tensors; their .grad() is read by step()).
  // `decay`: which of them get weight decay; empty = those with dim >= 2. (A sharded strategy
  // hands in flat 1-D pieces of 2-D weights, which still decay.)
  AdamW(NamedTensors params, AdamWOptions opts, std::vector<bool> decay = {});

  // One update with learning rate `lr`; parameters without a gradient are skipped (their step
  // count does not advance), as in PyTorch.
  void step(double lr);
  // clip_grad_norm(params, max_grad_norm) then step(lr); returns the norm before clipping (and
  // updates nothing when it is not finite, nor after skip_next_step()). Fused,
  // the clip factor goes into the AdamW kernel (its grad_scale input divides each gradient as it
  // is read) instead of a separate pass over every gradient, and there is no scaling at all when
  // the norm is within max_grad_norm. The clipped gradients (also written back) then differ from
  // clip_grad_norm's by the rounding of g / (1 / c) vs g * c.
  double clip_and_step(double lr, double max_grad_norm);
  // The same with the total norm given: when the parameters here are one rank's shard, the norm
  // is the one of all shards together (computed by the strategy).
  void clip_and_step_with_norm(double lr, double max_grad_norm, const at::Tensor& norm);
  // The next clip_and_step(_with_norm) leaves parameters and state unchanged (a step the
  // training loop drops: a non-finite loss). A non-finite total norm always does the same.
  void skip_next_step() { skip_next_ = true; }
  // Drops every gradient (PyTorch's zero_grad(set_to_none=True)).
  void zero_grad();

  const NamedTensors& params() const { return params_; }
  bool decays(size_t i) const { return decay_[i]; }

  // "<name>.exp_avg", "<name>.exp_avg_sq" (param dtype) and "<name>.step" (int64 scalar) for
  // every parameter.
  NamedTensors state() const;
  // Restores state() output; `origin` names the source in errors (missing key, shape mismatch).
  void load_state(const std::map<std::string, at::Tensor>& state, const std::string& origin);

 private:
  NamedTensors params_;
  AdamWOptions opts_;
  std::vector<bool> decay_;
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;
  std::vector<int64_t> steps_;
  bool skip_next_ = false;

  void step_unfused(double lr);
  void step_fused(double lr, const std::optional<at::Tensor>& grad_scale = std::nullopt);
  // Parameter i by optim::cpu_adamw_step (the caller has checked it fits).
  void step_cpu_kernel(size_t i, double lr, std::optional<float> grad_scale);
  bool uses_fused() const { return opts_.fused || opts_.cpu_kernel; }
};

}  // namespace ftune::optim
