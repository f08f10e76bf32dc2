// Learning-rate schedules: linear warmup, then cosine, linear or constant, exactly as
// transformers' get_{cosine,linear,constant}_schedule_with_warmup under torch's LambdaLR: the
// optimizer step with 0-based index k uses lr * factor(k). With warmup the first step's lr is 0,
// as in the HF Trainer. Defines LrScheduleOptions, lr_factor, lr_at.
#pragma once

#include <cstdint>
#include <string>

namespace ftune::optim {

enum class LrSchedule { kCosine, kLinear, kConstant };
LrSchedule parse_lr_schedule(const std::string& s, const std::string& origin);

struct LrScheduleOptions {
  LrSchedule kind = LrSchedule::kCosine;
  double lr = 5e-5;            // peak learning rate
  int64_t warmup_steps = 0;    // linear ramp 0 -> lr over these steps
  int64_t total_steps = 1;     // decay reaches 0 here (cosine, linear)
};

// Multiplier of lr for 0-based step index `step` (transformers' lr_lambda(current_step)).
double lr_factor(const LrScheduleOptions& o, int64_t step);
// lr * lr_factor(step), computed as LambdaLR does.
double lr_at(const LrScheduleOptions& o, int64_t step);

}  // namespace ftune::optim
