// Parameter and memory accounting of a run; see report.h.
#include "train/report.h"

#include <set>

#include <cstdio>

#include "model/hf_io.h"

namespace ftune::train {
namespace {

std::string mb(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f MB", static_cast<double>(bytes) / 1e6);
  return buf;
}

}  // namespace

BaseSize frozen_base_size(model::LlamaForCausalLM& m) {
  BaseSize b;
  for (const auto& p : m->parameters()) {
    if (p.requires_grad()) continue;
    b.params += p.numel();
    b.bytes += static_cast<int64_t>(p.nbytes());
  }
  // 4-bit linears hold packed data and statistics outside the parameters.
  const model::BaseBytes nf4 = model::base_bytes(m);
  b.params += nf4.nf4_params;
  b.bytes += nf4.nf4_bytes;
  return b;
}

ParamReport param_report(model::LlamaForCausalLM& m, const optim::AdamW& opt) {
  ParamReport r;
  // Trainable: the model's parameters that require grad (a sharded optimizer holds only pieces).
  for (const auto& p : m->parameters()) {
    if (!p.requires_grad()) continue;
    r.trainable += p.numel();
    r.trainable_bytes += static_cast<int64_t>(p.nbytes());
  }
  const BaseSize base = frozen_base_size(m);
  r.total = r.trainable + base.params;
  r.base_bytes = base.bytes;
  for (const auto& [name, t] : opt.state()) r.optimizer_bytes += static_cast<int64_t>(t.nbytes());
  return r;
}

int64_t gradient_bytes(model::LlamaForCausalLM& m, const optim::AdamW& opt) {
  std::set<const void*> seen;
  int64_t bytes = 0;
  auto add = [&](const at::Tensor& p) {
    const at::Tensor& g = p.grad();
    if (!g.defined() || !seen.insert(g.storage().data()).second) return;
    bytes += static_cast<int64_t>(g.storage().nbytes());
  };
  for (const auto& p : m->parameters()) add(p);
  for (const auto& [name, p] : opt.params()) add(p);
  return bytes;
}

std::string format_param_report(const ParamReport& r) {
  char pct[32];
  std::snprintf(pct, sizeof(pct), "%.2f%%",
                r.total > 0 ? 100.0 * static_cast<double>(r.trainable) / r.total : 0.0);
  return "parameters: " + std::to_string(r.trainable) + " trainable of " +
         std::to_string(r.total) + " (" + pct + "); memory: frozen base " + mb(r.base_bytes) +
         ", trainable " + mb(r.trainable_bytes) + ", optimizer state " + mb(r.optimizer_bytes);
}

}  // namespace ftune::train
