// The --fit search and its speed model; see fit.h and docs/memory.md.
#include "memory/fit.h"

#include <algorithm>
#include <sstream>

namespace ftune::memory {
namespace {

// Ring collectives (REFERENCE.md §5): bytes each rank sends for a payload of `bytes` over n ranks.
double all_reduce_wire(double bytes, int64_t n) { return n > 1 ? bytes * 2.0 * (n - 1) / n : 0; }
double gather_wire(double bytes, int64_t n) { return n > 1 ? bytes * (n - 1.0) / n : 0; }

}  // namespace

const char* method_name(Method m) {
  switch (m) {
    case Method::kFull: return "full";
    case Method::kLora: return "lora";
    case Method::kQlora: return "qlora";
  }
  return "?";
}

Method method_of(const EstimateOptions& o) {
  return o.qlora ? Method::kQlora : o.lora() ? Method::kLora : Method::kFull;
}

double flops_per_token(const model::LlamaConfig& c, const EstimateOptions& o) {
  const ParamCounts p = count_parameters(c, o);
  // Every parameter takes part in a matmul but the input embedding of an untied model (a lookup).
  const double matmul = static_cast<double>(p.total - (c.tie_word_embeddings ? 0 : p.embedding));
  const double attn = 12.0 * c.num_hidden_layers * c.hidden_size * static_cast<double>(o.seq_len);
  double f = (o.lora() ? 4.0 : 6.0) * matmul + attn;
  if (o.grad_ckpt) f += 2.0 * matmul + attn / 3.0;
  return f;
}

double micro_batch_s(const model::LlamaConfig& c, const EstimateOptions& o, const SpeedModel& s) {
  const int64_t T = o.micro_batch * o.seq_len;
  const double rate = (o.bf16 ? s.bf16_flops : s.fp32_flops) / (o.qlora ? s.qlora_slowdown : 1.0);
  return flops_per_token(c, o) * static_cast<double>(T) / rate +
         s.launch_s_per_layer * static_cast<double>(c.num_hidden_layers);
}

double optimizer_step_s(const EstimateOptions& o, const Estimate& e, const SpeedModel& s) {
  if (o.offload_optimizer) return 0;  // the host steps it (StepTime::offload_s)
  const double psi = static_cast<double>(e.trainable_on_rank);
  const double stepped = zero_stage(o.strategy) > 0 ? psi / static_cast<double>(e.dp) : psi;
  return stepped * s.optimizer_bytes_per_param / s.hbm_bytes_per_s;
}

CommVolume comm_volume(const model::LlamaConfig& c, const EstimateOptions& o, const Estimate& e,
                       int64_t micro_batches) {
  CommVolume v;
  if (e.dp > 1) {
    const double psi = static_cast<double>(e.trainable_on_rank), n = static_cast<double>(e.dp);
    const int64_t grad_bytes = 4 * e.trainable_on_rank;
    const int64_t L = c.num_hidden_layers;
    switch (o.strategy) {
      case Strategy::kDdp:
      case Strategy::kPipeline:  // each stage's replicas all-reduce their gradients like DDP
        v.all_reduce_bytes = 4 * psi;
        v.all_reduce_calls = (grad_bytes + kDdpBucketBytes - 1) / kDdpBucketBytes + 1;
        break;
      case Strategy::kZero1:  // all-reduce the gradients, all-gather the stepped shards
        v.all_reduce_bytes = 4 * psi;
        v.gather_bytes = 4 * psi;
        v.all_reduce_calls = 2;  // and the clipping norm's scalar
        v.gather_calls = 1;
        break;
      case Strategy::kZero2:  // reduce-scatter the gradients, all-gather the stepped shards
        v.gather_bytes = 2 * 4 * psi;
        v.all_reduce_calls = 1;
        v.gather_calls = 2;
        break;
      case Strategy::kFsdp: {
        // Every unit gathered for the forward and again for the backward, gradients
        // reduce-scattered, each micro-batch.
        const double gathered = o.lora() ? static_cast<double>(e.rank.frozen_base) * n + 4 * psi
                                         : (o.bf16 ? 2.0 : 4.0) * static_cast<double>(e.params.total);
        v.gather_bytes = (2 * gathered + 4 * psi) * static_cast<double>(micro_batches);
        v.gather_calls = ((L + 2) + L + (L + 2)) * micro_batches;
        v.all_reduce_calls = 1;
        break;
      }
      default: break;
    }
  }
  if (o.strategy == Strategy::kPipeline && o.pp > 1) {
    const double T = static_cast<double>(o.micro_batch * o.seq_len);
    v.p2p_bytes = 2.0 * static_cast<double>(micro_batches) * 4 * c.hidden_size * T;
    v.p2p_calls = 2 * micro_batches;
  }
  return v;
}

StepTime step_time(const model::LlamaConfig& c, const EstimateOptions& o, const Estimate& e,
                   const SpeedModel& s) {
  StepTime t;
  const int64_t T = o.micro_batch * o.seq_len;
  const double mb_s = micro_batch_s(c, o, s);
  const int64_t P = o.pp;
  const int64_t M = o.strategy == Strategy::kPipeline ? s.pipeline_micro_batches_per_stage * P : 1;
  if (o.strategy == Strategy::kPipeline) {
    t.compute_s = static_cast<double>(M + P - 1) * mb_s / static_cast<double>(P);
    t.tokens = e.dp * M * T;
  } else {
    t.compute_s = mb_s;  // model_parallel: one device computes at a time
    t.tokens = e.dp * T;
  }
  t.compute_s += optimizer_step_s(o, e, s);
  const CommVolume v = comm_volume(c, o, e, M);
  t.comm_s = (all_reduce_wire(v.all_reduce_bytes, e.dp) + gather_wire(v.gather_bytes, e.dp) +
              v.p2p_bytes) / s.link_bytes_per_s;
  if (o.offload_optimizer) {
    const double shard = static_cast<double>(e.trainable_on_rank) / static_cast<double>(e.dp);
    t.offload_s = 2 * 4 * shard / s.host_bytes_per_s + shard / s.cpu_adam_params_per_s;
  }
  return t;
}

const std::vector<Strategy>& fit_strategies() {
  static const std::vector<Strategy> s = {Strategy::kSingle, Strategy::kDdp,  Strategy::kZero1,
                                          Strategy::kZero2,  Strategy::kFsdp,
                                          Strategy::kPipeline, Strategy::kModelParallel};
  return s;
}

FitResult fit(const model::LlamaConfig& c, const FitOptions& f) {
  FitResult r;
  bool have_closest = false;
  for (Method m : f.methods) {
    for (Strategy s : f.strategies) {
      if ((s == Strategy::kSingle) != (f.gpus == 1)) continue;
      // A stage per GPU (pipeline: pp = gpus, no data parallelism), at least one layer each.
      const bool staged = s == Strategy::kModelParallel || s == Strategy::kPipeline;
      if (staged && f.gpus > c.num_hidden_layers) continue;
      for (int64_t mb : f.micro_batches) {
        for (bool ckpt : {false, true}) {
          for (bool offload : {false, true}) {
            if (offload && zero_stage(s) == 0) continue;
            EstimateOptions o = f.base;
            o.strategy = s;
            o.world_size = f.gpus;
            o.pp = staged ? f.gpus : 1;
            o.lora_r = m == Method::kFull ? 0 : std::max<int64_t>(o.lora_r, 1);
            o.qlora = m == Method::kQlora;
            o.micro_batch = mb;
            o.grad_ckpt = ckpt;
            o.offload_optimizer = offload;
            Candidate cand{o, estimate(c, o), {}, false};
            cand.time = step_time(c, o, cand.est, f.speed);
            cand.fits = cand.est.rank.total() <= f.gpu_mem;
            ++r.searched;
            if (!have_closest || cand.est.rank.total() < r.closest.est.rank.total()) {
              r.closest = cand;
              have_closest = true;
            }
            if (cand.fits) r.fitting.push_back(std::move(cand));
          }
        }
      }
    }
  }
  std::stable_sort(r.fitting.begin(), r.fitting.end(), [](const Candidate& a, const Candidate& b) {
    if (a.time.tokens_per_s() != b.time.tokens_per_s()) {
      return a.time.tokens_per_s() > b.time.tokens_per_s();
    }
    return a.est.rank.total() < b.est.rank.total();
  });
  return r;
}

std::vector<std::string> train_overrides(const EstimateOptions& o, const std::string& model_path) {
  std::vector<std::string> v = {
      "model.path=" + model_path,
      std::string("model.dtype=") + (o.bf16 ? "bf16" : "fp32"),
      std::string("model.grad_checkpointing=") + (o.grad_ckpt ? "true" : "false"),
      "training.micro_batch=" + std::to_string(o.micro_batch),
      "data.seq_len=" + std::to_string(o.seq_len),
  };
  const std::string strategy =
      o.strategy == Strategy::kSingle ? "none" : strategy_name(o.strategy);
  v.push_back("parallel.strategy=" + strategy);
  if (o.strategy == Strategy::kModelParallel) {
    std::string devices;
    for (int64_t i = 0; i < o.pp; ++i) devices += (i ? ",cuda:" : "cuda:") + std::to_string(i);
    v.push_back("parallel.devices=[" + devices + "]");
  } else if (o.strategy == Strategy::kPipeline) {
    // 1F1B over M = pipeline_micro_batches_per_stage x P micro-batches, one round per step (what
    // step_time assumes).
    const int64_t m = SpeedModel{}.pipeline_micro_batches_per_stage * o.pp;
    v.push_back("parallel.pp=" + std::to_string(o.pp));
    v.push_back("parallel.schedule=1f1b");
    v.push_back("training.grad_accum=" + std::to_string(m));
    v.push_back("parallel.micro_batches=" + std::to_string(m));
  }
  if (o.offload_optimizer) v.push_back("parallel.offload=optimizer");
  if (o.lora()) {
    v.push_back("lora.r=" + std::to_string(o.lora_r));
    std::string targets;
    for (const auto& t : o.lora_targets) targets += (targets.empty() ? "" : ",") + t;
    v.push_back("lora.targets=[" + targets + "]");
    if (o.lora_dropout > 0) {
      std::ostringstream d;
      d << "lora.dropout=" << o.lora_dropout;
      v.push_back(d.str());
    }
  }
  if (o.qlora) {
    v.push_back("quant.type=nf4");
    if (o.nf4_blocksize != 64) v.push_back("quant.blocksize=" + std::to_string(o.nf4_blocksize));
    if (!o.nf4_double_quant) v.push_back("quant.double_quant=false");
  }
  return v;
}

}  // namespace ftune::memory
