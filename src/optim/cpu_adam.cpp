// cpu_adamw_step: AVX-512 / AVX2+FMA / scalar bodies of one AdamW update, chosen once by cpuid.
// Rounding follows ATen's CPU fused AdamW kernel (GCC-built, FMA contraction on), measured
// element by element against at::_fused_adamw_: its vector body computes
//   v = fma(c2 * g, g, v * beta2)        and its scalar tail   v = fma(v, beta2, (c2 * g) * g)
// so the tail (the last numel % 8 elements) is computed the tail's way here too. This file is
// built with -ffp-contract=off so that every FMA below is one the source asks for. See cpu_adam.h.
#include "optim/cpu_adam.h"

#include <ATen/Parallel.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define FTUNE_CPU_ADAM_X86 1
#endif

#include <algorithm>
#include <cmath>

namespace ftune::optim {
namespace {

// The update's float constants, rounded from doubles as ATen rounds them.
struct Coeffs {
  float scale;          // grad divisor (has_scale)
  float decay;          // 1 - lr * wd (has_decay)
  float lerp_w;         // m = fma(lerp_w, g - m, lerp_base ? g : m)
  float beta2, c2;      // v = beta2 * v + c2 * g * g
  float bc2_sqrt, eps;  // denom = sqrt(v) / bc2_sqrt + eps
  float neg_step_size;  // p += neg_step_size * m / denom
  bool has_scale, has_decay, lerp_from_grad;
};

Coeffs make_coeffs(const CpuAdamStep& s) {
  // The step count as ATen reads it: from a float32 tensor, into a double.
  const double step = static_cast<float>(s.step);
  const double bc1 = 1 - std::pow(s.beta1, step);
  const double bc2 = 1 - std::pow(s.beta2, step);
  Coeffs c{};
  c.has_scale = s.grad_scale.has_value();
  c.scale = s.grad_scale.value_or(1.0f);
  c.has_decay = s.weight_decay != 0;
  c.decay = static_cast<float>(1 - s.lr * s.weight_decay);
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
inline void adam_element(float& p, float& g, float& m, float& v, const Coeffs& c, bool tail) {
  float gv = g;
  if (c.has_scale) {
    gv = gv / c.scale;
    g = gv;
  }
  float pv = p;
  if (c.has_decay) pv = pv * c.decay;
  const float mv = std::fma(c.lerp_w, gv - m, c.lerp_from_grad ? gv : m);
  const float c2g = c.c2 * gv;
  const float vv = tail ? std::fma(v, c.beta2, c2g * gv) : std::fma(c2g, gv, v * c.beta2);
  const float denom = std::sqrt(vv) / c.bc2_sqrt + c.eps;
  p = pv + (c.neg_step_size * mv) / denom;
  m = mv;
  v = vv;
}

void body_scalar(float* p, float* g, float* m, float* v, int64_t n, const Coeffs& c) {
  for (int64_t i = 0; i < n; ++i) adam_element(p[i], g[i], m[i], v[i], c, false);
}

#ifdef FTUNE_CPU_ADAM_X86
__attribute__((target("avx2,fma"))) void body_avx2(float* p, float* g, float* m, float* v,
                                                   int64_t n, const Coeffs& c) {
  const __m256 scale = _mm256_set1_ps(c.scale), decay = _mm256_set1_ps(c.decay);
  const __m256 lerp_w = _mm256_set1_ps(c.lerp_w), beta2 = _mm256_set1_ps(c.beta2);
  const __m256 c2 = _mm256_set1_ps(c.c2), bc2_sqrt = _mm256_set1_ps(c.bc2_sqrt);
  const __m256 eps = _mm256_set1_ps(c.eps), neg_ss = _mm256_set1_ps(c.neg_step_size);
  for (int64_t i = 0; i < n; i += 8) {  // n is a multiple of 8
    __m256 gv = _mm256_loadu_ps(g + i);
    if (c.has_scale) {
      gv = _mm256_div_ps(gv, scale);
      _mm256_storeu_ps(g + i, gv);
    }
    __m256 pv = _mm256_loadu_ps(p + i);
    if (c.has_decay) pv = _mm256_mul_ps(pv, decay);
    __m256 mv = _mm256_loadu_ps(m + i);
    mv = _mm256_fmadd_ps(lerp_w, _mm256_sub_ps(gv, mv), c.lerp_from_grad ? gv : mv);
    const __m256 c2g = _mm256_mul_ps(c2, gv);
    const __m256 vv = _mm256_fmadd_ps(c2g, gv, _mm256_mul_ps(_mm256_loadu_ps(v + i), beta2));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vv), bc2_sqrt), eps);
    pv = _mm256_add_ps(pv, _mm256_div_ps(_mm256_mul_ps(neg_ss, mv), denom));
    _mm256_storeu_ps(p + i, pv);
    _mm256_storeu_ps(m + i, mv);
    _mm256_storeu_ps(v + i, vv);
  }
}

__attribute__((target("avx512f"))) void body_avx512(float* p, float* g, float* m, float* v,
                                                    int64_t n, const Coeffs& c) {
  const __m512 scale = _mm512_set1_ps(c.scale), decay = _mm512_set1_ps(c.decay);
  const __m512 lerp_w = _mm512_set1_ps(c.lerp_w), beta2 = _mm512_set1_ps(c.beta2);
  const __m512 c2 = _mm512_set1_ps(c.c2), bc2_sqrt = _mm512_set1_ps(c.bc2_sqrt);
  const __m512 eps = _mm512_set1_ps(c.eps), neg_ss = _mm512_set1_ps(c.neg_step_size);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 gv = _mm512_loadu_ps(g + i);
    if (c.has_scale) {
      gv = _mm512_div_ps(gv, scale);
      _mm512_storeu_ps(g + i, gv);
    }
    __m512 pv = _mm512_loadu_ps(p + i);
    if (c.has_decay) pv = _mm512_mul_ps(pv, decay);
    __m512 mv = _mm512_loadu_ps(m + i);
    mv = _mm512_fmadd_ps(lerp_w, _mm512_sub_ps(gv, mv), c.lerp_from_grad ? gv : mv);
    const __m512 c2g = _mm512_mul_ps(c2, gv);
    const __m512 vv = _mm512_fmadd_ps(c2g, gv, _mm512_mul_ps(_mm512_loadu_ps(v + i), beta2));
    const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vv), bc2_sqrt), eps);
    pv = _mm512_add_ps(pv, _mm512_div_ps(_mm512_mul_ps(neg_ss, mv), denom));
    _mm512_storeu_ps(p + i, pv);
    _mm512_storeu_ps(m + i, mv);
    _mm512_storeu_ps(v + i, vv);
  }
  if (i < n) body_scalar(p + i, g + i, m + i, v + i, n - i, c);  // a multiple of 8 remains
}
#endif

using BodyFn = void (*)(float*, float*, float*, float*, int64_t, const Coeffs&);

struct Isa {
  BodyFn body;
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
      return {body_avx512, "avx512"};
    case CpuAdamIsa::kAvx2:
      return {body_avx2, "avx2"};
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
      return {body_scalar, "scalar"};
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
  const BodyFn body = isa_of(s.isa).body;
  at::parallel_for(0, (body_end + kLine - 1) / kLine, kGrainLines, [&](int64_t b, int64_t e) {
    const int64_t lo = b * kLine, hi = std::min(e * kLine, body_end);
    body(param + lo, grad + lo, exp_avg + lo, exp_avg_sq + lo, hi - lo, c);
  });
  for (int64_t i = body_end; i < n; ++i) {
    adam_element(param[i], grad[i], exp_avg[i], exp_avg_sq[i], c, true);
  }
}

bool cpu_adam_supports(CpuAdamIsa isa) { return isa == CpuAdamIsa::kBest || supported(isa); }

const char* cpu_adam_isa() { return isa_of(CpuAdamIsa::kBest).name; }

}  // namespace ftune::optim
