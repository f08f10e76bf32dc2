// Pipeline schedules and stage splits without any process group: every schedule runs each
// micro-batch's forward and backward once per stage in an order the dependencies allow; the
// ideal-machine bubble equals the closed forms ((P - 1) / (M + P - 1) for GPipe and 1F1B,
// (P - 1) / P for naive); 1F1B holds at most P - stage micro-batches of activations, GPipe M;
// balanced splits against a brute-force search over every split.
#include "parallel/pipeline_schedule.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <set>

#include "core/error.h"

namespace ftune::parallel {
namespace {

constexpr PipeSchedule kAll[] = {PipeSchedule::kNaive, PipeSchedule::kGPipe,
                                 PipeSchedule::k1F1B};

TEST(PipelineSchedule, EveryStageRunsEachSlotOnceAndBackwardAfterForward) {
  for (PipeSchedule s : kAll) {
    for (int64_t p : {1, 2, 3, 4}) {
      for (int64_t m : {1, 2, 4, 8}) {
        for (int64_t k = 0; k < p; ++k) {
          const auto order = stage_order(s, k, p, m);
          ASSERT_EQ(order.size(), static_cast<size_t>(2 * m));
          std::set<std::pair<bool, int64_t>> seen;
          std::set<int64_t> forwarded;
          for (const PipeSlot& sl : order) {
            EXPECT_TRUE(seen.insert({sl.forward, sl.micro_batch}).second);
            if (sl.forward) {
              forwarded.insert(sl.micro_batch);
            } else {
              EXPECT_TRUE(forwarded.count(sl.micro_batch)) << pipe_schedule_name(s);
            }
          }
        }
      }
    }
  }
}

TEST(PipelineSchedule, OneF1BStartsWithPMinusStageMinusOneForwards) {
  const auto order = stage_order(PipeSchedule::k1F1B, 0, 4, 8);
  const std::vector<PipeSlot> head(order.begin(), order.begin() + 5);
  const std::vector<PipeSlot> want = {{true, 0}, {true, 1}, {true, 2}, {true, 3}, {false, 0}};
  EXPECT_EQ(head, want);
  const auto last = stage_order(PipeSchedule::k1F1B, 3, 4, 8);
  EXPECT_EQ(last[0], (PipeSlot{true, 0}));
  EXPECT_EQ(last[1], (PipeSlot{false, 0}));
}

TEST(PipelineSchedule, SimulatedBubbleEqualsTheClosedForms) {
  for (int64_t p : {1, 2, 3, 4}) {
    for (int64_t m : {1, 4, 8}) {
      for (auto [f, b] : {std::pair{1.0, 1.0}, std::pair{1.0, 2.0}}) {
        const double gpipe = simulate(PipeSchedule::kGPipe, p, m, f, b).bubble();
        const double one_f = simulate(PipeSchedule::k1F1B, p, m, f, b).bubble();
        const double naive = simulate(PipeSchedule::kNaive, p, m, f, b).bubble();
        EXPECT_NEAR(gpipe, theoretical_bubble(p, m), 1e-12) << p << " " << m;
        EXPECT_NEAR(one_f, theoretical_bubble(p, m), 1e-12) << p << " " << m;
        EXPECT_NEAR(naive, static_cast<double>(p - 1) / p, 1e-12) << p << " " << m;
        // The makespan of GPipe / 1F1B: (M + P - 1) slots of forward + backward.
        EXPECT_NEAR(simulate(PipeSchedule::k1F1B, p, m, f, b).makespan, (m + p - 1) * (f + b),
                    1e-12);
      }
    }
  }
}

TEST(PipelineSchedule, ActivationsInFlight) {
  const int64_t p = 4, m = 8;
  const PipeTimeline one_f = simulate(PipeSchedule::k1F1B, p, m);
  const PipeTimeline gpipe = simulate(PipeSchedule::kGPipe, p, m);
  const PipeTimeline naive = simulate(PipeSchedule::kNaive, p, m);
  for (int64_t k = 0; k < p; ++k) {
    EXPECT_EQ(one_f.max_in_flight[k], p - k);
    EXPECT_EQ(gpipe.max_in_flight[k], m);
    EXPECT_EQ(naive.max_in_flight[k], 1);
  }
}

TEST(PipelineSchedule, SpansRespectDependencies) {
  for (PipeSchedule s : kAll) {
    const int64_t p = 3, m = 5;
    const PipeTimeline t = simulate(s, p, m);
    ASSERT_EQ(t.spans.size(), static_cast<size_t>(2 * p * m));
    auto end_of = [&](int64_t stage, bool fwd, int64_t mb) {
      for (const auto& sp : t.spans) {
        if (sp.stage == stage && sp.slot.forward == fwd && sp.slot.micro_batch == mb) return sp.end;
      }
      return std::numeric_limits<double>::infinity();
    };
    std::vector<double> stage_free(p, 0);
    for (const auto& sp : t.spans) {
      const int64_t k = sp.stage, mb = sp.slot.micro_batch;
      if (sp.slot.forward && k > 0) EXPECT_GE(sp.start, end_of(k - 1, true, mb));
      if (!sp.slot.forward) {
        EXPECT_GE(sp.start, end_of(k, true, mb));
        if (k < p - 1) EXPECT_GE(sp.start, end_of(k + 1, false, mb));
      }
    }
    for (int64_t k = 0; k < p; ++k) {  // a stage runs one slot at a time
      std::vector<std::pair<double, double>> iv;
      for (const auto& sp : t.spans) {
        if (sp.stage == k) iv.emplace_back(sp.start, sp.end);
      }
      std::sort(iv.begin(), iv.end());
      for (size_t i = 1; i < iv.size(); ++i) EXPECT_GE(iv[i].first, iv[i - 1].second);
    }
  }
}

// The least largest block over every split of `costs` into `parts` non-empty blocks.
int64_t best_max_block(const std::vector<int64_t>& costs, int64_t parts) {
  const auto n = static_cast<int64_t>(costs.size());
  int64_t best = std::numeric_limits<int64_t>::max();
  std::vector<int64_t> cut;
  std::function<void(int64_t, int64_t, int64_t)> go = [&](int64_t begin, int64_t left,
                                                          int64_t worst) {
    if (left == 1) {
      int64_t sum = 0;
      for (int64_t i = begin; i < n; ++i) sum += costs[i];
      best = std::min(best, std::max(worst, sum));
      return;
    }
    int64_t sum = 0;
    for (int64_t end = begin + 1; end <= n - (left - 1); ++end) {
      sum += costs[end - 1];
      go(end, left - 1, std::max(worst, sum));
    }
  };
  go(0, parts, 0);
  return best;
}

TEST(PipelineSplit, BalancedSplitIsOptimalAndValid) {
  const std::vector<std::vector<int64_t>> cases = {
      {5, 5, 5, 5}, {1, 2, 3, 4, 5, 6, 7}, {10, 1, 1, 1, 1, 10}, {3, 3, 3, 3, 3}, {7}, {2, 9, 2}};
  for (const auto& costs : cases) {
    const auto n = static_cast<int64_t>(costs.size());
    for (int64_t parts = 1; parts <= n; ++parts) {
      const auto split = balanced_split(costs, parts);
      ASSERT_NO_THROW(check_split(split, n, parts, "split"));
      int64_t worst = 0;
      for (int64_t k = 0; k < parts; ++k) {
        int64_t sum = 0;
        for (int64_t i = split[k]; i < split[k + 1]; ++i) sum += costs[i];
        worst = std::max(worst, sum);
      }
      EXPECT_EQ(worst, best_max_block(costs, parts)) << n << " layers, " << parts << " parts";
    }
  }
  // Equal layers over uneven stages: the earlier stages take the fewer layers.
  EXPECT_EQ(balanced_split({1, 1, 1, 1, 1, 1, 1}, 3), (std::vector<int64_t>{0, 1, 4, 7}));
}

TEST(PipelineSplit, Errors) {
  EXPECT_THROW(balanced_split({1, 1}, 3), Error);
  EXPECT_THROW(check_split({0, 2}, 4, 1, "parallel.split"), Error);
  EXPECT_THROW(check_split({0, 2, 2, 4}, 4, 3, "parallel.split"), Error);
  EXPECT_THROW(check_split({0, 2, 4}, 4, 3, "parallel.split"), Error);
  try {
    parse_pipe_schedule("2f2b", "parallel.schedule");
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "parallel.schedule: expected naive, gpipe or 1f1b, got 2f2b");
  }
}

}  // namespace
}  // namespace ftune::parallel
