// `ftune plan`: projects a fine-tuning setup to 8..N GPUs for each data-parallel strategy (step
// time, exposed communication, tokens/s, MFU, memory per GPU, fits) with the alpha-beta model of
// src/memory/plan.h, as a table or JSON. Parses and checks flags, resolves the machine (a GPU and
// fabric from the tables, or measured figures for the machine at hand) and prints; the arithmetic
// lives in src/memory. See docs/plan.md.
#include <cstdio>
#include <iostream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "memory/plan.h"
#include "memory/report.h"
#include "model/config.h"
#include "model/hf_io.h"

namespace ftune::cli {
namespace {

struct PlanArgs {
  std::string model, gpu = "h100-80gb", interconnect = "ib", dtype = "bf16", gpu_mem;
  std::vector<std::string> strategies = {"ddp", "zero1", "zero2", "fsdp", "pipeline"};
  std::vector<std::string> lora_targets = {"q_proj", "v_proj"};
  int64_t gpus = 0, lora_r = 0, micro_batch = 1, seq_len = 2048, grad_accum = 1, global_batch = 0;
  int64_t pp = 0, gpus_per_node = 8;
  bool qlora = false, grad_ckpt = false, json = false, given_lora_r = false;
  double efficiency = memory::kDefaultEfficiency, flops = 0, link_bw = 0, latency = -1, mem_bw = 0;
  double gather_bw = 0, overlap = 1;
  double layer_overhead = -1;
};

std::string method(const memory::EstimateOptions& o) {
  return memory::method_name(memory::method_of(o));
}

nlohmann::json link_json(const memory::Link& l) {
  return {{"bytes_per_s", l.bytes_per_s}, {"alpha_s", l.alpha_s},
          {"gather_bytes_per_s", l.gather_bw()}};
}

nlohmann::json plan_json(const model::LlamaConfig& c, const memory::ModelRef& ref,
                         const PlanArgs& a, const memory::PlanOptions& p,
                         const std::vector<memory::PlanRow>& rows) {
  const memory::ParamCounts pc = memory::count_parameters(c, p.base);
  const memory::Machine& m = p.machine;
  nlohmann::json j = {
      {"model", {{"name", ref.name}, {"parameters", pc.total}, {"trainable", pc.trainable}}},
      {"gpu", a.gpu},
      {"interconnect", a.interconnect},
      {"machine",
       {{"flops_per_s", m.flops}, {"peak_flops_per_s", m.peak_flops},
        {"memory_bytes", m.memory_bytes}, {"hbm_bytes_per_s", m.hbm_bytes_per_s},
        {"gpus_per_node", m.gpus_per_node}, {"intra_node", link_json(m.intra)},
        {"inter_node", link_json(m.inter)}, {"overlap", p.overlap}}},
      {"options",
       {{"method", method(p.base)}, {"dtype", p.base.bf16 ? "bf16" : "fp32"},
        {"micro_batch", p.base.micro_batch}, {"seq_len", p.base.seq_len},
        {"grad_ckpt", p.base.grad_ckpt}, {"lora_r", p.base.lora_r},
        {"grad_accum", p.grad_accum}, {"global_batch", p.global_batch}}},
  };
  nlohmann::json out = nlohmann::json::array();
  for (const auto& r : rows) {
    nlohmann::json row = {{"gpus", r.gpus}, {"strategy", memory::strategy_name(r.strategy)}};
    if (!r.skip.empty()) {
      row["skip"] = r.skip;
    } else {
      row.update({{"dp", r.dp}, {"pp", r.pp}, {"micro_batches", r.micro_batches},
                  {"compute_s", r.compute_s}, {"comm_s", r.comm_s},
                  {"comm_exposed_s", r.comm_exposed_s}, {"step_s", r.step_s},
                  {"tokens_per_step", r.tokens_per_step}, {"tokens_per_s", r.tokens_per_s},
                  {"mfu", r.mfu}, {"memory_bytes", r.memory_bytes}, {"fits", r.fits}});
    }
    out.push_back(row);
  }
  j["rows"] = out;
  return j;
}

std::string plan_table(const model::LlamaConfig& c, const memory::ModelRef& ref,
                       const PlanArgs& a, const memory::PlanOptions& p,
                       const std::vector<memory::PlanRow>& rows) {
  std::ostringstream s;
  const memory::Machine& m = p.machine;
  const memory::ParamCounts pc = memory::count_parameters(c, p.base);
  char line[256];
  std::snprintf(line, sizeof line, "%s (%.3g B parameters), %s, micro-batch %lld x seq %lld%s\n",
                ref.name.c_str(), static_cast<double>(pc.total) / 1e9, method(p.base).c_str(),
                static_cast<long long>(p.base.micro_batch), static_cast<long long>(p.base.seq_len),
                p.base.grad_ckpt ? ", checkpointing" : "");
  s << line;
  std::snprintf(line, sizeof line,
                "%s: %.0f TFLOP/s sustained (peak %.0f), %s GB; NVLink %.0f GB/s x %lld GPUs a "
                "node, %s %.1f GB/s, alpha %.0f us\n",
                a.gpu.c_str(), m.flops / 1e12, m.peak_flops / 1e12,
                memory::format_gb(m.memory_bytes).c_str(), m.intra.bytes_per_s / 1e9,
                static_cast<long long>(m.gpus_per_node), a.interconnect.c_str(),
                m.inter.bytes_per_s / 1e9, m.inter.alpha_s * 1e6);
  s << line << "\n";
  std::snprintf(line, sizeof line, "%6s  %-9s %10s %10s %10s %12s %6s %9s  %s\n", "GPUs", "strategy",
                "step s", "comm s", "exposed s", "tokens/s", "MFU", "GB/GPU", "fits");
  s << line;
  for (const auto& r : rows) {
    if (!r.skip.empty()) {
      std::snprintf(line, sizeof line, "%6lld  %-9s  (%s)\n", static_cast<long long>(r.gpus),
                    memory::strategy_name(r.strategy), r.skip.c_str());
    } else {
      std::snprintf(line, sizeof line, "%6lld  %-9s %10.4f %10.4f %10.4f %12.0f %5.1f%% %9s  %s\n",
                    static_cast<long long>(r.gpus), memory::strategy_name(r.strategy), r.step_s,
                    r.comm_s, r.comm_exposed_s, r.tokens_per_s, 100 * r.mfu,
                    memory::format_gb(r.memory_bytes).c_str(), r.fits ? "yes" : "no");
    }
    s << line;
  }
  return s.str();
}

void run_plan(const PlanArgs& a) {
  memory::ModelRef ref;
  const model::LlamaConfig cfg = resolve_model(a.model, "plan", &ref);
  FTUNE_CHECK(a.gpus >= 1 && (a.gpus & (a.gpus - 1)) == 0,
              "plan: --gpus: expected a power of two >= 1, got ", a.gpus);
  const memory::GpuSpec& gpu = memory::gpu_spec(a.gpu, "plan: --gpu");
  const memory::Interconnect& fabric = memory::interconnect(a.interconnect, "plan: --interconnect");
  memory::PlanOptions p;
  p.base.bf16 = model::dtype_from_name(a.dtype, "plan: --dtype") == at::kBFloat16;
  p.base.lora_r = a.given_lora_r ? a.lora_r : a.qlora ? 8 : 0;
  p.base.lora_targets = a.lora_targets;
  p.base.qlora = a.qlora;
  p.base.micro_batch = a.micro_batch;
  p.base.seq_len = a.seq_len;
  p.base.grad_ckpt = a.grad_ckpt;
  try {
    p.base.validate(cfg);  // the flags every cell shares (rank, targets), named by the flag
  } catch (const Error& e) {
    const std::string what = e.what();
    fail("plan: ", what.rfind("memory: ", 0) == 0 ? what.substr(8) : what);
  }
  FTUNE_CHECK(a.pp <= cfg.num_hidden_layers, "plan: --pp: ", a.pp, " stages for ",
              cfg.num_hidden_layers, " decoder layers (every stage needs at least one)");
  p.pp = a.pp;
  p.grad_accum = a.grad_accum;
  p.global_batch = a.global_batch;
  p.strategies.clear();
  for (const auto& name : a.strategies) {
    const memory::Strategy s = memory::parse_strategy(name, "plan: --strategies");
    FTUNE_CHECK(s != memory::Strategy::kSingle && s != memory::Strategy::kModelParallel,
                "plan: --strategies: expected ddp, zero1, zero2, fsdp or pipeline, got ", name);
    p.strategies.push_back(s);
  }
  p.machine = memory::machine_of(gpu, fabric, p.base.bf16, a.efficiency);
  p.machine.gpus_per_node = a.gpus_per_node;
  if (a.flops > 0) p.machine.flops = a.flops;
  if (!a.gpu_mem.empty()) p.machine.memory_bytes = memory::parse_size(a.gpu_mem, "plan: --gpu-mem");
  if (a.mem_bw > 0) p.machine.hbm_bytes_per_s = a.mem_bw;
  // One measured link for the machine at hand (e.g. Gloo over loopback): inside and between nodes.
  if (a.link_bw > 0) p.machine.intra.bytes_per_s = p.machine.inter.bytes_per_s = a.link_bw;
  if (a.latency >= 0) p.machine.intra.alpha_s = p.machine.inter.alpha_s = a.latency;
  if (a.gather_bw > 0) {
    p.machine.intra.gather_bytes_per_s = p.machine.inter.gather_bytes_per_s = a.gather_bw;
  }
  p.overlap = a.overlap;
  if (a.layer_overhead >= 0) p.launch_s_per_layer = a.layer_overhead;

  const auto rows = memory::plan(cfg, p, memory::gpu_counts(a.gpus));
  if (a.json) {
    std::cout << plan_json(cfg, ref, a, p, rows).dump(2) << "\n";
  } else {
    std::cout << plan_table(cfg, ref, a, p, rows);
  }
}

}  // namespace

void register_plan(CLI::App& app) {
  auto a = std::make_shared<PlanArgs>();
  auto* cmd = app.add_subcommand(
      "plan", "Project step time, communication, MFU and memory per GPU of each data-parallel "
              "strategy from 8 to N GPUs (alpha-beta model)");
  cmd->add_option("--model", a->model,
                  "A preset (" + preset_list() + "; any case), an HF model dir or a config.json")
      ->required()
      ->type_name("PRESET|DIR|FILE");
  cmd->add_option("--gpus", a->gpus,
                  "Largest GPU count, a power of two: rows for 8, 16, ... up to it (below 8: it alone)")
      ->required()
      ->type_name("N")
      ->check(int_at_least(1));
  cmd->add_option("--gpu", a->gpu, "h100-80gb (default), h200 or a100-80gb");
  cmd->add_option("--interconnect", a->interconnect,
                  "Between nodes: nvlink (one NVLink domain), ib (default; 400 Gb/s per GPU) or "
                  "ethernet (100 Gb/s per GPU)");
  cmd->add_option("--strategies", a->strategies,
                  "Any of ddp, zero1, zero2, fsdp, pipeline (default: all)")
      ->delimiter(',')
      ->type_name("LIST");
  cmd->add_option("--dtype", a->dtype, "bf16 (default) or fp32");
  auto* lora_r = cmd->add_option("--lora-r", a->lora_r, "LoRA rank; 0 = full fine-tuning (default)")
                     ->type_name("R")
                     ->check(int_at_least(0));
  cmd->add_option("--lora-targets", a->lora_targets,
                  "Adapted linears (default q_proj,v_proj), or all-linear")
      ->delimiter(',')
      ->type_name("NAMES");
  cmd->add_flag("--qlora", a->qlora, "NF4 base under the LoRA adapters (rank 8 unless --lora-r)");
  cmd->add_option("--micro-batch", a->micro_batch, "Rows per GPU per forward, default 1")
      ->type_name("B")
      ->check(int_at_least(1));
  cmd->add_option("--seq-len", a->seq_len, "Tokens per row, default 2048")
      ->type_name("S")
      ->check(int_at_least(1));
  cmd->add_flag("--grad-ckpt", a->grad_ckpt, "Activation checkpointing");
  auto* accum = cmd->add_option("--grad-accum", a->grad_accum,
                                "Micro-batches per GPU per step, default 1 (a pipeline runs this x "
                                "its stages, the same global batch)")
                    ->type_name("A")
                    ->check(int_at_least(1));
  cmd->add_option("--global-batch", a->global_batch,
                  "Rows per step, fixed across GPU counts (instead of --grad-accum)")
      ->type_name("G")
      ->check(int_at_least(1))
      ->excludes(accum);
  cmd->add_option("--pp", a->pp, "Pipeline stages (default: the largest power of two <= 8, the "
                                 "GPUs and the layers)")
      ->type_name("P")
      ->check(int_at_least(1));
  cmd->add_option("--efficiency", a->efficiency,
                  "Sustained share of the GPU's datasheet FLOP/s, in (0, 1] (default 0.4)")
      ->type_name("E")
      ->check(in_zero_one());
  cmd->add_option("--flops-per-gpu,--measured-flops", a->flops,
                  "Measured sustained FLOP/s per GPU (replaces datasheet x --efficiency)")
      ->type_name("F")
      ->check(finite_above_zero());
  cmd->add_option("--interconnect-bw", a->link_bw,
                  "Measured collective bandwidth per GPU in bytes/s, for every link (e.g. Gloo "
                  "over loopback)")
      ->type_name("BYTES_PER_S")
      ->check(finite_above_zero());
  cmd->add_option("--gather-bw", a->gather_bw,
                  "Measured all-gather / reduce-scatter bandwidth in bytes/s, when it differs "
                  "from the all-reduce's (Gloo on CPU)")
      ->type_name("BYTES_PER_S")
      ->check(finite_above_zero());
  cmd->add_option("--overlap", a->overlap,
                  "Share of the hideable communication compute hides, in [0, 1] (default 1; 0 "
                  "where the cores that compute also move the bytes, e.g. Gloo on CPU)")
      ->type_name("F")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--latency", a->latency, "Measured per-message latency in seconds, every link")
      ->type_name("S")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--mem-bw", a->mem_bw,
                  "Sustained memory bandwidth in bytes/s, for the optimizer step (default 0.8 x "
                  "the GPU's HBM)")
      ->type_name("BYTES_PER_S")
      ->check(finite_above_zero());
  cmd->add_option("--layer-overhead", a->layer_overhead,
                  "Fixed seconds per layer per micro-batch (kernel launches), default 1e-4")
      ->type_name("S")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--gpus-per-node", a->gpus_per_node, "GPUs sharing NVLink, default 8")
      ->type_name("N")
      ->check(int_at_least(1));
  cmd->add_option("--gpu-mem", a->gpu_mem, "Memory per GPU for \"fits\" (default: the GPU's)")
      ->type_name("SIZE");
  cmd->add_flag("--json", a->json, "Print JSON instead of the table");
  cmd->callback([a, lora_r] {
    a->given_lora_r = lora_r->count() > 0;
    run_plan(*a);
  });
}

}  // namespace ftune::cli
