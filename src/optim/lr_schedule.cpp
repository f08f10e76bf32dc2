// Warmup + cosine/linear/constant schedules; see lr_schedule.h. The formulas follow
// transformers/optimization.py (_get_*_schedule_with_warmup_lr_lambda) operation for operation.
#include "optim/lr_schedule.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace ftune::optim {

LrSchedule parse_lr_schedule(const std::string& s, const std::string& origin) {
  if (s == "cosine") return LrSchedule::kCosine;
  if (s == "linear") return LrSchedule::kLinear;
  if (s == "constant") return LrSchedule::kConstant;
  fail(origin, ": expected cosine, linear or constant, got \"", s, "\"");
}

double lr_factor(const LrScheduleOptions& o, int64_t step) {
  const double w = static_cast<double>(o.warmup_steps);
  if (step < o.warmup_steps) {
    return static_cast<double>(step) / std::max(1.0, w);
  }
  switch (o.kind) {
    case LrSchedule::kConstant:
      return 1.0;
    case LrSchedule::kLinear:
      return std::max(0.0, static_cast<double>(o.total_steps - step) /
                               static_cast<double>(std::max<int64_t>(1, o.total_steps - o.warmup_steps)));
    case LrSchedule::kCosine: {
      const double num_cycles = 0.5;
      const double progress = static_cast<double>(step - o.warmup_steps) /
                              static_cast<double>(std::max<int64_t>(1, o.total_steps - o.warmup_steps));
      return std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * num_cycles * 2.0 * progress)));
    }
  }
  return 1.0;
}

double lr_at(const LrScheduleOptions& o, int64_t step) { return o.lr * lr_factor(o, step); }

}  // namespace ftune::optim
