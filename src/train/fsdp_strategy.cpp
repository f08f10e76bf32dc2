// FsdpStrategy: parallel::Fsdp's units built from the model and driven by its UnitHooks; see
// fsdp_strategy.h.
//
// Schedule. Forward: before unit u runs it is gathered (waiting for its prefetch) and unit u+1's
// gather starts; after it, u is freed. The head unit (final norm + lm_head, and the tied
// embedding when embeddings are tied) stays gathered through the loss and its backward.
// Backward: a hook on each decoder layer's output fires when that output's gradient is complete,
// i.e. when the layer above has finished its backward: it frees every other unit, gathers this
// layer (again) and starts the gather of the layer below. The embedding unit is never gathered
// for backward (the embedding's backward reads only the indices). Each unit's gradients are
// reduce-scattered by parallel::Fsdp as soon as they are all accumulated.
#include "train/fsdp_strategy.h"

#include <ATen/core/grad_mode.h>

#include "core/error.h"
#include "lora/lora.h"
#include "model/hf_io.h"
#include "parallel/fsdp.h"
#include "train/group_strategy.h"

namespace ftune::train {
namespace {

class FsdpStrategy : public GroupStrategy, public model::UnitHooks {
 public:
  FsdpStrategy(parallel::ProcessGroup& group, at::Device device, parallel::FsdpOptions options)
      : GroupStrategy(group, device, "fsdp"), options_(options) {}
  ~FsdpStrategy() override {
    if (model_) model_->set_unit_hooks(nullptr);
  }

  optim::NamedTensors prepare(model::LlamaForCausalLM& m) override {
    GroupStrategy::prepare(m);
    const model::LlamaConfig& c = m->config();
    const int64_t n_units = model::unit_count(c);
    head_ = n_units - 1;
    tied_ = c.tie_word_embeddings;
    std::vector<std::vector<parallel::FsdpTensor>> units(n_units);
    for (const auto& p : m->named_parameters()) {
      const at::Tensor& t = p.value();
      units[model::unit_of(p.key(), c)].push_back(
          {p.key(), t, t.requires_grad(), t.requires_grad() && t.dim() >= 2});
    }
    // QLoRA's 4-bit weights: the packed codes and the per-block statistics are sharded (and
    // gathered) as they are, 4 bits a weight; the 16-entry and 256-entry code maps are tiny and
    // stay replicated.
    for (auto& [name, lin] : model::linears(m)) {
      if (!lin->nf4) continue;
      quant::Nf4Tensor& w = *lin->nf4;
      const int64_t u = model::unit_of(name + ".weight", c);
      units[u].push_back({name + ".weight.nf4_packed", w.packed});
      units[u].push_back({name + ".weight.nf4_absmax", w.absmax});
      if (w.double_quant()) units[u].push_back({name + ".weight.nf4_nested_absmax", w.nested_absmax});
    }
    fsdp_ = std::make_unique<parallel::Fsdp>(group_, std::move(units), options_);
    model_ = m.get();
    m->set_unit_hooks(this);
    return fsdp_->pieces();
  }

  std::vector<bool> decay_flags() const override { return fsdp_->decays(); }
  std::vector<PieceInfo> piece_layout() const override {
    std::vector<PieceInfo> out;
    for (auto& s : fsdp_->layout()) out.push_back({s.name, s.shape, s.offset});
    return out;
  }

  // Forward.
  void before_unit(int64_t u) override {
    if (u == 0) {
      // A new forward: the previous one's leftovers (an evaluation's head, a micro-batch's
      // last gathered layer) go, and its gradients are reduce-scattered.
      if (backward_open_) finish_backward();
      for (int64_t v = 1; v < fsdp_->unit_count(); ++v) fsdp_->reshard(v);
    }
    fsdp_->gather(u);
    if (u == head_ && tied_) fsdp_->gather(0);
    if (u + 1 <= head_) fsdp_->prefetch(u + 1);
  }
  at::Tensor after_unit(int64_t u, const at::Tensor& out) override {
    fsdp_->reshard(u);
    if (u == 0 || !at::GradMode::is_enabled() || !out.requires_grad()) return out;
    backward_open_ = true;
    at::Tensor hooked = out;
    hooked.register_hook([this, u](const at::Tensor& grad) {
      before_backward_of(u);
      return grad;
    });
    return hooked;
  }

  void after_backward(const optim::NamedTensors& /*pieces*/) override { finish_backward(); }
  double clip_and_step(optim::AdamW& opt, double lr, double max_grad_norm) override {
    const at::Tensor norm = fsdp_->global_grad_norm();
    opt.clip_and_step_with_norm(lr, max_grad_norm, norm);
    return norm.item<double>();
  }

  void for_each_unit_gathered(model::LlamaForCausalLM& m,
                              const std::function<void(int64_t unit)>& fn) override {
    if (backward_open_) finish_backward();
    // The trained tensors are exported in fp32, the master pieces' values (as one process holds
    // them under bf16 autocast), not rounded to the bf16 they compute in.
    fsdp_->set_trainable_dtype(at::kFloat);
    // A LoRA export reads the adapters alone: the frozen base stays sharded.
    const bool adapters_only = lora::has_lora(m);
    for (int64_t u = 0; u < fsdp_->unit_count(); ++u) {
      if (adapters_only) {
        fsdp_->gather_trainable(u);
      } else {
        fsdp_->gather(u);
      }
      fn(u);
      fsdp_->reshard(u);
    }
    fsdp_->set_trainable_dtype(options_.param_dtype);
  }

  int64_t held_param_bytes() const override { return fsdp_->shard_bytes(); }
  int64_t take_peak_gathered_bytes() override { return fsdp_->take_peak_gathered_bytes(); }

  std::string check_replicas() override {
    return "shards: each of the " + std::to_string(group_.size()) +
           " ranks holds 1/" + std::to_string(group_.size()) +
           " of every parameter (fsdp keeps no replicas to compare)";
  }

 private:
  void before_backward_of(int64_t u) {
    for (int64_t v = 0; v < fsdp_->unit_count(); ++v) {
      if (v != u && v != u - 1) fsdp_->reshard(v);
    }
    fsdp_->gather(u);
    if (u - 1 >= 1) fsdp_->prefetch(u - 1);
  }
  void finish_backward() {
    fsdp_->finish_backward();
    backward_open_ = false;
  }

  parallel::FsdpOptions options_;
  std::unique_ptr<parallel::Fsdp> fsdp_;
  model::LlamaForCausalLMImpl* model_ = nullptr;
  int64_t head_ = 0;
  bool tied_ = false;
  bool backward_open_ = false;
};

}  // namespace

std::unique_ptr<Strategy> make_fsdp_strategy(parallel::ProcessGroup& group, at::Device device,
                                             const config::TrainConfig& cfg) {
  parallel::FsdpOptions o;
  // Mixed precision: full fine-tuning with model.dtype bf16 gathers and computes in bf16 over
  // fp32 master pieces (LoRA adapters stay fp32; a LoRA base is already stored in bf16).
  if (cfg.model.dtype == "bf16" && !cfg.lora) o.param_dtype = at::kBFloat16;
  o.offload = cfg.parallel.offload == "optimizer";
  return std::make_unique<FsdpStrategy>(group, device, o);
}

}  // namespace ftune::train
