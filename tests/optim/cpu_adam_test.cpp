// cpu_adamw_step against at::_fused_adamw_ (torch.optim.AdamW(fused=True)'s CPU kernel) on the
// same data: bit-identical params, exp_avg, exp_avg_sq and scaled gradients over several steps,
// for sizes around the vector width (tails) and one with several threads' worth of lines, with
// and without weight decay and grad_scale, on 1 and 2 threads, with each instruction set this CPU
// has, and for beta1 < 0.5 (torch's lerp from the other end).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <optional>
#include <string>
#include <tuple>

#include "optim/cpu_adam.h"

using ftune::optim::cpu_adamw_step;
using ftune::optim::CpuAdamIsa;
using ftune::optim::CpuAdamStep;

namespace {

struct State {
  at::Tensor p, m, v;
};

// `steps` updates of both implementations from the same start; checks every step.
void expect_same_as_fused(int64_t n, double beta1, double wd, std::optional<float> scale,
                          int threads, CpuAdamIsa isa) {
  at::set_num_threads(threads);
  at::manual_seed(n);
  State mine{at::randn({n}), at::zeros({n}), at::zeros({n})};
  State ref{mine.p.clone(), at::zeros({n}), at::zeros({n})};
  const double lrs[] = {1e-2, 3e-3, 5e-2, 1e-3};
  for (int k = 0; k < 4; ++k) {
    // Gradient sizes that vary across steps, so exp_avg_sq rounds in different binades.
    const at::Tensor grad = at::randn({n}) * (k % 2 ? 0.01 : 3.0);
    at::Tensor g_mine = grad.clone(), g_ref = grad.clone();
    CpuAdamStep s;
    s.lr = lrs[k];
    s.beta1 = beta1;
    s.weight_decay = wd;
    s.step = k + 1;
    s.grad_scale = scale;
    s.isa = isa;
    cpu_adamw_step(mine.p.data_ptr<float>(), g_mine.data_ptr<float>(), mine.m.data_ptr<float>(),
                   mine.v.data_ptr<float>(), n, s);
    at::_fused_adamw_({ref.p}, {g_ref}, {ref.m}, {ref.v}, {}, {at::scalar_tensor(k + 1.0)},
                      s.lr, s.beta1, s.beta2, wd, s.eps, /*amsgrad=*/false, /*maximize=*/false,
                      scale ? std::optional<at::Tensor>(at::scalar_tensor(*scale)) : std::nullopt);
    for (auto [name, a, b] :
         {std::tuple{"param", mine.p, ref.p}, std::tuple{"exp_avg", mine.m, ref.m},
          std::tuple{"exp_avg_sq", mine.v, ref.v}, std::tuple{"grad", g_mine, g_ref}}) {
      ASSERT_TRUE(at::equal(a, b)) << name << " step " << k + 1 << ": "
                                   << (a != b).sum().item<int64_t>() << " of " << n
                                   << " differ, max abs " << (a - b).abs().max().item<float>();
    }
  }
}

}  // namespace

using Case = std::tuple<CpuAdamIsa, int64_t, double, std::optional<float>, int>;
class CpuAdam : public ::testing::TestWithParam<Case> {};

TEST_P(CpuAdam, BitIdenticalToFusedAdamW) {
  const auto [isa, n, wd, scale, threads] = GetParam();
  if (!ftune::optim::cpu_adam_supports(isa)) GTEST_SKIP() << "instruction set not on this CPU";
  expect_same_as_fused(n, 0.9, wd, scale, threads, isa);
}

INSTANTIATE_TEST_SUITE_P(
    IsaSizeDecayScaleThreads, CpuAdam,
    ::testing::Combine(::testing::Values(CpuAdamIsa::kAvx512, CpuAdamIsa::kAvx2,
                                         CpuAdamIsa::kScalar),
                       ::testing::Values(1, 7, 15, 16, 17, 1000003), ::testing::Values(0.0, 0.1),
                       ::testing::Values(std::nullopt, std::optional<float>(2.5f)),
                       ::testing::Values(1, 2)));

TEST(CpuAdamLerp, SmallBeta1StartsFromTheGradientAsTorchDoes) {
  expect_same_as_fused(1003, 0.3, 0.1, std::nullopt, 2, CpuAdamIsa::kBest);
}

TEST(CpuAdamIsaName, NamesAKnownInstructionSet) {
  const std::string isa = ftune::optim::cpu_adam_isa();
  EXPECT_TRUE(isa == "avx512" || isa == "avx2" || isa == "scalar") << isa;
}
