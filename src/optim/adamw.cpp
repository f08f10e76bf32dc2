// AdamW: fused (at::_fused_adamw_, torch fused=True) or mirroring torch/optim/adam.py
// _single_tensor_adam (decoupled_weight_decay=True, amsgrad=False, maximize=False,
// capturable=False), or optim::cpu_adamw_step per CPU fp32 tensor; see adamw.h.
#include "optim/adamw.h"

#include <ATen/core/grad_mode.h>

#include <cmath>
#include <map>
#include <utility>
#include <tuple>

#include "core/error.h"
#include "optim/cpu_adam.h"
#include "optim/grad_clip.h"

namespace ftune::optim {

namespace {

// What cpu_adamw_step can update in place: CPU fp32 with a dense gradient of the same layout
// and state.
bool cpu_kernel_fits(const at::Tensor& p, const at::Tensor& m, const at::Tensor& v) {
  for (const at::Tensor* t : {&p, &p.grad(), &m, &v}) {
    if (!t->device().is_cpu() || t->scalar_type() != at::kFloat || t->layout() != at::kStrided ||
        !t->is_contiguous() || t->sizes() != p.sizes()) {
      return false;
    }
  }
  return true;
}

}  // namespace

AdamW::AdamW(NamedTensors params, AdamWOptions opts, std::vector<bool> decay)
    : params_(std::move(params)), opts_(opts), decay_(std::move(decay)) {
  FTUNE_CHECK(decay_.empty() || decay_.size() == params_.size(), "AdamW: ", decay_.size(),
              " decay flags for ", params_.size(), " parameters");
  const bool by_dim = decay_.empty();
  for (const auto& [name, p] : params_) {
    if (by_dim) decay_.push_back(p.dim() >= 2);
    exp_avg_.push_back(at::zeros_like(p, at::MemoryFormat::Preserve));
    exp_avg_sq_.push_back(at::zeros_like(p, at::MemoryFormat::Preserve));
    steps_.push_back(0);
  }
}

void AdamW::step(double lr) {
  at::NoGradGuard no_grad;
  if (uses_fused()) {
    step_fused(lr);
  } else {
    step_unfused(lr);
  }
}

double AdamW::clip_and_step(double lr, double max_grad_norm) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> ps;
  ps.reserve(params_.size());
  for (const auto& p : params_) ps.push_back(p.second);
  const at::Tensor norm = grad_norm(ps);
  clip_and_step_with_norm(lr, max_grad_norm, norm);
  return norm.item<double>();
}

void AdamW::clip_and_step_with_norm(double lr, double max_grad_norm, const at::Tensor& norm) {
  at::NoGradGuard no_grad;
  // A dropped step: no parameter, moment or step count moves.
  if (std::exchange(skip_next_, false) || !std::isfinite(norm.item<double>())) return;
  if (!uses_fused() || max_grad_norm <= 0) {
    std::vector<at::Tensor> ps;
    ps.reserve(params_.size());
    for (const auto& p : params_) ps.push_back(p.second);
    clip_grads_with_norm(ps, max_grad_norm, norm);
    step(lr);
    return;
  }
  // The factor as clip_grads_with_norm computes it (fp32); < 1 only when clipping is active.
  const at::Tensor coef = at::clamp((norm + 1e-6).reciprocal() * max_grad_norm, std::nullopt, 1.0);
  if (coef.item<float>() < 1.0f) {
    step_fused(lr, coef.reciprocal());
  } else {
    step_fused(lr);
  }
}

void AdamW::step_fused(double lr, const std::optional<at::Tensor>& grad_scale) {
  // One kernel call per (weight decay, device, dtype) group, like torch's _fused_adamw grouping.
  // The kernel reads each step count from a float32 scalar tensor that the caller has advanced.
  // With cpu_kernel, the tensors cpu_adamw_step can update skip the groups (same arithmetic).
  struct Group {
    std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
  };
  std::map<std::tuple<bool, std::string, at::ScalarType>, Group> groups;
  std::optional<float> scale;  // the kernel's copy of grad_scale, read once
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& param = params_[i].second;
    if (!param.grad().defined()) continue;
    if (opts_.cpu_kernel && cpu_kernel_fits(param, exp_avg_[i], exp_avg_sq_[i])) {
      if (grad_scale && !scale) scale = grad_scale->item<float>();
      step_cpu_kernel(i, lr, scale);
      continue;
    }
    Group& g = groups[{decay_[i], param.device().str(), param.scalar_type()}];
    g.params.push_back(param);
    g.grads.push_back(param.grad());
    g.exp_avgs.push_back(exp_avg_[i]);
    g.exp_avg_sqs.push_back(exp_avg_sq_[i]);
    g.steps.push_back(at::scalar_tensor(static_cast<double>(++steps_[i]),
                                        at::TensorOptions().dtype(at::kFloat).device(param.device())));
  }
  for (auto& [key, g] : groups) {
    const double wd = std::get<0>(key) ? opts_.weight_decay : 0.0;
    at::_fused_adamw_(g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, /*max_exp_avg_sqs=*/{}, g.steps,
                      lr, opts_.beta1, opts_.beta2, wd, opts_.eps, /*amsgrad=*/false,
                      /*maximize=*/false,
                      grad_scale ? std::optional<at::Tensor>(grad_scale->to(g.params[0].device()))
                                 : std::nullopt);
  }
}

void AdamW::step_cpu_kernel(size_t i, double lr, std::optional<float> grad_scale) {
  at::Tensor param = params_[i].second;
  at::Tensor grad = param.grad();
  CpuAdamStep s;
  s.lr = lr;
  s.beta1 = opts_.beta1;
  s.beta2 = opts_.beta2;
  s.eps = opts_.eps;
  s.weight_decay = decay_[i] ? opts_.weight_decay : 0.0;
  s.step = ++steps_[i];
  s.grad_scale = grad_scale;
  cpu_adamw_step(param.data_ptr<float>(), grad.data_ptr<float>(), exp_avg_[i].data_ptr<float>(),
                 exp_avg_sq_[i].data_ptr<float>(), param.numel(), s);
}

void AdamW::step_unfused(double lr) {
  const double beta1 = opts_.beta1, beta2 = opts_.beta2;
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor param = params_[i].second;
    const at::Tensor& grad = param.grad();
    if (!grad.defined()) continue;
    at::Tensor& exp_avg = exp_avg_[i];
    at::Tensor& exp_avg_sq = exp_avg_sq_[i];
    // PyTorch keeps step in a float32 tensor and reads it back as a Python float.
    const double step = static_cast<double>(static_cast<float>(++steps_[i]));
    const double wd = decay_[i] ? opts_.weight_decay : 0.0;
    if (wd != 0.0) param.mul_(1 - lr * wd);
    exp_avg.lerp_(grad, 1 - beta1);
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
    const double bias_correction1 = 1 - std::pow(beta1, step);
    const double bias_correction2 = 1 - std::pow(beta2, step);
    const double step_size = lr / bias_correction1;
    const double bias_correction2_sqrt = std::pow(bias_correction2, 0.5);
    at::Tensor denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(opts_.eps);
    param.addcdiv_(exp_avg, denom, -step_size);
  }
}

void AdamW::zero_grad() {
  for (auto& [name, p] : params_) p.mutable_grad().reset();
}

NamedTensors AdamW::state() const {
  NamedTensors out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& name = params_[i].first;
    out.emplace_back(name + ".exp_avg", exp_avg_[i]);
    out.emplace_back(name + ".exp_avg_sq", exp_avg_sq_[i]);
    out.emplace_back(name + ".step", at::scalar_tensor(steps_[i], at::kLong));
  }
  return out;
}

void AdamW::load_state(const std::map<std::string, at::Tensor>& state, const std::string& origin) {
  at::NoGradGuard no_grad;
  auto get = [&](const std::string& key) -> const at::Tensor& {
    auto it = state.find(key);
    FTUNE_CHECK(it != state.end(), origin, ": ", key, ": missing optimizer state");
    return it->second;
  };
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& name = params_[i].first;
    for (at::Tensor* t : {&exp_avg_[i], &exp_avg_sq_[i]}) {
      const std::string key = name + (t == &exp_avg_[i] ? ".exp_avg" : ".exp_avg_sq");
      const at::Tensor& src = get(key);
      FTUNE_CHECK(src.sizes() == t->sizes(), origin, ": ", key, ": shape ", src.sizes(),
                  " does not match the parameter's ", t->sizes());
      t->copy_(src);
    }
    const at::Tensor& s = get(name + ".step");
    FTUNE_CHECK(s.numel() == 1, origin, ": ", name, ".step: expected a scalar");
    steps_[i] = s.to(at::kLong).item<int64_t>();
  }
  FTUNE_CHECK(state.size() == 3 * params_.size(), origin, ": holds ", state.size(),
              " optimizer tensors, expected ", 3 * params_.size(), " (a different model?)");
}

}  // namespace ftune::optim
