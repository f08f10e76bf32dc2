// `ftune plan` (issue #11 item 4): projects one training setup to a cluster of 8 to 1024 GPUs,
// for each data-parallel strategy: step time, the communication it leaves exposed, tokens/s, MFU,
// memory per GPU (the estimator's, memory/estimate.h) and whether it fits. Pure arithmetic: the
// compute and the bytes each strategy moves are --fit's speed model (memory/fit.h), priced here
// with an alpha-beta model per link (NVLink inside a node, the chosen fabric between nodes; a ring
// runs at its slowest link) and an overlap rule per strategy. The trade-off: simple enough to
// check by hand, so it ignores congestion, NCCL's tree algorithms and kernel-level overlap
// losses. See docs/plan.md. Defines GpuSpec, Interconnect, Link, Machine, PlanOptions, PlanRow and
// the functions below.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "memory/estimate.h"
#include "memory/fit.h"

namespace ftune::memory {

// Datasheet figures of one GPU (docs/plan.md gives the sources).
struct GpuSpec {
  std::string name;             // "h100-80gb" | "h200" | "a100-80gb"
  double bf16_flops = 0;        // dense (no sparsity) bf16 tensor-core FLOP/s
  double fp32_flops = 0;        // fp32 without TF32
  int64_t memory_bytes = 0;     // HBM, GB = 10^9 bytes as labelled
  double hbm_bytes_per_s = 0;   // HBM bandwidth
  double nvlink_bytes_per_s = 0;  // NVLink per GPU, one direction
};
const std::vector<GpuSpec>& gpu_specs();
// Throws "<where>: unknown GPU \"x\" (expected h100-80gb, h200 or a100-80gb)".
const GpuSpec& gpu_spec(const std::string& name, const std::string& where);

// The fabric between nodes; inside a node GPUs talk over NVLink.
struct Interconnect {
  std::string name;          // "nvlink" | "ib" | "ethernet"
  double bytes_per_s = 0;    // per GPU, one direction; 0 = NVLink everywhere (an NVLink switch
                             // domain spanning the nodes)
  double alpha_s = 0;        // per-message latency between nodes
};
const std::vector<Interconnect>& interconnects();
const Interconnect& interconnect(const std::string& name, const std::string& where);
constexpr double kNvlinkAlphaS = 3e-6;  // per-message latency of an NVLink hop (NCCL, small sizes)

struct Link {
  double bytes_per_s = 0;
  double alpha_s = 0;
  double gather_bytes_per_s = 0;  // all-gather / reduce-scatter, when the library runs them at
                                  // another rate than its all-reduce (Gloo on CPU); 0 = the same
  double gather_bw() const { return gather_bytes_per_s > 0 ? gather_bytes_per_s : bytes_per_s; }
};

// The time of ring collectives over n ranks on `l` (REFERENCE.md §5 plus the latency term):
// all-reduce 2(n-1)/n * bytes / bw + 2(n-1) alpha; all-gather and reduce-scatter (n-1)/n * bytes /
// bw + (n-1) alpha, `bytes` being the whole payload (the gathered tensor); `calls` collectives
// carrying those bytes between them pay the latency term each. 0 for n = 1.
double ring_all_reduce_s(double bytes, int64_t n, const Link& l, int64_t calls = 1);
double ring_gather_s(double bytes, int64_t n, const Link& l, int64_t calls = 1);
// A 1F1B / GPipe pipeline's idle share: (P - 1) / (M + P - 1).
double pipeline_bubble(int64_t stages, int64_t micro_batches);

// What the planner assumes of every GPU and the wires between them.
struct Machine {
  double flops = 0;          // sustained compute rate in the training dtype (FLOP/s per GPU)
  double peak_flops = 0;     // MFU's denominator: the datasheet figure in that dtype
  int64_t memory_bytes = 0;  // per GPU, for "fits"
  double hbm_bytes_per_s = 0;
  int64_t gpus_per_node = 8;
  Link intra;                // inside a node
  Link inter;                // between nodes
  // The link a collective over `group` ranks runs at: a ring inside one node at NVLink's rate,
  // one spanning nodes at its slowest link (the fabric's bandwidth, its latency per step).
  Link link_for(int64_t group) const { return group <= gpus_per_node ? intra : inter; }
};

constexpr double kDefaultEfficiency = 0.4;  // sustained / datasheet FLOP/s (torchtitan's 8 x H100
                                            // FSDP run: 33-39% MFU, REFERENCE.md §6)
constexpr double kHbmEfficiency = 0.8;      // sustained / datasheet HBM bandwidth (H200: 4.3 of
                                            // 4.8 TB/s measured, REFERENCE.md §6)
// The GPU's datasheet peak in the dtype times `efficiency`, its memory and HBM (at
// kHbmEfficiency), NVLink inside the node and `fabric` between nodes (NVLink when
// fabric.bytes_per_s is 0).
Machine machine_of(const GpuSpec& g, const Interconnect& fabric, bool bf16, double efficiency);

struct PlanOptions {
  EstimateOptions base;   // method (LoRA/QLoRA), dtype, micro-batch, seq-len, checkpointing, ...
  int64_t grad_accum = 1; // micro-batches per data-parallel rank per step (pipeline: M = this x P,
                          // so every strategy trains the same global batch)
  int64_t global_batch = 0;  // rows per step; > 0 sets grad_accum per GPU count instead
  int64_t pp = 0;            // pipeline stages; 0 = the largest power of two <= min(8, N, layers)
  std::vector<Strategy> strategies = {Strategy::kDdp, Strategy::kZero1, Strategy::kZero2,
                                      Strategy::kFsdp, Strategy::kPipeline};
  Machine machine;
  double overlap = 1;     // share of the hideable communication that compute hides: 1 where
                          // copy engines move the bytes (GPUs), 0 where the cores that compute
                          // also move them (Gloo on CPU)
  double launch_s_per_layer = SpeedModel{}.launch_s_per_layer;
  double qlora_slowdown = SpeedModel{}.qlora_slowdown;
};

struct PlanRow {
  int64_t gpus = 0;
  Strategy strategy = Strategy::kDdp;
  std::string skip;           // non-empty: why this cell has no projection (then nothing below)
  EstimateOptions opts;       // what was estimated (world_size, pp, grad_accum's global batch)
  int64_t dp = 1, pp = 1, micro_batches = 1;  // micro_batches: per rank per step (pipeline: M)
  double compute_s = 0;       // forward + backward (+ pipeline bubble) + optimizer step
  double comm_s = 0;          // every collective of the step, at its link's alpha-beta cost
  double comm_exposed_s = 0;  // the part compute does not hide
  double step_s = 0;          // compute + exposed communication
  int64_t tokens_per_step = 0;
  double tokens_per_s = 0, mfu = 0;
  int64_t memory_bytes = 0;   // per GPU (the worst rank), the estimator's total
  bool fits = false;
};

// The GPU counts planned for `gpus`: powers of two from 8 up to it, or just `gpus` below 8.
std::vector<int64_t> gpu_counts(int64_t gpus);

// One cell. The compute (memory::micro_batch_s, optimizer_step_s) and the bytes
// (memory::comm_volume) are --fit's; what is overlapped: DDP's bucketed all-reduce (and a
// pipeline's) runs during the last micro-batch's backward, all but its last bucket hidden; FSDP's
// prefetched gathers and background reduce-scatters run beside the whole forward and backward,
// all but the first gather and the last reduce-scatter hidden; ZeRO-1/2's collectives follow the
// backward (ftune's zero.cpp) and a pipeline's hand-offs block their stage, so neither is hidden.
PlanRow plan_row(const model::LlamaConfig& c, const PlanOptions& p, int64_t gpus, Strategy s);
std::vector<PlanRow> plan(const model::LlamaConfig& c, const PlanOptions& p,
                          const std::vector<int64_t>& counts);

}  // namespace ftune::memory
