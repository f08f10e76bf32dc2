// The scaling planner; see plan.h and docs/plan.md.
#include "memory/plan.h"

#include <algorithm>

#include "core/error.h"

namespace ftune::memory {

const std::vector<GpuSpec>& gpu_specs() {
  // NVIDIA's datasheets (SXM parts): dense bf16 is half the "with sparsity" figure; NVLink's
  // 900 / 600 GB/s are both directions together.
  static const std::vector<GpuSpec> g = {
      {"h100-80gb", 989.4e12, 66.9e12, 80'000'000'000, 3.35e12, 450e9},
      {"h200", 989.4e12, 66.9e12, 141'000'000'000, 4.8e12, 450e9},
      {"a100-80gb", 312e12, 19.5e12, 80'000'000'000, 2.039e12, 300e9},
  };
  return g;
}

const GpuSpec& gpu_spec(const std::string& name, const std::string& where) {
  for (const auto& g : gpu_specs()) {
    if (g.name == name) return g;
  }
  fail(where, ": unknown GPU \"", name, "\" (expected h100-80gb, h200 or a100-80gb)");
}

const std::vector<Interconnect>& interconnects() {
  static const std::vector<Interconnect> f = {
      {"nvlink", 0, kNvlinkAlphaS},  // one NVLink switch domain across the nodes
      {"ib", 50e9, 5e-6},            // NDR InfiniBand, 400 Gb/s per GPU (one HCA each)
      {"ethernet", 12.5e9, 30e-6},   // 100 Gb/s per GPU, TCP sockets
  };
  return f;
}

const Interconnect& interconnect(const std::string& name, const std::string& where) {
  for (const auto& f : interconnects()) {
    if (f.name == name) return f;
  }
  fail(where, ": unknown interconnect \"", name, "\" (expected nvlink, ib or ethernet)");
}

double ring_all_reduce_s(double bytes, int64_t n, const Link& l, int64_t calls) {
  if (n <= 1) return 0;
  const double steps = 2.0 * static_cast<double>(n - 1);
  return steps / static_cast<double>(n) * bytes / l.bytes_per_s +
         steps * l.alpha_s * static_cast<double>(calls);
}

double ring_gather_s(double bytes, int64_t n, const Link& l, int64_t calls) {
  if (n <= 1) return 0;
  const double steps = static_cast<double>(n - 1);
  return steps / static_cast<double>(n) * bytes / l.gather_bw() +
         steps * l.alpha_s * static_cast<double>(calls);
}

double pipeline_bubble(int64_t stages, int64_t micro_batches) {
  return static_cast<double>(stages - 1) / static_cast<double>(micro_batches + stages - 1);
}

Machine machine_of(const GpuSpec& g, const Interconnect& fabric, bool bf16, double efficiency) {
  Machine m;
  m.peak_flops = bf16 ? g.bf16_flops : g.fp32_flops;
  m.flops = m.peak_flops * efficiency;
  m.memory_bytes = g.memory_bytes;
  m.hbm_bytes_per_s = g.hbm_bytes_per_s * kHbmEfficiency;
  m.intra = {g.nvlink_bytes_per_s, kNvlinkAlphaS};
  m.inter = fabric.bytes_per_s > 0 ? Link{fabric.bytes_per_s, fabric.alpha_s} : m.intra;
  return m;
}

std::vector<int64_t> gpu_counts(int64_t gpus) {
  if (gpus < 8) return {gpus};
  std::vector<int64_t> v;
  for (int64_t n = 8; n <= gpus; n *= 2) v.push_back(n);
  return v;
}

namespace {

int64_t default_stages(const model::LlamaConfig& c, int64_t gpus) {
  int64_t p = 1;
  while (p * 2 <= std::min<int64_t>({8, gpus, c.num_hidden_layers}) && gpus % (p * 2) == 0) p *= 2;
  return p;
}

// Share of a micro-batch's FLOPs in its backward (recompute included): the forward is a third of
// full fine-tuning's uncheckpointed FLOPs, 2 x matmul + 4 L h S per token.
double backward_share(const model::LlamaConfig& c, const EstimateOptions& o) {
  EstimateOptions full = o;
  full.lora_r = 0;
  full.qlora = false;
  full.grad_ckpt = false;
  return 1.0 - flops_per_token(c, full) / 3.0 / flops_per_token(c, o);
}

// A bucketed all-reduce running beside a backward of `window_s`: all but its last bucket can hide.
double overlapped_all_reduce_s(double total_s, int64_t calls, double window_s) {
  return std::max(total_s - window_s, total_s / static_cast<double>(std::max<int64_t>(calls, 1)));
}

}  // namespace

PlanRow plan_row(const model::LlamaConfig& c, const PlanOptions& p, int64_t gpus, Strategy s) {
  PlanRow r;
  r.gpus = gpus;
  r.strategy = s;
  EstimateOptions o = p.base;
  o.strategy = s;
  o.world_size = gpus;
  o.pp = 1;
  if (s == Strategy::kPipeline) {
    o.pp = p.pp > 0 ? p.pp : default_stages(c, gpus);
    if (o.pp > gpus || gpus % o.pp != 0) {
      r.skip = "--pp " + std::to_string(o.pp) + " does not divide " + std::to_string(gpus) + " GPUs";
      return r;
    }
  }
  r.pp = o.pp;
  r.dp = gpus / o.pp;
  const int64_t rows = r.dp * o.micro_batch;  // per micro-batch slot, all data-parallel ranks
  int64_t accum = p.grad_accum;
  if (p.global_batch > 0) {
    if (p.global_batch % rows != 0) {
      r.skip = "global batch " + std::to_string(p.global_batch) + " is not a multiple of micro-batch x " +
               std::to_string(r.dp) + " data-parallel ranks";
      return r;
    }
    accum = p.global_batch / rows;
  }
  // A pipeline step runs the same global batch as M micro-batches through each stage.
  r.micro_batches = p.global_batch > 0 || s != Strategy::kPipeline ? accum : accum * o.pp;
  o.grad_accum = r.micro_batches;  // memory: accumulated gradients are held during each forward
  r.opts = o;
  const Estimate e = estimate(c, o);

  SpeedModel sm;
  sm.bf16_flops = sm.fp32_flops = p.machine.flops;
  sm.hbm_bytes_per_s = p.machine.hbm_bytes_per_s;
  sm.launch_s_per_layer = p.launch_s_per_layer;
  sm.qlora_slowdown = p.qlora_slowdown;
  const double mb_s = micro_batch_s(c, o, sm);
  const double M = static_cast<double>(r.micro_batches), P = static_cast<double>(o.pp);
  const double stage_mb_s = mb_s / P;  // one stage's share of a micro-batch
  r.compute_s = (s == Strategy::kPipeline ? (M + P - 1) * stage_mb_s : M * mb_s) +
                optimizer_step_s(o, e, sm);

  const CommVolume v = comm_volume(c, o, e, r.micro_batches);
  const Link dp_link = p.machine.link_for(r.dp);  // data-parallel ranks are neighbours
  const Link p2p_link = p.machine.link_for(gpus);  // stages cross nodes once the job does
  const double ar_s = ring_all_reduce_s(v.all_reduce_bytes, r.dp, dp_link, v.all_reduce_calls);
  const double gather_s = ring_gather_s(v.gather_bytes, r.dp, dp_link, v.gather_calls);
  const double p2p_s = v.p2p_bytes > 0 ? v.p2p_bytes / p2p_link.bytes_per_s +
                                             static_cast<double>(v.p2p_calls) * p2p_link.alpha_s
                                       : 0;
  r.comm_s = ar_s + gather_s + p2p_s;
  const double last_backward_s = (s == Strategy::kPipeline ? stage_mb_s : mb_s) * backward_share(c, o);
  switch (s) {
    case Strategy::kDdp:
      r.comm_exposed_s = overlapped_all_reduce_s(ar_s, v.all_reduce_calls, last_backward_s);
      break;
    case Strategy::kPipeline:
      r.comm_exposed_s = p2p_s + overlapped_all_reduce_s(ar_s, v.all_reduce_calls, last_backward_s);
      break;
    case Strategy::kFsdp: {
      // The first unit's gather and the last reduce-scatter wait; the rest runs beside compute.
      const double edge_s = v.gather_calls > 0 ? 2 * gather_s / static_cast<double>(v.gather_calls) : 0;
      r.comm_exposed_s = std::max(gather_s - M * mb_s, edge_s) + ar_s;
      break;
    }
    default: r.comm_exposed_s = r.comm_s; break;  // zero1, zero2: after the backward
  }
  r.comm_exposed_s += (1 - p.overlap) * (r.comm_s - r.comm_exposed_s);
  r.step_s = r.compute_s + r.comm_exposed_s;
  r.tokens_per_step = r.dp * r.micro_batches * o.micro_batch * o.seq_len;
  r.tokens_per_s = static_cast<double>(r.tokens_per_step) / r.step_s;
  EstimateOptions model_flops = o;
  model_flops.grad_ckpt = false;  // MFU counts the model's FLOPs, not the recompute
  r.mfu = flops_per_token(c, model_flops) * r.tokens_per_s /
          (static_cast<double>(gpus) * p.machine.peak_flops);
  r.memory_bytes = e.rank.total();
  r.fits = r.memory_bytes <= p.machine.memory_bytes;
  return r;
}

std::vector<PlanRow> plan(const model::LlamaConfig& c, const PlanOptions& p,
                          const std::vector<int64_t>& counts) {
  std::vector<PlanRow> rows;
  for (int64_t n : counts) {
    for (Strategy s : p.strategies) rows.push_back(plan_row(c, p, n, s));
  }
  return rows;
}

}  // namespace ftune::memory
