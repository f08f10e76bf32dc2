// Model parallelism over the devices of one process; see model_parallel.h.
#include "train/model_parallel.h"

#include <ATen/core/grad_mode.h>

#include <cstdio>
#include <sstream>

#include "core/error.h"
#include "model/hf_io.h"
#include "parallel/pipeline_schedule.h"

namespace ftune::train {
namespace {

class ModelParallelStrategy : public Strategy, public model::UnitHooks {
 public:
  ModelParallelStrategy(std::vector<at::Device> devices, std::string where,
                        std::vector<int64_t> split, std::string split_where)
      : devices_(std::move(devices)), where_(std::move(where)), split_(std::move(split)),
        split_where_(std::move(split_where)) {}
  ~ModelParallelStrategy() override {
    if (model_) (*model_)->set_unit_hooks(nullptr);
  }

  std::string name() const override { return "model_parallel"; }
  at::Device load_device(at::Device /*run_device*/) const override { return at::kCPU; }

  optim::NamedTensors prepare(model::LlamaForCausalLM& m) override {
    const int64_t layers = m->config().num_hidden_layers;
    const auto stages = static_cast<int64_t>(devices_.size());
    split_ = stage_split(m, stages, split_, split_where_, where_);
    unit_device_.assign(layers + 2, devices_.back());
    unit_device_[0] = devices_.front();
    for (int64_t k = 0; k < stages; ++k) {
      for (int64_t i = split_[k]; i < split_[k + 1]; ++i) unit_device_[i + 1] = devices_[k];
    }
    at::NoGradGuard no_grad;
    m->model->embed_tokens->to(unit_device_[0]);
    for (int64_t i = 0; i < layers; ++i) m->model->layers[i]->to(unit_device_[i + 1]);
    m->model->norm->to(devices_.back());
    if (m->lm_head) m->lm_head->to(devices_.back());
    for (const auto& [name, lin] : model::linears(m)) {  // 4-bit weights are not module buffers
      if (!lin->nf4) continue;
      const at::Device d = unit_device_[model::unit_of(name + ".weight", m->config())];
      if (lin->nf4->device() != d) lin->nf4 = std::make_shared<quant::Nf4Tensor>(lin->nf4->to(d));
    }
    m->set_unit_hooks(this);
    model_ = &m;
    std::ostringstream os;
    os << "model_parallel:";
    for (int64_t k = 0; k < stages; ++k) {
      os << (k ? "," : "") << " layers " << split_[k] << "-" << split_[k + 1] - 1 << " on "
         << devices_[k];
    }
    std::fprintf(stderr, "%s (embedding on %s, head on %s)\n", os.str().c_str(),
                 devices_.front().str().c_str(), devices_.back().str().c_str());
    return Strategy::prepare(m);
  }

  void before_unit(int64_t /*unit*/) override {}
  at::Tensor after_unit(int64_t unit, const at::Tensor& out) override {
    const at::Device next = unit_device_[unit + 1];
    return out.device() == next ? out : out.to(next);
  }

 private:
  std::vector<at::Device> devices_;
  std::string where_;
  std::vector<int64_t> split_;  // parallel.split, or balanced in prepare()
  std::string split_where_;
  std::vector<at::Device> unit_device_;
  model::LlamaForCausalLM* model_ = nullptr;
};

}  // namespace

std::vector<int64_t> stage_split(model::LlamaForCausalLM& m, int64_t stages,
                                 const std::vector<int64_t>& split, const std::string& split_where,
                                 const std::string& stages_where) {
  const int64_t layers = m->config().num_hidden_layers;
  FTUNE_CHECK(stages <= layers, stages_where, ": ", stages, " stages for ", layers,
              " decoder layers: every stage needs at least one layer");
  if (!split.empty()) {
    parallel::check_split(split, layers, stages, split_where);
    return split;
  }
  // Balance by what each layer holds: its parameters' elements plus its 4-bit weights'.
  std::vector<int64_t> cost(layers, 0);
  for (const auto& p : m->named_parameters()) {
    const int64_t u = model::unit_of(p.key(), m->config());
    if (u >= 1 && u <= layers) cost[u - 1] += p.value().numel();
  }
  for (const auto& [name, lin] : model::linears(m)) {
    const int64_t u = model::unit_of(name + ".weight", m->config());
    if (lin->nf4 && u >= 1 && u <= layers) cost[u - 1] += lin->nf4->numel();
  }
  return parallel::balanced_split(cost, stages);
}

std::unique_ptr<Strategy> make_model_parallel_strategy(std::vector<at::Device> devices,
                                                       const config::TrainConfig& cfg) {
  return std::make_unique<ModelParallelStrategy>(
      std::move(devices), cfg.where("parallel.devices") + ": parallel.devices", cfg.parallel.split,
      cfg.where("parallel.split") + ": parallel.split");
}

}  // namespace ftune::train
