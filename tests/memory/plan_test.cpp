// The scaling planner's arithmetic (src/memory/plan.h) against numbers worked out by hand from the
// formulas of docs/plan.md, Llama-2-7B's published parameter count (6,738,415,616) and the
// datasheet figures; plus the shapes any projection must have (sharding never grows a GPU's
// memory, a ring's time grows with its ranks, the pipeline keeps the global batch).
#include <gtest/gtest.h>

#include "core/error.h"
#include "memory/plan.h"
#include "model/config.h"

namespace ftune::memory {
namespace {

constexpr double kPsi7b = 6738415616.0;

PlanOptions h100_ib() {
  PlanOptions p;
  p.machine = machine_of(gpu_spec("h100-80gb", "test"), interconnect("ib", "test"), true,
                         kDefaultEfficiency);
  return p;
}

TEST(Collectives, RingTimesByHand) {
  // all-reduce of 1 GB over 8 ranks at 100 GB/s, 10 us: 2*7/8 * 0.01 s + 14 * 10 us.
  EXPECT_NEAR(ring_all_reduce_s(1e9, 8, {100e9, 1e-5}), 0.0175 + 0.00014, 1e-12);
  // three all-gathers carrying 1 GB between them over 4 ranks at 50 GB/s, 5 us:
  // 3/4 * 0.02 s + 3 calls * 3 steps * 5 us.
  EXPECT_NEAR(ring_gather_s(1e9, 4, {50e9, 5e-6}, 3), 0.015 + 4.5e-5, 1e-12);
  EXPECT_EQ(ring_all_reduce_s(1e9, 1, {100e9, 1e-5}), 0.0);
  EXPECT_EQ(ring_gather_s(1e9, 1, {100e9, 1e-5}), 0.0);
  EXPECT_DOUBLE_EQ(pipeline_bubble(4, 12), 3.0 / 15.0);
  EXPECT_DOUBLE_EQ(pipeline_bubble(1, 5), 0.0);
}

TEST(Collectives, AllReduceGrowsWithRanksAndTendsToTwiceTheBytes) {
  const Link l{50e9, 5e-6};
  double last = 0;
  for (int64_t n = 2; n <= 1024; n *= 2) {
    const double t = ring_all_reduce_s(4e9, n, l);
    EXPECT_GT(t, last) << n;
    last = t;
  }
  EXPECT_NEAR(ring_all_reduce_s(4e9, 1024, {50e9, 0}), 2 * 4e9 / 50e9, 2 * 4e9 / 50e9 / 1000);
}

TEST(Tables, DatasheetFiguresAndErrors) {
  const Machine m = machine_of(gpu_spec("h100-80gb", "x"), interconnect("ib", "x"), true, 0.4);
  EXPECT_DOUBLE_EQ(m.peak_flops, 989.4e12);
  EXPECT_DOUBLE_EQ(m.flops, 0.4 * 989.4e12);
  EXPECT_EQ(m.memory_bytes, 80'000'000'000);
  EXPECT_DOUBLE_EQ(m.intra.bytes_per_s, 450e9);
  EXPECT_DOUBLE_EQ(m.inter.bytes_per_s, 50e9);
  // A ring inside a node runs at NVLink's rate; one spanning nodes at the fabric's.
  EXPECT_DOUBLE_EQ(m.link_for(8).bytes_per_s, 450e9);
  EXPECT_DOUBLE_EQ(m.link_for(16).bytes_per_s, 50e9);
  const Machine nv = machine_of(gpu_spec("a100-80gb", "x"), interconnect("nvlink", "x"), false, 1);
  EXPECT_DOUBLE_EQ(nv.link_for(1024).bytes_per_s, 300e9);
  EXPECT_DOUBLE_EQ(nv.peak_flops, 19.5e12);
  EXPECT_EQ(gpu_spec("h200", "x").memory_bytes, 141'000'000'000);
  try {
    gpu_spec("h300", "plan: --gpu");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "plan: --gpu: unknown GPU \"h300\" (expected h100-80gb, h200 or a100-80gb)");
  }
  EXPECT_THROW(interconnect("infiniband", "plan: --interconnect"), Error);
}

TEST(Tables, GpuCounts) {
  EXPECT_EQ(gpu_counts(64), (std::vector<int64_t>{8, 16, 32, 64}));
  EXPECT_EQ(gpu_counts(8), (std::vector<int64_t>{8}));
  EXPECT_EQ(gpu_counts(2), (std::vector<int64_t>{2}));
  EXPECT_EQ(gpu_counts(1024).size(), 8u);
}

// Llama-2-7B, bf16, micro-batch 1 x 2048, 16 H100s over InfiniBand, by hand:
//   FLOPs/token f = 6 (Psi - 32000 x 4096) + 12 x 32 x 4096 x 2048 = 42,865,287,168
//   micro-batch: f x 2048 / (0.4 x 989.4e12) + 32 layers x 1e-4 s       = 0.2250216 s
//   optimizer:   32 B x Psi / (0.8 x 3.35e12)                           = 0.0804587 s
//   DDP all-reduce of 4 Psi bytes in 1029 buckets + the scalars' call, 16 ranks span two nodes:
//     30/16 x 4 Psi / 50e9 + 30 x 5 us x 1030                          = 1.1652623 s
//   exposed: all but the backward (2/3 of the micro-batch)             = 1.0152480 s
TEST(PlanRow, DdpLlama2On16H100sByHand) {
  const auto c = model::preset_config("llama-2-7b");
  const PlanRow r = plan_row(c, h100_ib(), 16, Strategy::kDdp);
  ASSERT_TRUE(r.skip.empty()) << r.skip;
  EXPECT_EQ(r.dp, 16);
  EXPECT_NEAR(r.compute_s, 0.2250216 + 0.0804587, 1e-6);
  EXPECT_NEAR(r.comm_s, 1.1652623, 1e-6);
  EXPECT_NEAR(r.comm_exposed_s, 1.0152480, 1e-6);
  EXPECT_NEAR(r.step_s, 1.3207282, 1e-6);
  EXPECT_EQ(r.tokens_per_step, 16 * 2048);
  EXPECT_NEAR(r.tokens_per_s, 24810.55, 0.01);
  EXPECT_NEAR(r.mfu, 42865287168.0 * 24810.5547 / (16 * 989.4e12), 1e-6);
}

// FSDP, same setup: bf16 gathers of every unit forward and backward plus the fp32 gradients'
// reduce-scatter, 8 Psi bytes over 100 collectives (34 + 32 + 34 units), and the norm's scalar:
//   gathers 15/16 x 8 Psi / 50e9 + 15 x 5 us x 100                      = 1.0182623 s
//   exposed: gathers - forward+backward (0.2250216) + 2 x 15 x 5 us       = 0.7933908 s
//   step: 0.2250216 + optimizer / 16 (0.0050287) + 0.7933908            = 1.0234410 s
TEST(PlanRow, FsdpLlama2On16H100sByHand) {
  const auto c = model::preset_config("llama-2-7b");
  const PlanRow r = plan_row(c, h100_ib(), 16, Strategy::kFsdp);
  EXPECT_NEAR(r.comm_s, 1.0182623 + 30 * 5e-6, 1e-6);
  EXPECT_NEAR(r.comm_exposed_s, 0.7933908, 1e-6);
  EXPECT_NEAR(r.step_s, 1.0234410, 1e-6);
  // The ZeRO-3 model states: 16 Psi / 16 bytes per GPU, under the estimator's total.
  EXPECT_GT(r.memory_bytes, static_cast<int64_t>(kPsi7b));
  EXPECT_TRUE(r.fits);
}

TEST(PlanRow, Zero2ExposesEverything) {
  const auto c = model::preset_config("llama-2-7b");
  const PlanRow r = plan_row(c, h100_ib(), 8, Strategy::kZero2);
  // reduce-scatter + all-gather of 4 Psi each inside one node (NVLink 450 GB/s, 3 us), 2 calls,
  // and the norm's scalar all-reduce (14 steps x 3 us).
  EXPECT_NEAR(r.comm_s, 7.0 / 8 * 8 * kPsi7b / 450e9 + 2 * 7 * 3e-6 + 14 * 3e-6, 1e-9);
  EXPECT_DOUBLE_EQ(r.comm_exposed_s, r.comm_s);
}

TEST(PlanRow, PipelineRunsTheSameGlobalBatchWithItsBubble) {
  const auto c = model::preset_config("llama-2-7b");
  PlanOptions p = h100_ib();
  p.grad_accum = 2;
  const PlanRow d = plan_row(c, p, 16, Strategy::kDdp);
  const PlanRow r = plan_row(c, p, 16, Strategy::kPipeline);
  EXPECT_EQ(r.pp, 8);  // the largest power of two <= 8 stages
  EXPECT_EQ(r.dp, 2);
  EXPECT_EQ(r.micro_batches, 16);  // M = grad_accum x P
  EXPECT_EQ(r.tokens_per_step, d.tokens_per_step);
  // compute = (M + P - 1) x one micro-batch (0.2250216 s) / P + the worst stage's optimizer step,
  // about an eighth of the whole model's 0.0804587 s (the stages are balanced by layers).
  const double optimizer = r.compute_s - (16 + 8 - 1) * 0.2250216 / 8;
  EXPECT_GT(optimizer, 0.0804587 / 8 * 0.8);
  EXPECT_LT(optimizer, 0.0804587 / 8 * 1.5);
  p.pp = 32;
  EXPECT_NE(plan_row(c, p, 16, Strategy::kPipeline).skip, "");
}

TEST(PlanRow, GlobalBatchSetsAccumulationOrSkips) {
  const auto c = model::preset_config("llama-2-7b");
  PlanOptions p = h100_ib();
  p.global_batch = 64;
  EXPECT_EQ(plan_row(c, p, 16, Strategy::kZero1).micro_batches, 4);
  EXPECT_EQ(plan_row(c, p, 64, Strategy::kZero1).micro_batches, 1);
  const PlanRow r = plan_row(c, p, 128, Strategy::kZero1);
  EXPECT_EQ(r.skip, "global batch 64 is not a multiple of micro-batch x 128 data-parallel ranks");
}

TEST(PlanRow, MoreGpusNeverGrowFsdpMemoryAndDdpCommGrows) {
  const auto c = model::preset_config("llama-2-13b");
  const PlanOptions p = h100_ib();
  int64_t last_mem = INT64_MAX;
  double last_comm = 0;
  for (int64_t n : gpu_counts(1024)) {
    const PlanRow f = plan_row(c, p, n, Strategy::kFsdp);
    EXPECT_LE(f.memory_bytes, last_mem) << n;
    last_mem = f.memory_bytes;
    const PlanRow d = plan_row(c, p, n, Strategy::kDdp);
    EXPECT_GT(d.comm_s, last_comm) << n;
    last_comm = d.comm_s;
    EXPECT_FALSE(d.fits) << "a full 13B replica with AdamW (16 Psi = 208 GB) fits no 80 GB GPU";
  }
}

TEST(PlanRow, LoraMovesOnlyTheAdapters) {
  const auto c = model::preset_config("llama-2-7b");
  PlanOptions p = h100_ib();
  p.base.lora_r = 8;
  const PlanRow r = plan_row(c, p, 8, Strategy::kDdp);
  // q_proj and v_proj adapters: 32 layers x 2 x 8 x (4096 + 4096) = 4,194,304 fp32 gradients.
  const double bytes = 4.0 * 4194304;
  const int64_t calls = 1 + 1;  // 16.8 MB: one bucket, and the scalars
  EXPECT_NEAR(r.comm_s, 14.0 / 8 * bytes / 450e9 + 14 * 3e-6 * calls, 1e-12);
}

}  // namespace
}  // namespace ftune::memory
