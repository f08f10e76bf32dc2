// The estimator's arithmetic against numbers worked out by hand (docs/memory.md), the published
// parameter counts, and activation bytes that torch's autograd saved for transformers' layer
// (tests/python/test_memory_estimate.py measures those live); the --fit search and its `ftune
// train --set` lines, which must parse back into the same setup.
#include <gtest/gtest.h>

#include "config/train_config.h"
#include "core/error.h"
#include "memory/estimate.h"
#include "memory/fit.h"
#include "memory/report.h"
#include "model/config.h"

namespace ftune::memory {
namespace {

model::LlamaConfig small_config() {
  model::LlamaConfig c;
  c.vocab_size = 50;
  c.hidden_size = 96;
  c.intermediate_size = 160;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  return c;
}

TEST(Params, EveryPresetMatchesTheConfigCount) {
  for (const auto& name : model::preset_names()) {
    const model::LlamaConfig c = model::preset_config(name);
    EXPECT_EQ(count_parameters(c, {}).total, c.num_parameters()) << name;
  }
  // Published counts.
  EXPECT_EQ(count_parameters(model::preset_config("Llama-2-7B"), {}).total, 6738415616);
  EXPECT_EQ(count_parameters(model::preset_config("Llama-3-8B"), {}).total, 8030261248);
  EXPECT_EQ(count_parameters(model::preset_config("TinyLlama-1.1B"), {}).total, 1100048384);
  EXPECT_EQ(count_parameters(model::preset_config("SmolLM2-135M"), {}).total, 134515008);
}

TEST(Params, LoraIsRankTimesInPlusOut) {
  EstimateOptions o;
  o.lora_r = 16;
  o.lora_targets = {"all-linear"};
  const model::LlamaConfig c = model::preset_config("llama-2-7b");
  // 4 attention linears 4096 -> 4096, gate/up 4096 -> 11008, down 11008 -> 4096.
  const int64_t per_layer = 16 * (4 * 8192 + 3 * (4096 + 11008));
  EXPECT_EQ(count_parameters(c, o).lora_per_layer, per_layer);
  EXPECT_EQ(count_parameters(c, o).trainable, 32 * per_layer);  // 39,976,960 as PEFT reports
  o.lora_targets = {"q_proj", "v_proj"};
  EXPECT_EQ(count_parameters(c, o).trainable, 32 * 16 * 2 * 8192);
}

TEST(Nf4, BytesAreBitsandbytesLayout) {
  const int64_t n = 4096 * 4096, blocks = n / 64;
  EXPECT_EQ(nf4_bytes(n, 64, false), n / 2 + 4 * blocks + 64);
  EXPECT_EQ(nf4_bytes(n, 64, true), n / 2 + blocks + 4 * (blocks / 256) + 1024 + 4 + 64);
  // 4 + 8/64 + 32/(64*256) bits per parameter, plus the per-weight tables.
  EXPECT_NEAR(8.0 * nf4_bytes(n, 64, true) / n, 4.127, 0.001);
  EXPECT_NEAR(8.0 * nf4_bytes(n, 64, false) / n, 4.5, 0.001);
  EXPECT_EQ(nf4_bytes(100, 64, true), 50 + 2 + 4 + 1024 + 4 + 64);  // partial blocks round up
}

TEST(ZeroStates, PaperFormulas) {
  const int64_t psi = 1000, n = 3, shard = 334;  // ceil(1000 / 3)
  const auto s0 = zero_model_states(psi, n, 0, true, Optimizer::kAdamW);
  EXPECT_EQ(s0.total(), 16 * psi);
  EXPECT_EQ(s0.weights, 2 * psi);
  EXPECT_EQ(s0.master_weights + s0.optimizer_states, 12 * psi);
  EXPECT_EQ(zero_model_states(psi, n, 1, true, Optimizer::kAdamW).total(), 4 * psi + 12 * shard);
  EXPECT_EQ(zero_model_states(psi, n, 2, true, Optimizer::kAdamW).total(), 2 * psi + 14 * shard);
  EXPECT_EQ(zero_model_states(psi, n, 3, true, Optimizer::kAdamW).total(), 16 * shard);
  // fp32: 4 + 4 + 8, no master; SGD: K = 8 mixed (master, momentum), 4 in fp32.
  EXPECT_EQ(zero_model_states(psi, n, 0, false, Optimizer::kAdamW).total(), 16 * psi);
  EXPECT_EQ(zero_model_states(psi, n, 0, false, Optimizer::kAdamW).master_weights, 0);
  EXPECT_EQ(zero_model_states(psi, n, 0, true, Optimizer::kSgd).total(), 12 * psi);
  EXPECT_EQ(zero_model_states(psi, n, 2, false, Optimizer::kSgd).total(), 4 * psi + 8 * shard);
}

// Measured: bytes of the distinct storages autograd saved for one of transformers' decoder layers
// (torch 2.11, CPU, SDPA), layer 2 of 2 minus layer 1 of 1, batch 2 x 40 tokens.
TEST(Activations, MatchWhatAutogradSaves) {
  const model::LlamaConfig c = small_config();
  EstimateOptions o;
  o.micro_batch = 2;
  o.seq_len = 40;
  auto per_layer = [&](const EstimateOptions& x) { return layer_activation_bytes_per_token(c, x) * 80; };
  o.bf16 = false;
  EXPECT_EQ(per_layer(o), 483200);  // full fp32
  o.bf16 = true;
  EXPECT_EQ(per_layer(o), 350080);  // full, bf16 autocast over fp32 weights
  o.lora_r = 8;
  o.lora_targets = {"all-linear"};
  EXPECT_EQ(per_layer(o), 312960);  // bf16 base, every linear adapted
  o.lora_targets = {"q_proj", "v_proj"};
  EXPECT_EQ(per_layer(o), 219520);
  o.bf16 = false;
  o.lora_targets = {"all-linear"};
  EXPECT_EQ(per_layer(o), 439680);  // fp32 base
  o.lora_r = 4;
  o.lora_targets = {"q_proj", "v_proj", "down_proj"};
  EXPECT_EQ(per_layer(o), 394880);
}

TEST(Estimate, TotalIsTheLargestOfThreeMoments) {
  const model::LlamaConfig c = model::preset_config("smollm2-135m");
  EstimateOptions o;
  o.strategy = Strategy::kZero1;
  o.world_size = 4;
  const Estimate e = estimate(c, o);
  const Breakdown& b = e.rank;
  const int64_t psi = c.num_parameters(), shard = (psi + 3) / 4;
  const int64_t persistent = b.states.total() + b.frozen_base + b.ftune_extra + b.overhead;
  // ZeRO-1 in bf16: the bf16 gradients and ftune's fp32 .grad are held from the backward on; the
  // head's (tied: the embedding's) fp32 gradient is the backward's first; the embedding's own
  // fresh gradient joins it at the end.
  const int64_t emb = 4 * int64_t{c.vocab_size} * c.hidden_size;
  EXPECT_EQ(b.grad_timed, 2 * psi + 2 * psi);
  EXPECT_EQ(b.head_grad, emb);
  EXPECT_EQ(b.backward_end_extra, emb);
  // The MLP backward's two [T, f] bf16 gradients.
  EXPECT_EQ(b.backward_temps, 2 * 2 * 2048 * int64_t{c.intermediate_size});
  EXPECT_EQ(b.total(), std::max({persistent - b.grad_timed + b.activations + b.logits +
                                     b.gathered_params + b.comm_buffers + b.backward_temps + emb,
                                 persistent + emb + b.gathered_params + b.comm_buffers,
                                 persistent + b.sync_buffers, persistent + b.step_buffers}));
  EXPECT_EQ(b.states.total(), 4 * psi + 12 * shard);
  // The flat sum while the gradients are held; then a shard to send and the gathered flat
  // parameters (NCCL: into ftune's buffer); zero1 keeps its reduced gradients, so none are freed.
  EXPECT_EQ(b.sync_buffers, 4 * shard * 4);
  EXPECT_EQ(b.step_buffers, 4 * shard * 4 + 4 * shard);
  EXPECT_EQ(b.step_released, 0);
  // On the CPU, Gloo's all-gather adds its own flat output.
  o.cuda = false;
  EXPECT_EQ(estimate(c, o).rank.step_buffers, 2 * 4 * shard * 4 + 4 * shard);
  o.cuda = true;
  // zero2 frees the full gradients (ftune's fp32 .grad) in the sync and keeps its shard's fp32 sum.
  o.strategy = Strategy::kZero2;
  const Breakdown z = estimate(c, o).rank;
  EXPECT_EQ(z.grad_timed, 4 * psi);
  EXPECT_EQ(z.step_released, 4 * psi - 4 * shard);
  const int64_t zp = z.states.total() + z.frozen_base + z.ftune_extra + z.overhead;
  EXPECT_EQ(z.total(), std::max({zp - z.grad_timed + z.activations + z.logits + z.gathered_params +
                                     z.comm_buffers + z.backward_temps + emb,
                                 zp + emb + z.gathered_params + z.comm_buffers,
                                 zp + 4 * shard * 4, zp - (4 * psi - 4 * shard) + z.step_buffers}));
  // Checkpointing keeps each layer's fp32 input plus one layer recomputed.
  o.grad_ckpt = true;
  const Estimate k = estimate(c, o);
  EXPECT_EQ(k.rank.activations - e.rank.activations,
            30 * 4 * 576 * 2048 + e.act_per_layer - 30 * e.act_per_layer);
}

TEST(Estimate, ChunkedLossIsFarBelowFullLogits) {
  const model::LlamaConfig c = model::preset_config("llama-3-8b");
  EstimateOptions o;
  o.micro_batch = 2;
  const Estimate e = estimate(c, o);
  // bf16 logits + fp32 + fp32 grad, and the head's bf16 cast and bf16 weight-gradient product.
  const int64_t head_casts = 2 * 2 * 128256 * 4096;
  EXPECT_EQ(e.logits_full, 2 * 2048 * 128256 * int64_t{10} + head_casts);
  // What grows with tokens x vocabulary is one 2^24-logit chunk instead of all of them.
  EXPECT_LT(e.logits_chunked - head_casts, (e.logits_full - head_casts) / 10);
  o.chunked_loss = false;
  EXPECT_EQ(estimate(c, o).rank.logits, e.logits_full);
}

TEST(Estimate, OffloadMovesMasterAndOptimizerToTheHost) {
  const model::LlamaConfig c = model::preset_config("tinyllama-1.1b");
  EstimateOptions o;
  o.strategy = Strategy::kFsdp;
  o.world_size = 2;
  const Estimate on_gpu = estimate(c, o);
  o.offload_optimizer = true;
  const Estimate off = estimate(c, o);
  EXPECT_EQ(off.rank.states.master_weights + off.rank.states.optimizer_states, 0);
  const int64_t shard = (c.num_parameters() + 1) / 2;
  EXPECT_EQ(off.host_bytes, 12 * shard + 4 * shard);
  EXPECT_EQ(on_gpu.rank.total() - off.rank.total(), 12 * shard);
}

TEST(Estimate, PipelineReportsTheLargestStage) {
  const model::LlamaConfig c = model::preset_config("llama-2-7b");
  EstimateOptions o;
  o.strategy = Strategy::kPipeline;
  o.world_size = 8;
  o.pp = 4;
  const Estimate e = estimate(c, o);
  EXPECT_EQ(e.stage_split, (std::vector<int64_t>{0, 8, 16, 24, 32}));
  ASSERT_EQ(e.stage_totals.size(), 4u);
  // 1F1B: stage 0 holds 4 micro-batches, and the embedding.
  EXPECT_EQ(e.stage, 0);
  EXPECT_EQ(e.in_flight, 4);
  EXPECT_EQ(e.trainable_on_rank, 8 * e.params.per_layer + e.params.embedding);
  EXPECT_EQ(e.rank.activations, 8 * e.act_per_layer * 4);
  o.strategy = Strategy::kModelParallel;
  o.world_size = 4;
  const Estimate mp = estimate(c, o);
  EXPECT_EQ(mp.in_flight, 1);
  EXPECT_EQ(mp.stage, 3);  // one micro-batch each: the head and the loss tip the last stage
}

TEST(Estimate, BadInputNamesTheFlag) {
  const model::LlamaConfig c = model::preset_config("llama-2-7b");
  auto error_of = [&](EstimateOptions o) -> std::string {
    try {
      estimate(c, o);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EstimateOptions o;
  o.strategy = Strategy::kPipeline;
  o.world_size = 6;
  o.pp = 4;
  EXPECT_EQ(error_of(o), "memory: --world-size: 6 is not divisible by --pp 4");
  o = {};
  o.world_size = 2;
  EXPECT_NE(error_of(o).find("memory: --world-size: --strategy single runs one rank"), std::string::npos);
  o = {};
  o.micro_batch = -1;
  EXPECT_EQ(error_of(o), "memory: --micro-batch: expected an integer >= 1, got -1");
  o = {};
  o.strategy = Strategy::kDdp;
  o.world_size = 2;
  o.offload_optimizer = true;
  EXPECT_NE(error_of(o).find("memory: --offload:"), std::string::npos);
  o = {};
  o.qlora = true;
  EXPECT_NE(error_of(o).find("memory: --qlora:"), std::string::npos);
  o = {};
  o.lora_r = 8;
  o.lora_targets = {"qkv"};
  EXPECT_NE(error_of(o).find("memory: --lora-targets: unknown module 'qkv'"), std::string::npos);
}

TEST(Size, ParsesUnits) {
  EXPECT_EQ(parse_size("80GB", "x"), 80000000000);
  EXPECT_EQ(parse_size("24GiB", "x"), int64_t{24} << 30);
  EXPECT_EQ(parse_size("81920MiB", "x"), int64_t{80} << 30);
  EXPECT_EQ(parse_size("1.5 TB", "x"), 1500000000000);
  EXPECT_EQ(parse_size("80g", "x"), 80000000000);
  for (const char* bad : {"", "abc", "-5GB", "80XB", "0", "GB", "nan", "inf"}) {
    EXPECT_THROW(parse_size(bad, "memory: --gpu-mem"), Error) << bad;
  }
}

TEST(Fit, BestFitsAndIsFastest) {
  const model::LlamaConfig c = model::preset_config("llama-3-8b");
  FitOptions f;
  f.gpu_mem = parse_size("24GB", "x");
  f.gpus = 2;
  f.base.lora_r = 8;
  const FitResult r = fit(c, f);
  ASSERT_FALSE(r.fitting.empty());
  for (const Candidate& x : r.fitting) EXPECT_LE(x.est.rank.total(), f.gpu_mem);
  for (size_t i = 1; i < r.fitting.size(); ++i) {
    EXPECT_GE(r.fitting[i - 1].time.tokens_per_s(), r.fitting[i].time.tokens_per_s());
  }
  // The search covers every method and (with 2 GPUs) every multi-GPU strategy ftune runs.
  // methods x micro-batches x checkpointing x (ddp, zero1/zero2/fsdp with and without offload,
  // pipeline, mp)
  EXPECT_EQ(r.searched, 3 * 7 * 2 * (1 + 2 + 2 + 2 + 1 + 1));
}

TEST(Fit, NothingFitsGivesTheClosest) {
  const model::LlamaConfig c = model::preset_config("llama-2-70b");
  FitOptions f;
  f.gpu_mem = parse_size("8GB", "x");
  f.gpus = 1;
  f.base.lora_r = 8;
  const FitResult r = fit(c, f);
  EXPECT_TRUE(r.fitting.empty());
  EXPECT_EQ(method_of(r.closest.opts), Method::kQlora);  // the smallest it can get
  EXPECT_TRUE(r.closest.opts.grad_ckpt);
  EXPECT_EQ(r.closest.opts.micro_batch, 1);
}

// The printed overrides are ftune train config keys that give back the recommended setup.
TEST(Fit, TrainOverridesParseBackIntoTheSameSetup) {
  const std::string yaml = "model: {path: x}\ndata: {train: t.jsonl}\ntraining: {steps: 1}\n";
  for (const char* s : {"single", "ddp", "zero1", "zero2", "fsdp", "pipeline", "model_parallel"}) {
    for (Method m : {Method::kFull, Method::kLora, Method::kQlora}) {
      EstimateOptions o;
      o.strategy = parse_strategy(s, "x");
      o.world_size = o.strategy == Strategy::kSingle ? 1 : 4;
      o.pp = o.strategy == Strategy::kModelParallel || o.strategy == Strategy::kPipeline ? 4 : 1;
      o.lora_r = m == Method::kFull ? 0 : 16;
      o.lora_targets = {"q_proj", "down_proj"};
      o.qlora = m == Method::kQlora;
      o.micro_batch = 4;
      o.seq_len = 1024;
      o.grad_ckpt = true;
      o.bf16 = m != Method::kLora;
      o.offload_optimizer = zero_stage(o.strategy) > 0;
      const config::TrainConfig t = config::parse_train_config(yaml, "t.yaml", train_overrides(o, "/m"));
      t.validate();
      EXPECT_EQ(t.model.path, "/m");
      const EstimateOptions back = options_from_train_config(t, o.world_size);
      EXPECT_EQ(strategy_name(back.strategy), std::string(s));
      EXPECT_EQ(back.world_size, o.world_size);
      EXPECT_EQ(back.pp, o.pp);
      EXPECT_EQ(back.lora_r, o.lora_r);
      EXPECT_EQ(back.lora_targets, o.lora() ? o.lora_targets : EstimateOptions{}.lora_targets);
      EXPECT_EQ(back.qlora, o.qlora);
      EXPECT_EQ(back.micro_batch, 4);
      EXPECT_EQ(back.seq_len, 1024);
      EXPECT_TRUE(back.grad_ckpt);
      EXPECT_EQ(back.bf16, o.bf16);
      EXPECT_EQ(back.offload_optimizer, o.offload_optimizer);
    }
  }
}

}  // namespace
}  // namespace ftune::memory
