// cpu_adamw_step: one element function, looped in three copies built by target attributes for
// AVX-512, AVX2+FMA and baseline x86-64 (the compiler vectorizes them: as fast as hand-written
// intrinsics, the step is memory-bound), chosen once by cpuid. Rounding follows ATen's CPU fused
// AdamW kernel (built by GCC, FMA contraction on), measured element by element against
// at::_fused_adamw_: its vector body computes
//   v = fma(c2 * g, g, v * beta2)        and its scalar tail   v = fma(v, beta2, (c2 * g) * g)
// so the tail (the last numel % 8 elements) is computed the tail's way here too. Built with
// -ffp-contract=off, so every FMA is one the source asks for. See cpu_adam.h.
#include "optim/cpu_adam.h"

#include <ATen/Parallel.h>
#if defined(__x86_64__)
#define FTUNE_CPU_ADAM_X86 1
#endif

#include <algorithm>
#include <cmath>

namespace ftune::optim {
namespace {

// The update's float constants, rounded from doubles as ATen rounds them.
struct Coeffs {
  float scale;          // grad divisor (has_scale)
  float decay;          // 1 - lr * wd, or 1 without weight decay (p * 1 is exact)
  float lerp_w;         // m = fma(lerp_w, g - m, lerp_from_grad ? g : m)
  float beta2, c2;      // v = beta2 * v + c2 * g * g
  float bc2_sqrt, eps;  // denom = sqrt(v) / bc2_sqrt + eps
  float neg_step_size;  // p += neg_step_size * m / denom
  bool has_scale, lerp_from_grad;
};

Coeffs make_coeffs(const CpuAdamStep& s) {
  // The step count as ATen reads it: from a float32 tensor, into a double.
  const double step = static_cast<float>(s.step);
  const double bc1 = 1 - std::pow(s.beta1, step);
  const double bc2 = 1 - std::pow(s.beta2, step);
  Coeffs c{};
  c.has_scale = s.grad_scale.has_value();
  c.scale = s.grad_scale.value_or(1.0f);
  c.decay = s.weight_decay != 0 ? static_cast<float>(1 - s.lr * s.weight_decay) : 1.0f;
  // torch's lerp: for a weight w >= 0.5 it starts from the end point, g + (w - 1) * (g - m).
  const float w = static_cast<float>(1 - s.beta1);
  c.lerp_from_grad = !(std::abs(w) < 0.5f);
  c.lerp_w = c.lerp_from_grad ? w - 1.0f : w;
  c.beta2 = static_cast<float>(s.beta2);
  c.c2 = static_cast<float>(1 - s.beta2);
  c.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  c.eps = static_cast<float>(s.eps);
  c.neg_step_size = static_cast<float>(-(s.lr / bc1));
  return c;
}

// One element; `tail` selects the scalar-tail rounding of exp_avg_sq (see the file comment).
// Without weight decay `decay` is 1 (exact); kScale also writes the scaled gradient back.
template <bool kScale>
[[gnu::always_inline]] inline void adam_element(float* p, float* g, float* m, float* v,
                                                const Coeffs& c, bool tail) {
  float gv = *g;
  if constexpr (kScale) {
    gv = gv / c.scale;
    *g = gv;
  }
  const float pv = *p * c.decay;
  const float mv = std::fma(c.lerp_w, gv - *m, c.lerp_from_grad ? gv : *m);
  const float c2g = c.c2 * gv;
  const float vv = tail ? std::fma(*v, c.beta2, c2g * gv) : std::fma(c2g, gv, *v * c.beta2);
  const float denom = std::sqrt(vv) / c.bc2_sqrt + c.eps;
  *p = pv + (c.neg_step_size * mv) / denom;
  *m = mv;
  *v = vv;
}

// The vector body: one loop the compiler vectorizes for each instruction set below (-O3).
template <bool kScale>
[[gnu::always_inline]] inline void adam_loop(float* __restrict p, float* __restrict g,
                                             float* __restrict m, float* __restrict v, int64_t n,
                                             const Coeffs& c) {
  for (int64_t i = 0; i < n; ++i) adam_element<kScale>(p + i, g + i, m + i, v + i, c, false);
}

template <bool kScale>
void body_scalar(float* p, float* g, float* m, float* v, int64_t n, const Coeffs& c) {
  adam_loop<kScale>(p, g, m, v, n, c);
}

#ifdef FTUNE_CPU_ADAM_X86
template <bool kScale>
__attribute__((target("avx2,fma"))) void body_avx2(float* p, float* g, float* m, float* v,
                                                   int64_t n, const Coeffs& c) {
  adam_loop<kScale>(p, g, m, v, n, c);
}

template <bool kScale>
__attribute__((target("avx512f"))) void body_avx512(float* p, float* g, float* m, float* v,
                                                    int64_t n, const Coeffs& c) {
  adam_loop<kScale>(p, g, m, v, n, c);
}
#endif

using BodyFn = void (*)(float*, float*, float*, float*, int64_t, const Coeffs&);

struct Isa {
  BodyFn body[2];  // [has_scale]
  const char* name;
};

bool supported(CpuAdamIsa isa) {
#ifdef FTUNE_CPU_ADAM_X86
  __builtin_cpu_init();
  if (isa == CpuAdamIsa::kAvx512) return __builtin_cpu_supports("avx512f");
  if (isa == CpuAdamIsa::kAvx2) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
#endif
  return isa == CpuAdamIsa::kScalar;
}

Isa isa_of(CpuAdamIsa isa) {
  switch (isa) {
#ifdef FTUNE_CPU_ADAM_X86
    case CpuAdamIsa::kAvx512:
      return {{body_avx512<false>, body_avx512<true>}, "avx512"};
    case CpuAdamIsa::kAvx2:
      return {{body_avx2<false>, body_avx2<true>}, "avx2"};
#endif
    case CpuAdamIsa::kBest: {
      static const Isa best = [] {
        for (CpuAdamIsa i : {CpuAdamIsa::kAvx512, CpuAdamIsa::kAvx2}) {
          if (supported(i)) return isa_of(i);
        }
        return isa_of(CpuAdamIsa::kScalar);
      }();
      return best;
    }
    default:
      return {{body_scalar<false>, body_scalar<true>}, "scalar"};
  }
}

// ATen's fused AdamW leaves numel % 8 elements to its scalar tail: its kernel is registered for
// the AVX2 slot only (REGISTER_DISPATCH leaves AVX512 to fall back to it), 8 floats wide.
constexpr int64_t kTorchVectorFloats = 8;

}  // namespace

void cpu_adamw_step(float* param, float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                    const CpuAdamStep& s) {
  if (n <= 0) return;
  const Coeffs c = make_coeffs(s);
  const int64_t body_end = n - n % kTorchVectorFloats;
  // Threads get whole 64-byte lines (16 floats) so no two write the same cache line; 32K floats
  // (128 KB of each of the four arrays) is the least worth waking a thread for.
  constexpr int64_t kLine = 16, kGrainLines = 2048;
  const BodyFn body = isa_of(s.isa).body[c.has_scale];
  at::parallel_for(0, (body_end + kLine - 1) / kLine, kGrainLines, [&](int64_t b, int64_t e) {
    const int64_t lo = b * kLine, hi = std::min(e * kLine, body_end);
    body(param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo, hi - lo, c);
  });
  for (int64_t i = body_end; i < n; ++i) {
    if (c.has_scale) {
      adam_element<true>(param + i, grad + i, exp_avg + i, exp_avg_sq + i, c, true);
    } else {
      adam_element<false>(param + i, grad + i, exp_avg + i, exp_avg_sq + i, c, true);
    }
  }
}

bool cpu_adam_supports(CpuAdamIsa isa) { return isa == CpuAdamIsa::kBest || supported(isa); }

const char* cpu_adam_isa() { return isa_of(CpuAdamIsa::kBest).name; }

}  // namespace ftune::optim
