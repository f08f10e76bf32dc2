// The --fit search and its speed model; see fit.h and docs/memory.md.
#include "memory/fit.h"

#include <algorithm>

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

StepTime step_time(const model::LlamaConfig& c, const EstimateOptions& o, const Estimate& e,
                   const SpeedModel& s) {
  StepTime t;
  const int64_t T = o.micro_batch * o.seq_len;
  const double rate = (o.bf16 ? s.bf16_flops : s.fp32_flops) / (o.qlora ? s.qlora_slowdown : 1.0);
  const double micro_batch_s = flops_per_token(c, o) * static_cast<double>(T) / rate +
                               s.launch_s_per_layer * static_cast<double>(c.num_hidden_layers);
  const int64_t P = o.pp;
  if (o.strategy == Strategy::kPipeline) {
    const int64_t M = s.pipeline_micro_batches_per_stage * P;
    t.compute_s = static_cast<double>(M + P - 1) * micro_batch_s / static_cast<double>(P);
    t.tokens = e.dp * M * T;
  } else {
    t.compute_s = micro_batch_s;  // model_parallel: one device computes at a time
    t.tokens = e.dp * T;
  }
  const double psi = static_cast<double>(e.trainable_on_rank), n = static_cast<double>(e.dp);
  // The optimizer step streams its (shard of the) state through device memory once.
  if (!o.offload_optimizer) {
    const double stepped = zero_stage(o.strategy) > 0 ? psi / n : psi;
    t.compute_s += stepped * s.optimizer_bytes_per_param / s.hbm_bytes_per_s;
  }
  // Communication per step, in the bytes ftune moves (fp32 gradients and master pieces).
  double wire = 0;
  switch (o.strategy) {
    case Strategy::kDdp: wire = all_reduce_wire(4 * psi, e.dp); break;
    case Strategy::kZero1: wire = all_reduce_wire(4 * psi, e.dp) + gather_wire(4 * psi, e.dp); break;
    case Strategy::kZero2: wire = 2 * gather_wire(4 * psi, e.dp); break;
    case Strategy::kFsdp: {
      // Every unit gathered for the forward and again for the backward, gradients reduce-scattered.
      const ParamCounts& p = e.params;
      const double gathered = o.lora() ? static_cast<double>(e.rank.frozen_base) * n + 4 * psi
                                       : (o.bf16 ? 2.0 : 4.0) * static_cast<double>(p.total);
      wire = gather_wire(2 * gathered + 4 * psi, e.dp);
      break;
    }
    case Strategy::kPipeline: {
      const int64_t M = s.pipeline_micro_batches_per_stage * P;
      wire = all_reduce_wire(4 * psi, e.dp) +
             2.0 * static_cast<double>(M) * 4 * c.hidden_size * static_cast<double>(T);
      break;
    }
    default: break;
  }
  t.comm_s = wire / s.link_bytes_per_s;
  if (o.offload_optimizer) {
    const double shard = psi / n;
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
  }
  if (o.qlora) {
    v.push_back("quant.type=nf4");
    if (o.nf4_blocksize != 64) v.push_back("quant.blocksize=" + std::to_string(o.nf4_blocksize));
    if (!o.nf4_double_quant) v.push_back("quant.double_quant=false");
  }
  return v;
}

}  // namespace ftune::memory
