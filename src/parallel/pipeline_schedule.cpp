// Pipeline schedules, stage splits and the ideal-machine simulation; see pipeline_schedule.h.
#include "parallel/pipeline_schedule.h"

#include <algorithm>
#include <numeric>

#include "core/error.h"

namespace ftune::parallel {

PipeSchedule parse_pipe_schedule(const std::string& name, const std::string& where) {
  if (name == "naive") return PipeSchedule::kNaive;
  if (name == "gpipe") return PipeSchedule::kGPipe;
  if (name == "1f1b") return PipeSchedule::k1F1B;
  fail(where, ": expected naive, gpipe or 1f1b, got ", name);
}

const char* pipe_schedule_name(PipeSchedule s) {
  switch (s) {
    case PipeSchedule::kNaive: return "naive";
    case PipeSchedule::kGPipe: return "gpipe";
    case PipeSchedule::k1F1B: return "1f1b";
  }
  return "?";
}

std::vector<PipeSlot> stage_order(PipeSchedule s, int64_t stage, int64_t stages,
                                  int64_t micro_batches) {
  FTUNE_CHECK(stages >= 1 && stage >= 0 && stage < stages && micro_batches >= 1,
              "pipeline: stage ", stage, " of ", stages, " with ", micro_batches,
              " micro-batches");
  const int64_t m = micro_batches;
  std::vector<PipeSlot> out;
  out.reserve(2 * m);
  switch (s) {
    case PipeSchedule::kNaive:
      for (int64_t i = 0; i < m; ++i) {
        out.push_back({true, i});
        out.push_back({false, i});
      }
      break;
    case PipeSchedule::kGPipe:
      for (int64_t i = 0; i < m; ++i) out.push_back({true, i});
      for (int64_t i = 0; i < m; ++i) out.push_back({false, i});
      break;
    case PipeSchedule::k1F1B: {
      // The later a stage, the fewer forwards it runs ahead: the last stage alternates at once,
      // so no stage holds more than stages - stage micro-batches' activations.
      const int64_t warmup = std::min(m, stages - stage - 1);
      int64_t f = 0, b = 0;
      while (f < warmup) out.push_back({true, f++});
      while (f < m) {
        out.push_back({true, f++});
        out.push_back({false, b++});
      }
      while (b < m) out.push_back({false, b++});
      break;
    }
  }
  return out;
}

std::vector<int64_t> balanced_split(const std::vector<int64_t>& costs, int64_t parts) {
  const auto n = static_cast<int64_t>(costs.size());
  FTUNE_CHECK(parts >= 1 && parts <= n, "pipeline: ", parts, " stages for ", n,
              " layers: every stage needs at least one layer");
  // The least feasible largest block, by bisection over the cost (blocks filled greedily from
  // the end, so that the first stages, which also hold the embedding, take the fewer layers).
  auto blocks_needed = [&](int64_t cap) {
    int64_t blocks = 1, sum = 0;
    for (int64_t i = n - 1; i >= 0; --i) {
      if (costs[i] > cap) return n + 1;
      if (sum + costs[i] > cap) {
        ++blocks;
        sum = 0;
      }
      sum += costs[i];
    }
    return blocks;
  };
  int64_t lo = *std::max_element(costs.begin(), costs.end());
  int64_t hi = std::accumulate(costs.begin(), costs.end(), int64_t{0});
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (blocks_needed(mid) <= parts) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  // Fill from the end under the cap, leaving at least one layer for every stage before.
  std::vector<int64_t> split(parts + 1, 0);
  split[parts] = n;
  int64_t end = n;
  for (int64_t k = parts - 1; k >= 1; --k) {
    int64_t begin = end - 1, sum = costs[begin];
    while (begin - 1 >= k && sum + costs[begin - 1] <= lo) sum += costs[--begin];
    split[k] = begin;
    end = begin;
  }
  return split;
}

void check_split(const std::vector<int64_t>& split, int64_t layers, int64_t parts,
                 const std::string& where) {
  FTUNE_CHECK(static_cast<int64_t>(split.size()) == parts + 1, where, ": expected ", parts + 1,
              " split points (0, the first layer of each later stage, ", layers, ") for ", parts,
              " stages, got ", split.size());
  FTUNE_CHECK(split.front() == 0 && split.back() == layers, where, ": expected to start at 0 and"
              " end at the layer count ", layers);
  for (size_t k = 1; k < split.size(); ++k) {
    FTUNE_CHECK(split[k] > split[k - 1], where, ": expected strictly increasing points (every"
                " stage needs at least one layer), got ", split[k - 1], " then ", split[k]);
  }
}

double PipeTimeline::bubble() const {
  if (busy.empty() || makespan <= 0) return 0;
  const double total = makespan * static_cast<double>(busy.size());
  return 1.0 - std::accumulate(busy.begin(), busy.end(), 0.0) / total;
}

PipeTimeline simulate(PipeSchedule s, int64_t stages, int64_t micro_batches, double forward_s,
                      double backward_s) {
  const int64_t p = stages, m = micro_batches;
  std::vector<std::vector<PipeSlot>> order(p);
  for (int64_t k = 0; k < p; ++k) order[k] = stage_order(s, k, p, m);
  // done_f[k][i] / done_b[k][i]: when stage k finished micro-batch i's forward / backward (< 0:
  // not yet).
  std::vector<std::vector<double>> done_f(p, std::vector<double>(m, -1)),
      done_b(p, std::vector<double>(m, -1));
  std::vector<size_t> next(p, 0);
  std::vector<double> free_at(p, 0);
  PipeTimeline t;
  t.busy.assign(p, 0);
  t.max_in_flight.assign(p, 0);
  std::vector<int64_t> in_flight(p, 0);
  for (size_t remaining = 2 * p * m; remaining > 0;) {
    // The stage whose next slot can start earliest runs it (ties: the lower stage).
    int64_t best = -1;
    double best_start = 0;
    for (int64_t k = 0; k < p; ++k) {
      if (next[k] == order[k].size()) continue;
      const PipeSlot& sl = order[k][next[k]];
      double ready;
      if (sl.forward) {
        ready = k == 0 ? 0 : done_f[k - 1][sl.micro_batch];
      } else {
        // Its own forward of this micro-batch ran earlier in its order (free_at covers it).
        ready = k == p - 1 ? done_f[k][sl.micro_batch] : done_b[k + 1][sl.micro_batch];
      }
      if (ready < 0) continue;
      const double start = std::max(ready, free_at[k]);
      if (best < 0 || start < best_start) {
        best = k;
        best_start = start;
      }
    }
    FTUNE_CHECK(best >= 0, "pipeline: schedule ", pipe_schedule_name(s), " deadlocks at ", p,
                " stages, ", m, " micro-batches");
    const PipeSlot sl = order[best][next[best]++];
    const double end = best_start + (sl.forward ? forward_s : backward_s);
    (sl.forward ? done_f : done_b)[best][sl.micro_batch] = end;
    in_flight[best] += sl.forward ? 1 : -1;
    t.max_in_flight[best] = std::max(t.max_in_flight[best], in_flight[best]);
    t.busy[best] += end - best_start;
    free_at[best] = end;
    t.makespan = std::max(t.makespan, end);
    t.spans.push_back({best, sl, best_start, end});
    --remaining;
  }
  return t;
}

double theoretical_bubble(int64_t stages, int64_t micro_batches) {
  return static_cast<double>(stages - 1) / static_cast<double>(micro_batches + stages - 1);
}

}  // namespace ftune::parallel
