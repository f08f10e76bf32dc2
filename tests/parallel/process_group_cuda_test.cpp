// ProcessGroup over NCCL at world size 1 on cuda:0 (ctest label gpu): rendezvous on a free port,
// then every collective ftune's strategies use, sync and async, on CUDA tensors. With one rank a
// sum is the tensor itself and a gather or scatter is a copy, so the expected values are known
// exactly; what this checks is that the NCCL backend is built in, connects and runs each call on
// the device, and that the traffic counts see every call. Skipped (GTEST_SKIP) without a GPU.
#include "parallel/process_group.h"

#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <string>

namespace ftune::parallel {
namespace {

bool have_gpu() { return at::hasCUDA() && at::getNumGPUs() > 0; }

std::unique_ptr<ProcessGroup> one_rank_nccl() {
  DistEnv env;  // rank 0 of 1
  env.master_addr = "127.0.0.1";
  env.master_port = 0;  // any free port
  GroupOptions o;
  o.timeout = std::chrono::seconds(60);
  o.device = at::Device(at::kCUDA, 0);
  return ProcessGroup::create(env, o);
}

TEST(ProcessGroupNccl, CollectivesAtWorldSizeOne) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device: the NCCL group was compiled, not run";
  auto pg = one_rank_nccl();
  ASSERT_EQ(pg->size(), 1);
  ASSERT_TRUE(pg->device().is_cuda());
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, 0);
  const at::Tensor ref = at::arange(1000, f32).mul_(0.37);

  // Each collective, blocking and async: with one rank its output equals the input.
  auto copies = [&](const char* what, const std::function<void(at::Tensor&)>& op) {
    at::Tensor out = at::zeros_like(ref);
    op(out);
    EXPECT_TRUE(at::equal(out, ref)) << what;
  };
  copies("all-reduce", [&](at::Tensor& o) { o.copy_(ref); pg->all_reduce(o, "all-reduce test"); });
  copies("async all-reduce", [&](at::Tensor& o) {
    o.copy_(ref);
    pg->all_reduce_async(o, "async all-reduce test").wait();
  });
  copies("broadcast", [&](at::Tensor& o) { o.copy_(ref); pg->broadcast(o, 0, "broadcast test"); });
  copies("all-gather", [&](at::Tensor& o) { pg->all_gather_into(o, ref, "all-gather test"); });
  copies("async all-gather", [&](at::Tensor& o) {
    pg->all_gather_into_async(o, ref, "async all-gather test").wait();
  });
  copies("reduce-scatter",
         [&](at::Tensor& o) { pg->reduce_scatter(o, ref, "reduce-scatter test"); });
  copies("async reduce-scatter", [&](at::Tensor& o) {
    pg->reduce_scatter_async(o, ref, "async reduce-scatter test").wait();
  });

  // bf16 and int64 travel too (FSDP gathers bf16 compute copies, ZeRO counts in int64)
  at::Tensor h = ref.to(at::kBFloat16);
  at::Tensor hg = at::empty_like(h);
  pg->all_gather_into(hg, h, "bf16 all-gather test");
  EXPECT_TRUE(at::equal(hg, h));
  at::Tensor n = at::arange(7, f32.dtype(at::kLong));
  pg->all_reduce(n, "int64 all-reduce test");
  EXPECT_TRUE(at::equal(n, at::arange(7, f32.dtype(at::kLong))));

  pg->barrier("barrier test");
  CommStats st = pg->take_stats();
  EXPECT_EQ(st.calls.at("all_reduce"), 3);
  EXPECT_EQ(st.payload_bytes.at("all_reduce"), 2 * 4000 + 7 * 8);
  EXPECT_EQ(st.wire_bytes.at("all_reduce"), 0);  // 2(n-1)/n of the payload, n = 1
  EXPECT_EQ(st.calls.at("all_gather"), 3);
  EXPECT_EQ(st.calls.at("reduce_scatter"), 2);
  EXPECT_EQ(st.calls.at("barrier"), 1);
  EXPECT_TRUE(pg->take_stats().calls.empty());

  // A CPU tensor handed to the NCCL group is refused before NCCL sees it.
  try {
    pg->all_reduce(at::ones({4}), "cpu tensor test");
    ADD_FAILURE() << "a CPU tensor was accepted by the NCCL group";
  } catch (const std::exception& e) {
    EXPECT_EQ(std::string(e.what()),
              "rank 0: cpu tensor test: tensor on cpu, the group runs on cuda:0");
  }
}

}  // namespace
}  // namespace ftune::parallel
