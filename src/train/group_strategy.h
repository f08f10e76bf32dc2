// What every data-parallel strategy shares (rank, sharded rows, global sums, barriers,
// accounting, the replica check) over one c10d group; DDP, ZeRO and FSDP derive from it.
// Defines GroupStrategy.
#pragma once

#include <chrono>
#include <cstdio>
#include <optional>
#include <string>

#include "parallel/ddp.h"
#include "parallel/process_group.h"
#include "train/strategy.h"

namespace ftune::train {

class GroupStrategy : public Strategy {
 public:
  GroupStrategy(parallel::ProcessGroup& group, at::Device device, std::string name)
      : group_(group), device_(device), name_(std::move(name)) {}

  int rank() const override { return group_.rank(); }
  int world_size() const override { return group_.size(); }
  DataShard data_shard() const override { return {group_.rank(), group_.size()}; }
  optim::NamedTensors prepare(model::LlamaForCausalLM& m) override {
    trained_ = Strategy::prepare(m);
    return trained_;
  }
  // Over the ranks that read different rows (sum_group_).
  int64_t global_sum(int64_t local) override {
    if (!sum_group_) return local;
    at::Tensor t = at::full({1}, local, at::TensorOptions(at::kLong).device(device_));
    sum_group_->all_reduce(t, "all-reduce of the batch's target count");
    return t.item<int64_t>();
  }
  double global_sum(double local) override {
    if (!sum_group_) return local;
    at::Tensor t = at::full({1}, local, at::TensorOptions(at::kDouble).device(device_));
    sum_group_->all_reduce(t, "all-reduce of the loss sum");
    return t.item<double>();
  }
  bool any_rank(bool local) override {  // over the whole world, whatever the strategy's groups
    at::Tensor t = at::full({1}, local ? 1 : 0, at::TensorOptions(at::kLong).device(device_));
    group_.all_reduce(t, "all-reduce of the stop flag");
    return t.item<int64_t>() > 0;
  }
  void barrier(const std::string& what, double timeout_s) override {
    std::optional<std::chrono::milliseconds> t;
    if (timeout_s > 0) t = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
    group_.barrier(what, t);
  }
  void mark_step(int64_t step) override { group_.mark_progress(step); }
  void mark_failed(const std::string& message) override { group_.mark_failed(message); }
  parallel::CommStats take_comm_stats() override { return group_.take_stats(); }
  std::string check_replicas() override {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "replicas: the trained parameters of all %d ranks are "
                  "bit-identical (hash %016llx)", group_.size(),
                  static_cast<unsigned long long>(parallel::check_replicas(group_, trained_)));
    return buf;
  }
  std::string name() const override { return name_; }

 protected:
  parallel::ProcessGroup& group_;
  // Where global_sum sums: every rank (data parallelism), or a pipeline stage's replicas (null
  // when it has none: the stages of one pipeline read the same rows).
  parallel::ProcessGroup* sum_group_ = &group_;
  at::Device device_;
  std::string name_;
  optim::NamedTensors trained_;  // the model's trainable parameters
};

}  // namespace ftune::train
