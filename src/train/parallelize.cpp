// The run's strategy from config + environment; see parallelize.h. DdpStrategy adds
// parallel::Ddp's buckets and hooks, ZeroStrategy parallel::ZeroShard's sharded optimizer step;
// FsdpStrategy (fsdp_strategy.h) parallel::Fsdp's sharded parameters; model_parallel
// (model_parallel.h) places layer blocks on the devices of one process; pipeline
// (pipeline_strategy.h) puts them on ranks.
#include "train/parallelize.h"

#include "core/error.h"
#include "model/device.h"
#include "parallel/ddp.h"
#include "parallel/zero.h"
#include "train/fsdp_strategy.h"
#include "train/group_strategy.h"
#include "train/model_parallel.h"
#include "train/pipeline_strategy.h"

namespace ftune::train {
namespace {

class DdpStrategy : public GroupStrategy {
 public:
  DdpStrategy(parallel::ProcessGroup& group, at::Device device, parallel::DdpOptions options)
      : GroupStrategy(group, device, "ddp"), options_(options) {}

  optim::NamedTensors prepare(model::LlamaForCausalLM& m) override {
    optim::NamedTensors params = GroupStrategy::prepare(m);
    ddp_ = parallel::apply_ddp(group_, params, options_);
    return params;
  }
  void before_backward(bool last) override { ddp_->set_sync(last); }
  void after_backward(const optim::NamedTensors& /*params*/) override { ddp_->finish(); }
  int64_t buffer_bytes() const override { return ddp_ ? ddp_->gradient_bytes() : 0; }

 private:
  parallel::DdpOptions options_;
  std::unique_ptr<parallel::Ddp> ddp_;
};

class ZeroStrategy : public GroupStrategy {
 public:
  ZeroStrategy(parallel::ProcessGroup& group, at::Device device, int stage, bool offload)
      : GroupStrategy(group, device, "zero" + std::to_string(stage)), stage_(stage),
        offload_(offload) {}

  optim::NamedTensors prepare(model::LlamaForCausalLM& m) override {
    shard_ = std::make_unique<parallel::ZeroShard>(group_, GroupStrategy::prepare(m), stage_,
                                                      offload_);
    return shard_->pieces();
  }
  std::vector<bool> decay_flags() const override { return shard_->decays(); }
  void after_backward(const optim::NamedTensors& /*pieces*/) override {
    shard_->reduce_gradients();
  }
  double clip_and_step(optim::AdamW& opt, double lr, double max_grad_norm) override {
    const at::Tensor norm = shard_->global_grad_norm();
    opt.clip_and_step_with_norm(lr, max_grad_norm, norm);
    shard_->gather_parameters();
    return norm.item<double>();
  }
  std::vector<PieceInfo> piece_layout() const override {
    std::vector<PieceInfo> out;
    for (size_t k = 0; k < shard_->pieces().size(); ++k) {
      out.push_back({shard_->pieces()[k].first, shard_->piece_param(k).sizes().vec(),
                     shard_->piece_offset(k)});
    }
    return out;
  }
  void pieces_loaded() override { shard_->gather_parameters(); }

 private:
  int stage_;
  bool offload_;
  std::unique_ptr<parallel::ZeroShard> shard_;
};

}  // namespace

ParallelRun parallelize(const config::TrainConfig& cfg, at::Device configured) {
  const auto& p = cfg.parallel;
  parallel::DistEnv env = parallel::read_dist_env();
  ParallelRun run;
  run.device = configured;
  const std::string strategy =
      p.strategy == "auto" ? (env.distributed() ? "ddp" : "none") : p.strategy;
  if (strategy == "none") {
    FTUNE_CHECK(!env.distributed(), cfg.where("parallel.strategy"), ": parallel.strategy: none, "
                "but this process is rank ", env.rank, " of ", env.world_size, " (", env.source,
                "): every rank would train alone and write the same output_dir; use ddp (or auto)");
    run.strategy = std::make_unique<SingleDevice>();
    return run;
  }
  if (strategy == "model_parallel") {
    FTUNE_CHECK(!env.distributed(), cfg.where("parallel.strategy"), ": parallel.strategy: "
                "model_parallel runs in one process (its stages are the devices of "
                "parallel.devices), but this process is rank ", env.rank, " of ", env.world_size,
                " (", env.source, ")");
    std::vector<at::Device> devices;
    for (const std::string& d : p.devices) {
      devices.push_back(model::parse_device(d, cfg.where("parallel.devices") +
                                                   ": parallel.devices"));
    }
    run.device = devices.front();  // the embedding's: where the batches go
    run.strategy = make_model_parallel_strategy(std::move(devices), cfg);
    return run;
  }
  if (env.source.empty()) {
    // A data-parallel strategy in a process nobody launched: a group of one on this host (its
    // collectives still run, e.g. to check NCCL on one GPU), like `torchrun --nproc-per-node 1`.
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
  if (strategy == "ddp") {
    parallel::DdpOptions dopt;
    dopt.bucket_bytes = static_cast<int64_t>(p.bucket_mb * 1024 * 1024);
    run.strategy = std::make_unique<DdpStrategy>(*run.group, run.device, dopt);
  } else if (strategy == "pipeline") {
    run.strategy = make_pipeline_strategy(*run.group, run.device, cfg);
  } else if (strategy == "fsdp" || strategy == "zero3") {
    run.strategy = make_fsdp_strategy(*run.group, run.device, cfg);
  } else {
    run.strategy = std::make_unique<ZeroStrategy>(*run.group, run.device,
                                                  strategy == "zero1" ? 1 : 2,
                                                  p.offload == "optimizer");
  }
  return run;
}

}  // namespace ftune::train
