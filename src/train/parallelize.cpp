// The run's strategy from config + environment; see parallelize.h. DdpStrategy adapts
// parallel::Ddp (buckets, hooks) and the process group to the loop's seams.
#include "train/parallelize.h"

#include <chrono>
#include <cstdio>

#include "core/error.h"
#include "parallel/ddp.h"

namespace ftune::train {
namespace {

class DdpStrategy : public Strategy {
 public:
  DdpStrategy(parallel::ProcessGroup& group, parallel::DdpOptions options, at::Device device)
      : group_(group), options_(options), device_(device) {}

  int rank() const override { return group_.rank(); }
  int world_size() const override { return group_.size(); }
  DataShard data_shard() const override { return {group_.rank(), group_.size()}; }

  optim::NamedTensors prepare(model::LlamaForCausalLM& m) override {
    optim::NamedTensors params = Strategy::prepare(m);
    ddp_ = parallel::apply_ddp(group_, params, options_);
    return params;
  }
  void before_backward(bool last) override { ddp_->set_sync(last); }
  int64_t global_sum(int64_t local) override {
    at::Tensor t = at::full({1}, local, at::TensorOptions(at::kLong).device(device_));
    group_.all_reduce(t, "all-reduce of the batch's target count");
    return t.item<int64_t>();
  }
  double global_sum(double local) override {
    at::Tensor t = at::full({1}, local, at::TensorOptions(at::kDouble).device(device_));
    group_.all_reduce(t, "all-reduce of the loss sum");
    return t.item<double>();
  }
  void after_backward(const optim::NamedTensors& /*params*/) override { ddp_->finish(); }
  void barrier(const std::string& what, double timeout_s) override {
    std::optional<std::chrono::milliseconds> t;
    if (timeout_s > 0) t = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
    group_.barrier(what, t);
  }
  void mark_step(int64_t step) override { group_.mark_progress(step); }
  void mark_failed(const std::string& message) override { group_.mark_failed(message); }
  parallel::CommStats take_comm_stats() override { return group_.take_stats(); }
  std::string check_replicas() override {
    char buf[128];
    std::snprintf(buf, sizeof(buf), "replicas: the trained parameters of all %d ranks are "
                  "bit-identical (hash %016llx)", group_.size(),
                  static_cast<unsigned long long>(ddp_->check_replicas()));
    return buf;
  }

 private:
  parallel::ProcessGroup& group_;
  parallel::DdpOptions options_;
  at::Device device_;
  std::unique_ptr<parallel::Ddp> ddp_;
};

}  // namespace

ParallelRun parallelize(const config::TrainConfig& cfg, at::Device configured) {
  const auto& p = cfg.parallel;
  parallel::DistEnv env = parallel::read_dist_env();
  ParallelRun run;
  run.device = configured;
  const bool ddp = p.strategy == "ddp" || (p.strategy == "auto" && env.distributed());
  if (!ddp) {
    FTUNE_CHECK(!env.distributed(), cfg.where("parallel.strategy"), ": parallel.strategy: none, "
                "but this process is rank ", env.rank, " of ", env.world_size, " (", env.source,
                "): every rank would train alone and write the same output_dir; use ddp (or auto)");
    run.strategy = std::make_unique<SingleDevice>();
    return run;
  }
  if (env.source.empty()) {
    // DDP in a process nobody launched: a group of one on this host (its collectives still run,
    // e.g. to check NCCL on one GPU), like `torchrun --nproc-per-node 1`.
    env.master_addr = "127.0.0.1";
    env.master_port = 0;
  }
  // One GPU per local rank: "cuda" (or "cuda:0", the default index) becomes cuda:LOCAL_RANK.
  if (configured.is_cuda() && (!configured.has_index() || configured.index() == 0)) {
    run.device = at::Device(at::kCUDA, static_cast<at::DeviceIndex>(env.local_rank));
  }
  parallel::GroupOptions go;
  go.timeout = std::chrono::milliseconds(static_cast<int64_t>(p.timeout_s * 1000));
  go.device = run.device;
  run.group = parallel::ProcessGroup::create(env, go);
  parallel::DdpOptions dopt;
  dopt.bucket_bytes = static_cast<int64_t>(p.bucket_mb * 1024 * 1024);
  run.strategy = std::make_unique<DdpStrategy>(*run.group, dopt, run.device);
  return run;
}

}  // namespace ftune::train
