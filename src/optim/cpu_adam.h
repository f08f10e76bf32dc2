// AdamW step over one contiguous fp32 array in host memory, for optimizer state kept on the CPU
// (parallel.offload: optimizer), as DeepSpeed's cpu_adam: split across at::parallel_for threads,
// vectorized for AVX-512 or AVX2+FMA picked at run time (baseline x86-64 otherwise), so one binary
// runs on any x86-64. It rounds exactly where ATen's CPU at::_fused_adamw_ does, so results are
// bit-identical to torch.optim.AdamW(fused=True); speed is the same too (both are memory-bound,
// 28 bytes per parameter): it adds a step on raw buffers, without tensors or the dispatcher.
// Defines CpuAdamIsa, CpuAdamStep, cpu_adamw_step, cpu_adam_supports, cpu_adam_isa.
#pragma once

#include <cstdint>
#include <optional>

namespace ftune::optim {

// The instruction sets cpu_adamw_step has a body for; kBest is the widest this CPU runs.
enum class CpuAdamIsa { kBest, kAvx512, kAvx2, kScalar };

struct CpuAdamStep {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;      // decoupled: param *= 1 - lr * weight_decay
  int64_t step = 1;               // the step count including this update (1 on the first)
  std::optional<float> grad_scale;  // each gradient is divided by it first and written back
                                    // (at::_fused_adamw_'s grad_scale: 1 / clip factor)
  CpuAdamIsa isa = CpuAdamIsa::kBest;  // tests and benchmarks pin one (it must be supported)
};

// One AdamW update of `n` elements in place: param, exp_avg, exp_avg_sq (and grad when
// s.grad_scale is set); the four arrays must not overlap. Uses at::get_num_threads() threads.
void cpu_adamw_step(float* param, float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                    const CpuAdamStep& s);

// Whether this CPU runs `isa`'s body; the name of kBest's choice: "avx512", "avx2" or "scalar".
bool cpu_adam_supports(CpuAdamIsa isa);
const char* cpu_adam_isa();

}  // namespace ftune::optim
