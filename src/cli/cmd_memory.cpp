// `ftune memory`: the VRAM estimate of a fine-tuning setup per rank (src/memory/estimate.h), as a
// table or JSON, or with --fit the fastest configuration that fits a GPU (src/memory/fit.h) and
// the `ftune train --set` lines that run it. Parses and checks flags only; the arithmetic and the
// rendering live in src/memory. See docs/memory.md.
#include <algorithm>
#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "memory/fit.h"
#include "memory/report.h"
#include "model/config.h"
#include "model/hf_io.h"

namespace ftune::cli {
namespace {

struct MemoryArgs {
  std::string model, strategy = "single", dtype = "bf16", optimizer = "adamw", offload = "none";
  std::string gpu_mem, device = "cuda";
  std::vector<std::string> lora_targets = {"q_proj", "v_proj"};
  int64_t world_size = 1, pp = 0, lora_r = 0, micro_batch = 1, grad_accum = 1, seq_len = 2048;
  int64_t gpus = 1;
  bool qlora = false, grad_ckpt = false, json = false, fit = false, full_logits = false;
  bool packing = false;
  double target_fraction = 1.0, lora_dropout = 0;
  // Which flags were given (for --fit's search dimensions and --pp's default).
  bool given_strategy = false, given_world_size = false, given_micro_batch = false;
  bool given_lora_r = false, given_ckpt = false, given_offload = false, given_qlora = false;
};

void run_memory(const MemoryArgs& a) {
  memory::ModelRef ref;
  const model::LlamaConfig cfg = resolve_model(a.model, "memory", &ref);
  memory::EstimateOptions o;
  o.strategy = memory::parse_strategy(a.strategy, "memory: --strategy");
  o.bf16 = model::dtype_from_name(a.dtype, "memory: --dtype") == at::kBFloat16;
  FTUNE_CHECK(a.optimizer == "adamw" || a.optimizer == "sgd",
              "memory: --optimizer: expected adamw or sgd, got \"", a.optimizer, "\"");
  o.optimizer = a.optimizer == "adamw" ? memory::Optimizer::kAdamW : memory::Optimizer::kSgd;
  FTUNE_CHECK(a.offload == "optimizer" || a.offload == "none",
              "memory: --offload: expected optimizer (or none), got \"", a.offload, "\"");
  o.offload_optimizer = a.offload == "optimizer";
  o.world_size = a.world_size;
  // Pipeline and model_parallel default to one stage per rank.
  const bool staged = o.strategy == memory::Strategy::kPipeline ||
                      o.strategy == memory::Strategy::kModelParallel;
  o.pp = a.pp > 0 ? a.pp : staged ? a.world_size : 1;
  // QLoRA without a rank takes ftune's lora.r default.
  o.lora_r = a.given_lora_r ? a.lora_r : a.qlora ? 8 : 0;
  o.lora_targets = a.lora_targets;
  o.lora_dropout = a.lora_dropout;
  FTUNE_CHECK(a.device == "cuda" || a.device == "cpu",
              "memory: --device: expected cuda or cpu, got \"", a.device, "\"");
  o.cuda = a.device == "cuda";
  o.qlora = a.qlora;
  o.micro_batch = a.micro_batch;
  o.grad_accum = a.grad_accum;
  o.seq_len = a.seq_len;
  o.grad_ckpt = a.grad_ckpt;
  o.chunked_loss = !a.full_logits;
  o.packed_mask = a.packing;
  o.target_fraction = a.target_fraction;
  const int64_t gpu_mem = a.gpu_mem.empty() ? 0 : memory::parse_size(a.gpu_mem, "memory: --gpu-mem");

  if (!a.fit) {
    const memory::Estimate e = memory::estimate(cfg, o);
    if (a.json) {
      std::cout << memory::estimate_json(cfg, ref, o, e, gpu_mem).dump(2) << "\n";
    } else {
      std::cout << memory::estimate_table(cfg, ref, o, e, gpu_mem);
    }
    return;
  }
  FTUNE_CHECK(gpu_mem > 0, "memory: --fit: needs --gpu-mem (the memory of one GPU, e.g. 24GB)");
  FTUNE_CHECK(!a.given_world_size, "memory: --world-size: --fit takes the GPU count from --gpus");
  FTUNE_CHECK(!a.given_ckpt && !a.given_offload,
              "memory: ", a.given_ckpt ? "--grad-ckpt" : "--offload",
              ": --fit searches activation checkpointing and offload itself");
  memory::FitOptions f;
  f.gpu_mem = gpu_mem;
  f.gpus = a.gpus;
  f.base = o;
  f.base.lora_r = a.given_lora_r ? a.lora_r : 8;
  if (a.given_qlora) f.methods = {memory::Method::kQlora};
  if (a.given_micro_batch) f.micro_batches = {a.micro_batch};
  if (a.given_strategy) {
    const auto& runnable = memory::fit_strategies();
    FTUNE_CHECK(std::find(runnable.begin(), runnable.end(), o.strategy) != runnable.end(),
                "memory: --strategy: --fit recommends only what ftune train runs (single, ddp, "
                "zero1, zero2, fsdp, model_parallel), got ", a.strategy);
    f.strategies = {o.strategy};
  }
  // Checks the flags that every candidate shares (targets, rank, seq-len) once, with their names.
  memory::EstimateOptions probe = f.base;
  probe.strategy = memory::Strategy::kSingle;
  probe.world_size = 1;
  probe.pp = 1;
  probe.validate(cfg);
  const memory::FitResult r = memory::fit(cfg, f);
  FTUNE_CHECK(r.searched > 0, "memory: --strategy: ", a.strategy, " cannot run on --gpus ", a.gpus,
              " (single takes one GPU, the others several; model_parallel at most one per layer)");
  if (a.json) {
    std::cout << memory::fit_json(cfg, ref, f, r).dump(2) << "\n";
  } else {
    std::cout << memory::fit_text(cfg, ref, f, r);
  }
}

}  // namespace

void register_memory(CLI::App& app) {
  auto a = std::make_shared<MemoryArgs>();
  auto* cmd = app.add_subcommand(
      "memory", "Estimate the GPU memory of a fine-tuning setup per rank, or (--fit) find the "
                "fastest setup that fits");
  cmd->add_option("--model", a->model,
                  "A preset (" + preset_list() + "; any case), an HF model dir or a config.json")
      ->required()
      ->type_name("PRESET|DIR|FILE");
  auto* strategy = cmd->add_option("--strategy", a->strategy,
                                    "single, ddp, zero1, zero2, fsdp, pipeline or model_parallel "
                                    "(default single; with --fit: search only this one)");
  auto* world = cmd->add_option("--world-size", a->world_size, "Ranks (GPUs), default 1")
                    ->type_name("N")
                    ->check(int_at_least(1));
  cmd->add_option("--pp", a->pp,
                  "Pipeline / model_parallel stages (default: --world-size); N / P ranks per stage")
      ->type_name("P")
      ->check(int_at_least(1));
  cmd->add_option("--dtype", a->dtype,
                  "bf16 (default: bf16 autocast over fp32 master weights; a bf16 frozen base with "
                  "LoRA) or fp32");
  cmd->add_option("--optimizer", a->optimizer, "adamw (default) or sgd (with momentum)");
  auto* lora_r = cmd->add_option("--lora-r", a->lora_r,
                                 "LoRA rank; 0 = full fine-tuning (default; with --qlora or --fit: 8)")
                     ->type_name("R")
                     ->check(int_at_least(0));
  cmd->add_option("--lora-targets", a->lora_targets,
                  "Adapted linears: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj or "
                  "all-linear (default q_proj,v_proj)")
      ->delimiter(',')
      ->type_name("NAMES");
  cmd->add_option("--lora-dropout", a->lora_dropout,
                  "Dropout on the adapters' inputs, in [0, 1) (default 0): each adapter then keeps "
                  "a mask and its own dropped input for the backward")
      ->type_name("P");
  cmd->add_option("--device", a->device,
                  "cuda (default) or cpu: where the run trains (dropout's mask is one byte per "
                  "element on CUDA, four on the CPU)")
      ->type_name("cuda|cpu");
  auto* qlora = cmd->add_flag("--qlora", a->qlora,
                              "NF4 base (blocksize 64, double quantization) under the LoRA adapters");
  auto* mb = cmd->add_option("--micro-batch", a->micro_batch, "Rows per rank per step, default 1")
                 ->type_name("B")
                 ->check(int_at_least(1));
  cmd->add_option("--grad-accum", a->grad_accum,
                  "Micro-batches accumulated per optimizer step, default 1 (past the first, the "
                  "gradients are held during each forward)")
      ->type_name("A")
      ->check(int_at_least(1));
  cmd->add_option("--seq-len", a->seq_len, "Tokens per row, default 2048")
      ->type_name("S")
      ->check(int_at_least(1));
  auto* ckpt = cmd->add_flag("--grad-ckpt", a->grad_ckpt, "Activation checkpointing");
  auto* offload = cmd->add_option("--offload", a->offload,
                                  "optimizer: master weights and optimizer state in CPU memory "
                                  "(zero1, zero2, fsdp)")
                      ->type_name("optimizer");
  cmd->add_option("--target-fraction", a->target_fraction,
                  "Share of the positions that are loss targets, in (0, 1] (default 1: all; "
                  "response-only data has fewer): the chunked loss holds the targets only")
      ->type_name("F");
  cmd->add_flag("--packing", a->packing,
                "Packed rows with a per-document attention mask (ftune train's data.packing): "
                "SDPA keeps a [B, 1, S, S] copy of the mask per layer");
  cmd->add_flag("--full-logits", a->full_logits,
                "Count full [B, S, V] logits and their gradient instead of ftune's chunked loss");
  cmd->add_option("--gpu-mem", a->gpu_mem, "Memory of one GPU, e.g. 80GB, 24GiB (GB = 10^9 bytes)")
      ->type_name("SIZE");
  cmd->add_flag("--json", a->json, "Print JSON instead of the table");
  cmd->add_flag("--fit", a->fit,
                "Search strategy, full/LoRA/QLoRA, micro-batch, checkpointing and offload for the "
                "fastest setup that fits --gpu-mem on --gpus GPUs");
  cmd->add_option("--gpus", a->gpus, "GPUs for --fit, default 1")
      ->type_name("N")
      ->check(int_at_least(1));
  cmd->callback([a, strategy, world, lora_r, qlora, mb, ckpt, offload] {
    a->given_strategy = strategy->count() > 0;
    a->given_world_size = world->count() > 0;
    a->given_lora_r = lora_r->count() > 0;
    a->given_qlora = qlora->count() > 0;
    a->given_micro_batch = mb->count() > 0;
    a->given_ckpt = ckpt->count() > 0;
    a->given_offload = offload->count() > 0;
    run_memory(*a);
  });
}

}  // namespace ftune::cli
