// ggml block formats -> float32, matching gguf-py's numpy dequantizers (gguf/quants.py) bit for bit.
// Each kernel decodes one block and performs exactly the float32 operations numpy performs, in the
// same order (e.g. Q4_1 is (d * q) + m with two roundings). This file is compiled with
// -ffp-contract=off so the compiler cannot fuse them into an FMA and change the last bit.
// Defines ggml_type_traits() and ggml_dequantize() declared in gguf.h.
#include <ATen/Parallel.h>

#include <cstring>

#include "core/error.h"
#include "io/gguf.h"

namespace ftune::io {
namespace {

constexpr int kQK = 256;  // super-block size of the K-quants (QK_K)

// IEEE half -> float, exact (subnormals scaled, inf/NaN payload kept as numpy's software path does).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    float f = static_cast<float>(mant) * 0x1p-24f;  // exact: mant < 2^10
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
}

inline uint32_t u32_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

constexpr int8_t kIq4nlValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                     1,    13,   25,  38,  53,  69,  89,  113};

// Q4_0: d(f16) qs[16]; element j < 16 is the low nibble of qs[j], j >= 16 the high nibble of qs[j-16].
void deq_q4_0(const uint8_t* b, float* y) {
  const float d = f16_at(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>((qs[j] & 0x0f) - 8);
    y[j + 16] = d * static_cast<float>((qs[j] >> 4) - 8);
  }
}

// Q4_1: d(f16) m(f16) qs[16]; value = d * q + m.
void deq_q4_1(const uint8_t* b, float* y) {
  const float d = f16_at(b), m = f16_at(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>(qs[j] & 0x0f) + m;
    y[j + 16] = d * static_cast<float>(qs[j] >> 4) + m;
  }
}

// Q5_0: d(f16) qh(u32: bit j is the 5th bit of element j) qs[16]; value = d * (q - 16).
void deq_q5_0(const uint8_t* b, float* y) {
  const float d = f16_at(b);
  const uint32_t qh = u32_at(b + 2);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 32; ++j) {
    const int lo = j < 16 ? (qs[j] & 0x0f) : (qs[j - 16] >> 4);
    const int q = lo | static_cast<int>(((qh >> j) & 1u) << 4);
    y[j] = d * static_cast<float>(q - 16);
  }
}

// Q5_1: d(f16) m(f16) qh(u32) qs[16]; value = d * q + m.
void deq_q5_1(const uint8_t* b, float* y) {
  const float d = f16_at(b), m = f16_at(b + 2);
  const uint32_t qh = u32_at(b + 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 32; ++j) {
    const int lo = j < 16 ? (qs[j] & 0x0f) : (qs[j - 16] >> 4);
    const int q = lo | static_cast<int>(((qh >> j) & 1u) << 4);
    y[j] = d * static_cast<float>(q) + m;
  }
}

// Q8_0: d(f16) qs[32] (int8); value = q * d.
void deq_q8_0(const uint8_t* b, float* y) {
  const float d = f16_at(b);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
}

// Q2_K: scales[16] (lo nibble scale, hi nibble min) qs[64] d(f16) dmin(f16); 2-bit values, 16 per scale.
void deq_q2_k(const uint8_t* b, float* y) {
  const uint8_t* scales = b;
  const uint8_t* qs = b + 16;
  const float d = f16_at(b + 80), dmin = f16_at(b + 82);
  for (int s = 0; s < 16; ++s) {
    const float dl = d * static_cast<float>(scales[s] & 0x0f);
    const float ml = dmin * static_cast<float>(scales[s] >> 4);
    for (int i = 0; i < 16; ++i) {
      const int e = s * 16 + i;
      const int q = (qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
      y[e] = dl * static_cast<float>(q) - ml;
    }
  }
}

// Q3_K: hmask[32] qs[64] scales[12] (16 packed 6-bit scales) d(f16); q = low 2 bits - 4 * !hbit.
void deq_q3_k(const uint8_t* b, float* y) {
  const uint8_t* hmask = b;
  const uint8_t* qs = b + 32;
  const uint8_t* sc = b + 96;
  const float d = f16_at(b + 108);
  for (int s = 0; s < 16; ++s) {
    const int lo = s < 8 ? (sc[s] & 0x0f) : (sc[s - 8] >> 4);
    const int hi = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
    const float dl = d * static_cast<float>((lo | (hi << 4)) - 32);
    for (int i = 0; i < 16; ++i) {
      const int e = s * 16 + i;
      const int ql = (qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
      const int hbit = (hmask[e % 32] >> (e / 32)) & 1;
      y[e] = dl * static_cast<float>(ql - ((hbit ^ 1) << 2));
    }
  }
}

// The 12-byte scale/min block shared by Q4_K and Q5_K: eight 6-bit scales and eight 6-bit mins.
void k4_scale_min(const uint8_t* s, int j, int* sc, int* mn) {
  if (j < 4) {
    *sc = s[j] & 63;
    *mn = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 2) & 0x30);
    *mn = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
  }
}

// Q4_K: d(f16) dmin(f16) scales[12] qs[128]; 8 sub-blocks of 32; value = (d*sc) * q - dmin*m.
void deq_q4_k(const uint8_t* b, float* y) {
  const float d = f16_at(b), dmin = f16_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qs = b + 16;
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    k4_scale_min(scales, j, &sc, &mn);
    const float dl = d * static_cast<float>(sc), ml = dmin * static_cast<float>(mn);
    const uint8_t* q = qs + (j / 2) * 32;
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) y[j * 32 + l] = dl * static_cast<float>((q[l] >> shift) & 0x0f) - ml;
  }
}

// Q5_K: as Q4_K plus qh[32]: bit j of qh[l] is the 5th bit of element 32*j + l.
void deq_q5_k(const uint8_t* b, float* y) {
  const float d = f16_at(b), dmin = f16_at(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    k4_scale_min(scales, j, &sc, &mn);
    const float dl = d * static_cast<float>(sc), ml = dmin * static_cast<float>(mn);
    const uint8_t* q = qs + (j / 2) * 32;
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) {
      const int v = ((q[l] >> shift) & 0x0f) | (((qh[l] >> j) & 1) << 4);
      y[j * 32 + l] = dl * static_cast<float>(v) - ml;
    }
  }
}

// Q6_K: ql[128] qh[64] scales[16] (int8) d(f16); value = (d * scale) * (q - 32).
void deq_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16_at(b + 208);
  for (int s = 0; s < 16; ++s) {
    const float dl = d * static_cast<float>(scales[s]);
    for (int i = 0; i < 16; ++i) {
      const int e = s * 16 + i, half = e / 128, r = e % 128;
      const int lo = (ql[half * 64 + r % 64] >> (4 * (r / 64))) & 0x0f;
      const int hi = (qh[half * 32 + r % 32] >> (2 * (r / 32))) & 3;
      y[e] = dl * static_cast<float>((lo | (hi << 4)) - 32);
    }
  }
}

// IQ4_NL: d(f16) qs[16], Q4_0 nibble order, values from a fixed non-linear table.
void deq_iq4_nl(const uint8_t* b, float* y) {
  const float d = f16_at(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<float>(kIq4nlValues[qs[j] & 0x0f]);
    y[j + 16] = d * static_cast<float>(kIq4nlValues[qs[j] >> 4]);
  }
}

// IQ4_XS: d(f16) scales_h(u16) scales_l[4] qs[128]; 8 sub-blocks of 32 with 6-bit signed scales.
void deq_iq4_xs(const uint8_t* b, float* y) {
  const float d = f16_at(b);
  uint16_t sh;
  std::memcpy(&sh, b + 2, 2);
  const uint8_t* sl = b + 4;
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 8; ++j) {
    const int lo = (sl[j / 2] >> (4 * (j % 2))) & 0x0f;
    const int hi = (sh >> (2 * j)) & 3;
    const float dl = d * static_cast<float>((lo | (hi << 4)) - 32);
    for (int i = 0; i < 32; ++i) {
      const int q = (qs[j * 16 + i % 16] >> (4 * (i / 16))) & 0x0f;
      y[j * 32 + i] = dl * static_cast<float>(kIq4nlValues[q]);
    }
  }
}

// TQ1_0: qs[48] qh[4] d(f16); base-3 digits recovered by multiplying by powers of 3 mod 256.
void deq_tq1_0(const uint8_t* b, float* y) {
  static constexpr uint8_t kPow3[5] = {1, 3, 9, 27, 81};
  const uint8_t* qs = b;
  const uint8_t* qh = b + 48;
  const float d = f16_at(b + 52);
  for (int e = 0; e < kQK; ++e) {
    uint8_t x;
    if (e < 160) {
      x = static_cast<uint8_t>(qs[e % 32] * kPow3[e / 32]);
    } else if (e < 240) {
      x = static_cast<uint8_t>(qs[32 + (e - 160) % 16] * kPow3[(e - 160) / 16]);
    } else {
      x = static_cast<uint8_t>(qh[(e - 240) % 4] * kPow3[(e - 240) / 4]);
    }
    y[e] = d * static_cast<float>(((static_cast<int>(x) * 3) >> 8) - 1);
  }
}

// TQ2_0: qs[64] d(f16); 2-bit values minus 1.
void deq_tq2_0(const uint8_t* b, float* y) {
  const uint8_t* qs = b;
  const float d = f16_at(b + 64);
  for (int e = 0; e < kQK; ++e) {
    const int q = (qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
    y[e] = d * static_cast<float>(q - 1);
  }
}

void deq_f32(const uint8_t* b, float* y) { std::memcpy(y, b, 4); }
void deq_f16(const uint8_t* b, float* y) { *y = f16_at(b); }
void deq_bf16(const uint8_t* b, float* y) {
  uint16_t h;
  std::memcpy(&h, b, 2);
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  std::memcpy(y, &bits, 4);
}
template <typename T>
void deq_cast(const uint8_t* b, float* y) {
  T v;
  std::memcpy(&v, b, sizeof(T));
  *y = static_cast<float>(v);
}

using BlockFn = void (*)(const uint8_t*, float*);

struct TypeEntry {
  GgmlTypeTraits traits;
  BlockFn fn;
};

// Indexed by ggml type number; block/type sizes as in ggml (Q8_1 is 36 bytes there).
const TypeEntry kTypes[] = {
    /* 0 */ {{"F32", 1, 4, true}, deq_f32},
    /* 1 */ {{"F16", 1, 2, true}, deq_f16},
    /* 2 */ {{"Q4_0", 32, 18, true}, deq_q4_0},
    /* 3 */ {{"Q4_1", 32, 20, true}, deq_q4_1},
    /* 4 */ {{nullptr, 0, 0, false}, nullptr},
    /* 5 */ {{nullptr, 0, 0, false}, nullptr},
    /* 6 */ {{"Q5_0", 32, 22, true}, deq_q5_0},
    /* 7 */ {{"Q5_1", 32, 24, true}, deq_q5_1},
    /* 8 */ {{"Q8_0", 32, 34, true}, deq_q8_0},
    /* 9 */ {{"Q8_1", 32, 36, false}, nullptr},
    /* 10 */ {{"Q2_K", kQK, 84, true}, deq_q2_k},
    /* 11 */ {{"Q3_K", kQK, 110, true}, deq_q3_k},
    /* 12 */ {{"Q4_K", kQK, 144, true}, deq_q4_k},
    /* 13 */ {{"Q5_K", kQK, 176, true}, deq_q5_k},
    /* 14 */ {{"Q6_K", kQK, 210, true}, deq_q6_k},
    /* 15 */ {{"Q8_K", kQK, 292, false}, nullptr},
    /* 16 */ {{"IQ2_XXS", kQK, 66, false}, nullptr},
    /* 17 */ {{"IQ2_XS", kQK, 74, false}, nullptr},
    /* 18 */ {{"IQ3_XXS", kQK, 98, false}, nullptr},
    /* 19 */ {{"IQ1_S", kQK, 50, false}, nullptr},
    /* 20 */ {{"IQ4_NL", 32, 18, true}, deq_iq4_nl},
    /* 21 */ {{"IQ3_S", kQK, 110, false}, nullptr},
    /* 22 */ {{"IQ2_S", kQK, 82, false}, nullptr},
    /* 23 */ {{"IQ4_XS", kQK, 136, true}, deq_iq4_xs},
    /* 24 */ {{"I8", 1, 1, true}, deq_cast<int8_t>},
    /* 25 */ {{"I16", 1, 2, true}, deq_cast<int16_t>},
    /* 26 */ {{"I32", 1, 4, true}, deq_cast<int32_t>},
    /* 27 */ {{"I64", 1, 8, true}, deq_cast<int64_t>},
    /* 28 */ {{"F64", 1, 8, true}, deq_cast<double>},
    /* 29 */ {{"IQ1_M", kQK, 56, false}, nullptr},
    /* 30 */ {{"BF16", 1, 2, true}, deq_bf16},
    /* 31 */ {{nullptr, 0, 0, false}, nullptr},
    /* 32 */ {{nullptr, 0, 0, false}, nullptr},
    /* 33 */ {{nullptr, 0, 0, false}, nullptr},
    /* 34 */ {{"TQ1_0", kQK, 54, true}, deq_tq1_0},
    /* 35 */ {{"TQ2_0", kQK, 66, true}, deq_tq2_0},
    /* 36 */ {{nullptr, 0, 0, false}, nullptr},
    /* 37 */ {{nullptr, 0, 0, false}, nullptr},
    /* 38 */ {{nullptr, 0, 0, false}, nullptr},
    /* 39 */ {{"MXFP4", 32, 17, false}, nullptr},
};

const TypeEntry* entry_of(uint32_t type) {
  if (type >= sizeof(kTypes) / sizeof(kTypes[0]) || kTypes[type].traits.name == nullptr) return nullptr;
  return &kTypes[type];
}

}  // namespace

const GgmlTypeTraits* ggml_type_traits(uint32_t type) {
  const TypeEntry* e = entry_of(type);
  return e ? &e->traits : nullptr;
}

void ggml_dequantize(uint32_t type, const uint8_t* src, int64_t n, float* dst) {
  const TypeEntry* e = entry_of(type);
  FTUNE_CHECK(e != nullptr, "ggml_dequantize: unknown ggml type ", type);
  FTUNE_CHECK(e->fn != nullptr, "ggml_dequantize: dequantizing ggml type ", e->traits.name, " (", type,
              ") is not supported");
  const int64_t bs = e->traits.block_size, ts = e->traits.type_size;
  FTUNE_CHECK(n >= 0 && n % bs == 0, "ggml_dequantize: ", n, " elements is not a multiple of the ",
              e->traits.name, " block size ", bs);
  const int64_t n_blocks = n / bs;
  const BlockFn fn = e->fn;
  const int64_t grain = std::max<int64_t>(1, 16384 / bs);
  at::parallel_for(0, n_blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) fn(src + i * ts, dst + i * bs);
  });
}

}  // namespace ftune::io
