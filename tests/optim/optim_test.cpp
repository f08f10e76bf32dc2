// AdamW against the update written out by hand (Loshchilov & Hutter's decoupled decay with
// Adam's bias corrections), LR schedules against their closed forms, and gradient clipping
// against a hand-computed norm. The PyTorch/transformers parity of the whole loop is checked by
// tests/python/test_train.py.
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "optim/adamw.h"
#include "optim/grad_clip.h"
#include "optim/lr_schedule.h"

using namespace ftune::optim;

namespace {

// Hand-written AdamW on doubles: decoupled decay, then the bias-corrected Adam step.
struct RefAdamW {
  double m = 0, v = 0;
  int t = 0;
  double step(double p, double g, double lr, const AdamWOptions& o, bool decay) {
    ++t;
    if (decay) p *= 1 - lr * o.weight_decay;
    m = o.beta1 * m + (1 - o.beta1) * g;
    v = o.beta2 * v + (1 - o.beta2) * g * g;
    const double m_hat = m / (1 - std::pow(o.beta1, t));
    const double v_hat = v / (1 - std::pow(o.beta2, t));
    return p - lr * m_hat / (std::sqrt(v_hat) + o.eps);
  }
};

}  // namespace

class AdamWImpl : public ::testing::TestWithParam<bool> {};

TEST_P(AdamWImpl, MatchesHandComputationWithDecayOnMatricesOnly) {
  AdamWOptions o;
  o.fused = GetParam();
  o.beta1 = 0.8;
  o.beta2 = 0.95;
  o.eps = 1e-6;
  o.weight_decay = 0.1;
  at::Tensor w = at::tensor({0.5, -1.0, 2.0, 0.25}, at::kDouble).view({2, 2}).requires_grad_();
  at::Tensor b = at::tensor({1.5, -0.5}, at::kDouble).requires_grad_();
  AdamW opt({{"w", w}, {"b", b}}, o);
  EXPECT_TRUE(opt.decays(0));
  EXPECT_FALSE(opt.decays(1));

  std::vector<double> ref_w = {0.5, -1.0, 2.0, 0.25}, ref_b = {1.5, -0.5};
  std::vector<RefAdamW> rw(4), rb(2);
  const double lrs[] = {1e-2, 5e-3, 2e-2, 1e-3, 7e-3};
  for (int s = 0; s < 5; ++s) {
    // Gradients that change sign and size across steps.
    at::Tensor gw = at::tensor({0.3 * (s + 1), -0.2, 0.05 * s - 0.1, 1.0 / (s + 1)}, at::kDouble);
    at::Tensor gb = at::tensor({-0.7 + 0.3 * s, 0.01 * s}, at::kDouble);
    w.mutable_grad() = gw.view({2, 2}).clone();
    b.mutable_grad() = gb.clone();
    opt.step(lrs[s]);
    for (int i = 0; i < 4; ++i) ref_w[i] = rw[i].step(ref_w[i], gw[i].item<double>(), lrs[s], o, true);
    for (int i = 0; i < 2; ++i) ref_b[i] = rb[i].step(ref_b[i], gb[i].item<double>(), lrs[s], o, false);
  }
  auto wf = w.detach().flatten();
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(wf[i].item<double>(), ref_w[i], 1e-12) << i;
  for (int i = 0; i < 2; ++i) EXPECT_NEAR(b[i].item<double>(), ref_b[i], 1e-12) << i;
}

INSTANTIATE_TEST_SUITE_P(FusedAndUnfused, AdamWImpl, ::testing::Bool());

TEST(AdamW, FusedEqualsUnfusedWithinFp32Rounding) {
  auto run = [](bool fused) {
    at::manual_seed(0);
    at::Tensor w = at::randn({16, 8}).requires_grad_();
    at::Tensor b = at::randn({8}).requires_grad_();
    AdamWOptions o;
    o.weight_decay = 0.1;
    o.fused = fused;
    AdamW opt({{"w", w}, {"b", b}}, o);
    for (int s = 0; s < 6; ++s) {
      w.mutable_grad() = at::randn({16, 8});
      b.mutable_grad() = at::randn({8});
      opt.step(1e-2);
    }
    return at::cat({w.detach().flatten(), b.detach()});
  };
  at::Tensor a = run(true), u = run(false);
  at::manual_seed(0);
  at::Tensor init = at::cat({at::randn({16, 8}).flatten(), at::randn({8})});
  EXPECT_GT((a - init).abs().max().item<double>(), 1e-2);  // the updates did move the weights
  EXPECT_LT((a - u).abs().max().item<double>(), 1e-6);
}

TEST(AdamW, Fp32WithinRoundingOfDoubleReference) {
  AdamWOptions o;
  o.weight_decay = 0.01;
  at::Tensor w = at::full({3, 3}, 0.7f).requires_grad_();
  AdamW opt({{"w", w}}, o);
  RefAdamW r;
  double ref = 0.7;
  for (int s = 0; s < 20; ++s) {
    const double g = std::sin(0.7 * s) * 0.3;
    w.mutable_grad() = at::full({3, 3}, static_cast<float>(g));
    opt.step(1e-3);
    ref = r.step(ref, static_cast<float>(g), 1e-3, o, true);
  }
  EXPECT_NEAR(w[0][0].item<double>(), ref, 1e-6 * std::abs(ref));
}

TEST(AdamW, SkipsParamsWithoutGradAndZeroGradDropsThem) {
  at::Tensor a = at::ones({2, 2}).requires_grad_(), b = at::ones({2}).requires_grad_();
  AdamW opt({{"a", a}, {"b", b}}, {});
  a.mutable_grad() = at::ones({2, 2});
  opt.step(0.1);
  EXPECT_LT(a[0][0].item<float>(), 1.0f);
  EXPECT_EQ(b[0].item<float>(), 1.0f);
  auto st = opt.state();
  EXPECT_EQ(st.size(), 6u);
  EXPECT_EQ(st[2].first, "a.step");
  EXPECT_EQ(st[2].second.item<int64_t>(), 1);
  EXPECT_EQ(st[5].second.item<int64_t>(), 0);
  opt.zero_grad();
  EXPECT_FALSE(a.grad().defined());
}

TEST(AdamW, StateRoundTripContinuesBitExactly) {
  auto make = [] { return at::arange(6, at::kFloat).view({2, 3}).requires_grad_(); };
  auto grad = [](int s) { return at::linspace(-1, 1, 6).view({2, 3}) * (s + 1) * 0.37; };
  AdamWOptions o;
  o.weight_decay = 0.05;
  at::Tensor x = make();
  AdamW a({{"x", x}}, o);
  for (int s = 0; s < 6; ++s) {
    x.mutable_grad() = grad(s);
    a.step(1e-2);
  }
  at::Tensor y = make();
  AdamW b1({{"y", y}}, o);
  for (int s = 0; s < 3; ++s) {
    y.mutable_grad() = grad(s);
    b1.step(1e-2);
  }
  std::map<std::string, at::Tensor> saved;
  for (auto& [k, v] : b1.state()) saved[k.replace(0, 1, "z")] = v.clone();
  at::Tensor z = y.detach().clone().requires_grad_();
  AdamW b2({{"z", z}}, o);
  b2.load_state(saved, "test");
  for (int s = 3; s < 6; ++s) {
    z.mutable_grad() = grad(s);
    b2.step(1e-2);
  }
  EXPECT_TRUE(at::equal(x, z));
  saved.erase("z.step");
  EXPECT_THROW(b2.load_state(saved, "test"), ftune::Error);
}

TEST(LrSchedule, ClosedForms) {
  LrScheduleOptions o;
  o.lr = 2.0;
  o.warmup_steps = 10;
  o.total_steps = 110;
  o.kind = LrSchedule::kCosine;
  EXPECT_DOUBLE_EQ(lr_factor(o, 0), 0.0);
  EXPECT_DOUBLE_EQ(lr_factor(o, 5), 0.5);
  EXPECT_DOUBLE_EQ(lr_factor(o, 10), 1.0);
  EXPECT_NEAR(lr_factor(o, 35), 0.5 * (1 + std::sqrt(0.5)), 1e-15);
  EXPECT_NEAR(lr_factor(o, 60), 0.5, 1e-15);
  EXPECT_NEAR(lr_factor(o, 110), 0.0, 1e-15);
  EXPECT_NEAR(lr_at(o, 60), 1.0, 1e-15);
  o.kind = LrSchedule::kLinear;
  EXPECT_DOUBLE_EQ(lr_factor(o, 3), 0.3);
  EXPECT_DOUBLE_EQ(lr_factor(o, 60), 0.5);
  EXPECT_DOUBLE_EQ(lr_factor(o, 100), 0.1);
  EXPECT_DOUBLE_EQ(lr_factor(o, 110), 0.0);
  EXPECT_DOUBLE_EQ(lr_factor(o, 130), 0.0);  // clamped, never negative
  o.kind = LrSchedule::kConstant;
  EXPECT_DOUBLE_EQ(lr_factor(o, 7), 0.7);
  EXPECT_DOUBLE_EQ(lr_factor(o, 10), 1.0);
  EXPECT_DOUBLE_EQ(lr_factor(o, 1000), 1.0);
  o.warmup_steps = 0;
  o.kind = LrSchedule::kCosine;
  EXPECT_DOUBLE_EQ(lr_factor(o, 0), 1.0);  // no warmup: the first step uses the peak lr
  EXPECT_THROW(parse_lr_schedule("step", "x"), ftune::Error);
}

TEST(GradClip, NormAndScaling) {
  at::Tensor a = at::zeros({2}).requires_grad_(), b = at::zeros({1, 2}).requires_grad_();
  at::Tensor c = at::zeros({3}).requires_grad_();  // no grad: ignored
  auto set = [&] {
    a.mutable_grad() = at::tensor({3.0f, 0.0f});
    b.mutable_grad() = at::tensor({0.0f, 4.0f}).view({1, 2});
  };
  set();
  EXPECT_NEAR(clip_grad_norm({a, b, c}, 0.0), 5.0, 1e-6);  // off: only measures
  EXPECT_EQ(a.grad()[0].item<float>(), 3.0f);
  EXPECT_NEAR(clip_grad_norm({a, b, c}, 10.0), 5.0, 1e-6);  // below max: unchanged
  EXPECT_EQ(b.grad()[0][1].item<float>(), 4.0f);
  EXPECT_NEAR(clip_grad_norm({a, b, c}, 1.0), 5.0, 1e-6);
  EXPECT_NEAR(a.grad()[0].item<float>(), 3.0 / (5.0 + 1e-6), 1e-7);
  EXPECT_NEAR(b.grad()[0][1].item<float>(), 4.0 / (5.0 + 1e-6), 1e-7);
  EXPECT_NEAR(grad_norm({a, b}).item<double>(), 1.0, 1e-6);
}
