// Pipeline parallelism as a Strategy; see pipeline_strategy.h.
#include "train/pipeline_strategy.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <sstream>

#include "core/error.h"
#include "core/fs.h"
#include "lora/lora.h"
#include "model/autocast.h"
#include "model/hf_io.h"
#include "model/loss.h"
#include "parallel/ddp.h"
#include "parallel/pipeline.h"
#include "parallel/storage.h"
#include "train/group_strategy.h"
#include "train/metrics.h"
#include "train/model_parallel.h"

namespace ftune::train {
namespace {

constexpr char kEmbedding[] = "model.embed_tokens.weight";

class PipelineStrategy : public GroupStrategy, public MicroBatchRunner {
 public:
  PipelineStrategy(parallel::ProcessGroup& world, at::Device device,
                   const config::TrainConfig& cfg)
      : GroupStrategy(world, device, "pipeline"), pp_size_(cfg.parallel.pp),
        schedule_(parallel::parse_pipe_schedule(cfg.parallel.schedule,
                                                cfg.where("parallel.schedule") +
                                                    ": parallel.schedule")),
        micro_batches_(cfg.parallel.micro_batches), split_(cfg.parallel.split),
        split_where_(cfg.where("parallel.split") + ": parallel.split"),
        pp_where_(cfg.where("parallel.pp") + ": parallel.pp"),
        output_dir_(cfg.training.output_dir) {
    const int world_size = world.size();
    FTUNE_CHECK(world_size % pp_size_ == 0, pp_where_, ": ", pp_size_, " stages do not divide the ",
                world_size, " ranks of this run (WORLD_SIZE must be parallel.pp x the data-parallel"
                " replicas)");
    dp_size_ = world_size / static_cast<int>(pp_size_);
    stage_index_ = world.rank() / dp_size_;
    replica_ = world.rank() % dp_size_;
    ddp_options_.bucket_bytes = static_cast<int64_t>(cfg.parallel.bucket_mb * 1024 * 1024);
    // Every rank creates its replica group, then its pipeline's: the same order everywhere.
    if (dp_size_ > 1) {
      std::vector<int> ranks;
      for (int d = 0; d < dp_size_; ++d) ranks.push_back(stage_index_ * dp_size_ + d);
      dp_group_ = world.subgroup(ranks, "stage " + std::to_string(stage_index_) +
                                            " data-parallel");
      std::vector<int> pipe;
      for (int s = 0; s < pp_size_; ++s) pipe.push_back(s * dp_size_ + replica_);
      pp_owned_ = world.subgroup(pipe, "pipeline " + std::to_string(replica_));
      pp_ = pp_owned_.get();
    } else {
      pp_ = &world;
    }
    // Every rank reads the rows of its replica: the sums go over the replicas only.
    sum_group_ = dp_group_.get();
  }
  ~PipelineStrategy() override {
    ddp_.reset();  // its hooks and its group go before the groups
    tie_group_.reset();
    pp_owned_.reset();
    dp_group_.reset();
  }

  DataShard data_shard() const override { return {replica_, dp_size_}; }
  MicroBatchRunner* runner() override { return this; }

  optim::NamedTensors prepare(model::LlamaForCausalLM& m) override {
    const auto& c = m->config();
    const int64_t layers = c.num_hidden_layers;
    split_ = stage_split(m, pp_size_, split_, split_where_, pp_where_);
    first_unit_ = is_first() ? 0 : split_[stage_index_] + 1;
    end_unit_ = is_last() ? layers + 2 : split_[stage_index_ + 1] + 1;
    tied_ = !m->lm_head;
    model_ = &m;

    // The layers of the other stages give their memory back; their shapes stay (the export's
    // headers list every tensor).
    at::NoGradGuard no_grad;
    optim::NamedTensors trained;
    for (const auto& p : m->named_parameters()) {
      const std::string& name = p.key();
      const bool keep = owns(model::unit_of(name, c)) || (tied_ && is_last() && name == kEmbedding);
      if (!keep) {
        if (!parallel::owns_storage(p.value())) p.value().set_data(p.value().clone());
        parallel::free_storage(p.value());
        continue;
      }
      if (p.value().requires_grad()) trained.emplace_back(name, p.value());
    }
    for (const auto& [name, lin] : model::linears(m)) {
      if (lin->nf4 && !owns(model::unit_of(name + ".weight", c))) lin->nf4.reset();
    }
    const at::Tensor& embedding = m->model->embed_tokens->weight;
    tie_trained_ = tied_ && embedding.requires_grad() && pp_size_ > 1;
    if (tie_trained_ && pp_size_ > 2 && (is_first() || is_last())) {
      tie_group_ = group_.subgroup({replica_, (static_cast<int>(pp_size_) - 1) * dp_size_ +
                                                  replica_},
                                   "tied embedding " + std::to_string(replica_));
    }
    trained_ = trained;
    if (dp_group_) ddp_ = parallel::apply_ddp(*dp_group_, trained, ddp_options_);
    stage_ = std::make_unique<parallel::PipelineStage>(*pp_, schedule_, embedding.scalar_type(),
                                                       device_);
    hidden_ = c.hidden_size;
    if (is_main()) {
      std::ostringstream os;
      os << "pipeline: " << pp_size_ << " stages x " << dp_size_ << " data-parallel, schedule "
         << parallel::pipe_schedule_name(schedule_) << ";";
      for (int64_t k = 0; k < pp_size_; ++k) {
        os << (k ? "," : "") << " stage " << k << " layers " << split_[k] << "-"
           << split_[k + 1] - 1;
      }
      std::fprintf(stderr, "%s (embedding on stage 0, head on stage %lld)\n", os.str().c_str(),
                   static_cast<long long>(pp_size_ - 1));
    }
    return trained;
  }

  void after_backward(const optim::NamedTensors& /*params*/) override {
    if (ddp_) ddp_->finish();
    if (!tie_trained_ || !(is_first() || is_last())) return;
    // The embedding's gradient from its lookup (first stage) plus the head's (last stage).
    at::Tensor w = model_ ? (*model_)->model->embed_tokens->weight : at::Tensor();
    if (!w.grad().defined()) w.mutable_grad() = at::zeros_like(w);
    parallel::ProcessGroup& g = tie_group_ ? *tie_group_ : *pp_;
    g.all_reduce(w.grad(), "all-reduce of the tied embedding's gradient");
  }

  double clip_and_step(optim::AdamW& opt, double lr, double max_grad_norm) override {
    // The norm over the stages: each counts its own parameters, a tied embedding once (on the
    // first stage).
    optim::NamedTensors counted;
    for (const auto& [name, p] : opt.params()) {
      if (!(tie_trained_ && is_last() && name == kEmbedding)) counted.emplace_back(name, p);
    }
    const at::Tensor norm = parallel::global_grad_norm(*pp_, counted);
    opt.clip_and_step_with_norm(lr, max_grad_norm, norm);
    return norm.item<double>();
  }

  std::vector<PieceInfo> piece_layout() const override {
    std::vector<PieceInfo> out;
    for (const auto& [name, p] : trained_) {
      const bool replica = replica_ > 0 || (tie_trained_ && is_last() && name == kEmbedding);
      out.push_back({name, p.sizes().vec(), 0, replica});
    }
    return out;
  }

  void for_each_unit_gathered(model::LlamaForCausalLM& m,
                              const std::function<void(int64_t unit)>& fn) override {
    const auto& c = m->config();
    // Replica 0's pipeline streams every unit to rank 0 (its stage 0), which writes.
    const bool adapters_only = lora::has_lora(m);
    for (int64_t u = 0; u < model::unit_count(c); ++u) {
      const int64_t owner = stage_of_unit(u);
      if (owner == 0) {
        if (is_main()) fn(u);
        continue;
      }
      if (replica_ != 0 || (stage_index_ != 0 && stage_index_ != owner)) continue;
      std::vector<at::Tensor> tensors;
      for (const auto& p : m->named_parameters()) {
        if (model::unit_of(p.key(), c) != u) continue;
        if (adapters_only && !p.value().requires_grad()) continue;  // LoRA: the adapters only
        tensors.push_back(p.value());
      }
      at::NoGradGuard no_grad;
      const std::string what = "export of unit " + std::to_string(u) + " from stage " +
                               std::to_string(owner);
      if (stage_index_ == owner) {
        for (const at::Tensor& t : tensors) pp_->send(t.detach().contiguous(), 0, what);
        continue;
      }
      for (const at::Tensor& t : tensors) {
        parallel::alloc_storage(t);
        pp_->recv(t.detach(), static_cast<int>(owner), what);
      }
      fn(u);
      for (const at::Tensor& t : tensors) parallel::free_storage(t);
    }
  }

  int64_t held_param_bytes() const override {
    int64_t n = 0;
    if (model_) {
      for (const auto& p : (*model_)->parameters()) n += static_cast<int64_t>(p.storage().nbytes());
      for (const auto& [name, lin] : model::linears(*model_)) {
        if (lin->nf4) n += lin->nf4->nbytes();
      }
    }
    return n;
  }
  int64_t buffer_bytes() const override { return ddp_ ? ddp_->gradient_bytes() : 0; }

  void mark_step(int64_t step) override {
    step_ = step;
    GroupStrategy::mark_step(step);
  }

  std::string check_replicas() override {
    std::ostringstream os;
    os << "pipeline: " << pp_size_ << " stages x " << dp_size_ << " replicas";
    if (dp_group_) {
      char buf[64];
      std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(
                                                     parallel::check_replicas(*dp_group_, trained_)));
      os << "; each stage's replicas are bit-identical (stage " << stage_index_ << " hash " << buf
         << ")";
    }
    return os.str();
  }

  // MicroBatchRunner.
  double train_step(model::LlamaForCausalLM& m, const std::vector<data::Batch>& micro,
                    double denom, bool bf16) override {
    const auto n = static_cast<int64_t>(micro.size());
    const int64_t per_round = micro_batches_ > 0 ? micro_batches_ : n;
    FTUNE_CHECK(per_round >= 1 && n % per_round == 0, "pipeline: ", n,
                " micro-batches per step do not split into rounds of parallel.micro_batches ",
                per_round);
    const int64_t rounds = n / per_round;
    double loss_sum = 0;
    stage_->begin_step();
    for (int64_t r = 0; r < rounds; ++r) {
      const data::Batch* batches = micro.data() + r * per_round;
      parallel::StageCallbacks cb;
      cb.forward = [&](int64_t k, const at::Tensor& in) -> at::Tensor {
        const data::Batch& b = batches[k];
        at::Tensor out = stage_forward(m, b, in, bf16);
        if (!is_last()) return out;
        model::LossSum ls = last_stage_loss(m, b, out, bf16);
        loss_sum += ls.sum.item<double>();
        return ls.sum / denom;
      };
      cb.input_shape = [&](int64_t k) { return hidden_shape(batches[k]); };
      cb.before_backward = [&](int64_t /*k*/, bool last) {
        if (ddp_) ddp_->set_sync(last && r + 1 == rounds);
      };
      stage_->run_round(r, per_round, cb, true);
    }
    at::Tensor total = at::full({1}, loss_sum, at::TensorOptions(at::kDouble).device(device_));
    pp_->broadcast(total, static_cast<int>(pp_size_) - 1,
                   "broadcast of the loss from the last stage");
    gather_timeline(per_round);
    return total.item<double>();
  }

  std::pair<double, int64_t> eval_sums(model::LlamaForCausalLM& m,
                                       const std::vector<data::Batch>& batches,
                                       bool bf16) override {
    m->eval();
    double sum = 0;
    int64_t count = 0;
    parallel::StageCallbacks cb;
    cb.forward = [&](int64_t k, const at::Tensor& in) -> at::Tensor {
      at::Tensor out = stage_forward(m, batches[k], in, bf16);
      if (!is_last()) return out;
      model::LossSum ls = last_stage_loss(m, batches[k], out, bf16);
      sum += ls.sum.item<double>();
      count += ls.count;
      return {};
    };
    cb.input_shape = [&](int64_t k) { return hidden_shape(batches[k]); };
    stage_->run_round(0, static_cast<int64_t>(batches.size()), cb, false);
    m->train();
    at::Tensor t = at::tensor({sum, static_cast<double>(count)},
                              at::TensorOptions(at::kDouble).device(device_));
    pp_->broadcast(t, static_cast<int>(pp_size_) - 1,
                   "broadcast of the evaluation loss from the last stage");
    return {t[0].item<double>(), static_cast<int64_t>(t[1].item<double>())};
  }

  nlohmann::json step_metrics() override {
    nlohmann::json j = timeline_;
    nlohmann::json out = {{"pipeline_bubble", j.value("bubble", 0.0)},
                          {"pipeline_bubble_theory", j.value("theoretical_bubble", 0.0)},
                          {"stage_busy_s", j.value("busy_s", nlohmann::json::array())},
                          {"stage_max_in_flight", j.value("max_in_flight", nlohmann::json::array())},
                          {"stage_peak_mem_bytes",
                           j.value("peak_mem_bytes", nlohmann::json::array())}};
    if (is_main() && !timeline_.is_null()) {
      write_file_atomic(std::filesystem::path(output_dir_) / "pipeline_timeline.json",
                        timeline_.dump(1) + "\n");
    }
    return out;
  }

 private:
  bool is_first() const { return stage_index_ == 0; }
  bool is_last() const { return stage_index_ + 1 == pp_size_; }
  bool owns(int64_t unit) const { return unit >= first_unit_ && unit < end_unit_; }
  int64_t stage_of_unit(int64_t unit) const {
    if (unit == 0) return 0;
    const auto layers = split_.back();
    if (unit > layers) return pp_size_ - 1;
    return static_cast<int64_t>(std::upper_bound(split_.begin(), split_.end(), unit - 1) -
                                split_.begin()) - 1;
  }
  std::vector<int64_t> hidden_shape(const data::Batch& b) const {
    return {b.input_ids.size(0), b.input_ids.size(1), hidden_};
  }

  // This stage's units on one micro-batch: from its input ids (first stage) or the received
  // hidden state, to the hidden state it sends on (after the final norm on the last stage).
  at::Tensor stage_forward(model::LlamaForCausalLM& m, const data::Batch& b, const at::Tensor& in,
                           bool bf16) {
    model::AutocastScope autocast(device_.type(), bf16);
    model::ForwardOptions fo;
    fo.positions = b.positions.to(device_);
    if (!b.causal) fo.attn_mask = b.attn_mask.to(device_);
    return m->run_units(is_first() ? b.input_ids.to(device_) : in, fo, first_unit_, end_unit_);
  }
  model::LossSum last_stage_loss(model::LlamaForCausalLM& m, const data::Batch& b,
                                 const at::Tensor& hidden, bool bf16) {
    model::AutocastScope autocast(device_.type(), bf16);
    return model::chunked_lm_loss_sum(hidden, m->lm_head_weight(), b.labels.to(device_));
  }

  // Every stage's slots of this step, gathered on every rank of the pipeline: the timeline, the
  // busy share of each stage and the bubble, for the metrics.
  void gather_timeline(int64_t per_round) {
    const parallel::StageStats& st = stage_->stats();
    const auto n = static_cast<int64_t>(st.spans.size());
    constexpr int64_t kHead = 3, kFields = 4;
    at::Tensor mine = at::empty({kHead + n * kFields}, at::kDouble);
    auto* d = mine.data_ptr<double>();
    d[0] = static_cast<double>(st.max_in_flight);
    d[1] = static_cast<double>(peak_memory_bytes(device_));
    d[2] = st.begin_wall;
    for (int64_t i = 0; i < n; ++i) {
      const auto& s = st.spans[i];
      d[kHead + i * kFields + 0] = static_cast<double>(s.micro_batch);
      d[kHead + i * kFields + 1] = s.forward ? 1.0 : 0.0;
      d[kHead + i * kFields + 2] = s.start;
      d[kHead + i * kFields + 3] = s.end;
    }
    at::Tensor all = at::empty({pp_size_ * mine.numel()},
                               at::TensorOptions(at::kDouble).device(device_));
    pp_->all_gather_into(all, mine.to(device_), "all-gather of the pipeline timeline");
    all = all.cpu();
    const auto* a = all.data_ptr<double>();
    nlohmann::json spans = nlohmann::json::array(), busy = nlohmann::json::array(),
                   in_flight = nlohmann::json::array(), mem = nlohmann::json::array();
    double makespan = 0, busy_total = 0, t0 = a[2];
    for (int64_t s = 1; s < pp_size_; ++s) t0 = std::min(t0, a[s * mine.numel() + 2]);
    for (int64_t s = 0; s < pp_size_; ++s) {
      const double* r = a + s * mine.numel();
      in_flight.push_back(static_cast<int64_t>(r[0]));
      mem.push_back(static_cast<int64_t>(r[1]));
      const double shift = r[2] - t0;  // this stage's clock started that much after the first's
      double b = 0;
      for (int64_t i = 0; i < n; ++i) {
        const double* f = r + kHead + i * kFields;
        spans.push_back({{"stage", s},
                         {"micro_batch", static_cast<int64_t>(f[0])},
                         {"kind", f[1] > 0.5 ? "F" : "B"},
                         {"start", f[2] + shift},
                         {"end", f[3] + shift}});
        b += f[3] - f[2];
        makespan = std::max(makespan, f[3] + shift);
      }
      busy.push_back(b);
      busy_total += b;
    }
    const double theory = schedule_ == parallel::PipeSchedule::kNaive
                              ? static_cast<double>(pp_size_ - 1) / static_cast<double>(pp_size_)
                              : parallel::theoretical_bubble(pp_size_, per_round);
    timeline_ = {{"schedule", parallel::pipe_schedule_name(schedule_)},
                 {"stages", pp_size_},
                 {"micro_batches", per_round},
                 {"step", step_},
                 {"spans", spans},
                 {"busy_s", busy},
                 {"makespan_s", makespan},
                 {"bubble", makespan > 0 ? 1.0 - busy_total / (pp_size_ * makespan) : 0.0},
                 {"theoretical_bubble", theory},
                 {"max_in_flight", in_flight},
                 {"peak_mem_bytes", mem}};
  }

  int64_t pp_size_;
  parallel::PipeSchedule schedule_;
  int64_t micro_batches_;
  std::vector<int64_t> split_;
  std::string split_where_, pp_where_, output_dir_;
  int dp_size_ = 1, stage_index_ = 0, replica_ = 0;
  parallel::DdpOptions ddp_options_;
  std::unique_ptr<parallel::ProcessGroup> dp_group_, pp_owned_, tie_group_;
  parallel::ProcessGroup* pp_ = nullptr;  // this replica's pipeline: pp_owned_ or the world
  std::unique_ptr<parallel::Ddp> ddp_;
  std::unique_ptr<parallel::PipelineStage> stage_;
  model::LlamaForCausalLM* model_ = nullptr;
  int64_t first_unit_ = 0, end_unit_ = 0, hidden_ = 0, step_ = 0;
  bool tied_ = false, tie_trained_ = false;
  nlohmann::json timeline_;  // the last step's, as pipeline_timeline.json holds it
};

}  // namespace

std::unique_ptr<Strategy> make_pipeline_strategy(parallel::ProcessGroup& world, at::Device device,
                                                 const config::TrainConfig& cfg) {
  return std::make_unique<PipelineStrategy>(world, device, cfg);
}

}  // namespace ftune::train
