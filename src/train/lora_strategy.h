// LoRA through the Strategy seam: prepare() injects the adapters (freezing the base) and then
// hands the model to the wrapped strategy, which sees only the adapters as trainable; every other
// seam (gradient sync, clipping, sums over ranks) is the inner strategy's. So LoRA composes with
// SingleDevice and DDP (which then all-reduces the adapters only) without a second loop.
// Defines LoraStrategy.
#pragma once

#include <cstdint>

#include "lora/lora.h"
#include "train/strategy.h"

namespace ftune::train {

class LoraStrategy : public Strategy {
 public:
  // `inner` must outlive this. Adapters are initialized from `seed` as PEFT initializes them.
  LoraStrategy(Strategy& inner, lora::LoraOptions options, uint64_t seed)
      : inner_(inner), options_(std::move(options)), seed_(seed) {}

  optim::NamedTensors prepare(model::LlamaForCausalLM& m) override {
    lora::apply_lora(m, options_, seed_);
    return inner_.prepare(m);
  }
  std::string name() const override { return inner_.name(); }
  at::Device load_device(at::Device d) const override { return inner_.load_device(d); }
  int rank() const override { return inner_.rank(); }
  int world_size() const override { return inner_.world_size(); }
  DataShard data_shard() const override { return inner_.data_shard(); }
  std::vector<bool> decay_flags() const override { return inner_.decay_flags(); }
  optim::NamedTensors optimizer_state(const optim::AdamW& opt) override {
    return inner_.optimizer_state(opt);
  }
  void load_optimizer_state(optim::AdamW& opt, const std::map<std::string, at::Tensor>& st,
                            const std::string& origin) override {
    inner_.load_optimizer_state(opt, st, origin);
  }
  std::vector<PieceInfo> piece_layout() const override { return inner_.piece_layout(); }
  void pieces_loaded() override { inner_.pieces_loaded(); }
  void for_each_unit_gathered(model::LlamaForCausalLM& m,
                              const std::function<void(int64_t unit)>& fn) override {
    inner_.for_each_unit_gathered(m, fn);
  }
  void before_backward(bool last) override { inner_.before_backward(last); }
  int64_t global_sum(int64_t local) override { return inner_.global_sum(local); }
  double global_sum(double local) override { return inner_.global_sum(local); }
  void after_backward(const optim::NamedTensors& params) override {
    inner_.after_backward(params);
  }
  double clip_and_step(optim::AdamW& opt, double lr, double max_grad_norm) override {
    return inner_.clip_and_step(opt, lr, max_grad_norm);
  }
  bool any_rank(bool local) override { return inner_.any_rank(local); }
  void barrier(const std::string& what, double timeout_s) override {
    inner_.barrier(what, timeout_s);
  }
  void mark_step(int64_t step) override { inner_.mark_step(step); }
  void mark_failed(const std::string& message) override { inner_.mark_failed(message); }
  parallel::CommStats take_comm_stats() override { return inner_.take_comm_stats(); }
  MicroBatchRunner* runner() override { return inner_.runner(); }
  int64_t buffer_bytes() const override { return inner_.buffer_bytes(); }
  int64_t held_param_bytes() const override { return inner_.held_param_bytes(); }
  int64_t take_peak_gathered_bytes() override { return inner_.take_peak_gathered_bytes(); }
  std::string check_replicas() override { return inner_.check_replicas(); }

 private:
  Strategy& inner_;
  lora::LoraOptions options_;
  uint64_t seed_;
};

}  // namespace ftune::train
