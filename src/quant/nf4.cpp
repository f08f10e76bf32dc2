// NF4 quantization, dequantization, bitsandbytes serialization and the 4-bit linear; see nf4.h.
// Every rounding step copies bitsandbytes 0.48's CPU path (backends/default/ops.py for the 4-bit
// part, csrc/common.cpp quantize_block for the 8-bit absmax), since "the same bytes" is the test.
#include "quant/nf4.h"

#include <ATen/Parallel.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <set>
#include <type_traits>

#ifdef FTUNE_NF4_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

#include "core/error.h"
#include "quant/nf4_cuda.h"
#include "quant/nf4_kernel.h"

namespace ftune::quant {
namespace {

constexpr std::array<float, 16> kNf4 = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// Shared by every Nf4Tensor, so a model holds the two tables once (see nbytes()).
const at::Tensor& nf4_code_tensor() {
  static const at::Tensor t = at::tensor(std::vector<float>(kNf4.begin(), kNf4.end()), at::kFloat);
  return t;
}

// bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), op for op in
// fp32 (linspace, midpoints, scale by a power of ten), then sorted.
at::Tensor make_dynamic_map() {
  std::vector<float> data;
  for (int i = 0; i < 7; ++i) {
    const int64_t items = (int64_t{1} << i) + 1;
    at::Tensor bounds = at::linspace(0.1, 1.0, items, at::kFloat);
    at::Tensor means = (bounds.slice(0, 0, items - 1) + bounds.slice(0, 1, items)) / 2.0;
    const double scale = std::pow(10.0, static_cast<double>(i - 6));
    for (const at::Tensor& t : {means * scale, means * -scale}) {
      const float* p = t.contiguous().data_ptr<float>();
      data.insert(data.end(), p, p + t.numel());
    }
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  std::sort(data.begin(), data.end());
  FTUNE_CHECK(data.size() == 256, "dynamic_map: expected 256 entries, got ", data.size());
  // bitsandbytes' CPU quantize_blockwise sets code[0] = -1 in the map it is handed (its cached
  // one), before QuantState copies it; so the map that file holds starts with -1.
  data[0] = -1.0f;
  return at::tensor(data, at::kFloat);
}

const at::Tensor& dynamic_map_tensor() {
  static const at::Tensor t = make_dynamic_map();
  return t;
}

const char* dtype_json_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: return nullptr;
  }
}

int64_t checked_numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return -1;
  }
  return n;
}

bool valid_blocksize(int64_t b) {
  return b >= 64 && b <= 4096 && (b & (b - 1)) == 0;
}

// Nearest code index with ties to the lower index, as torch.argmin over |x - code| picks it; NaN
// (x = 0 in an all-zero block, 0 * inf) gives index 0, as argmin returns the first NaN.
inline uint8_t nearest_nf4(float x) {
  if (std::isnan(x)) return 0;
  uint8_t best = 0;
  float best_d = std::fabs(x - kNf4[0]);
  for (uint8_t j = 1; j < 16; ++j) {
    const float d = std::fabs(x - kNf4[j]);
    if (d < best_d) best_d = d, best = j;
  }
  return best;
}

template <typename T>
void quantize_4bit_cpu(const T* x, int64_t n, int64_t blocksize, float* absmax, uint8_t* packed) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  std::atomic<bool> bad{false};
  at::parallel_for(0, nblocks, 256, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> q(blocksize);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * blocksize, count = std::min(n, begin + blocksize) - begin;
      float m = 0;
      for (int64_t i = 0; i < count; ++i) {
        const float v = static_cast<float>(x[begin + i]);
        if (!std::isfinite(v)) bad = true;
        m = std::max(m, std::fabs(v));
      }
      absmax[b] = m;
      const float r = 1.0f / m;  // torch: A * (1 / absmax), a reciprocal then a product
      // bitsandbytes scales a partial last block by a 0-dim absmax, so torch's type promotion
      // keeps that product in the weight's dtype (one more rounding for bf16/fp16 weights).
      const bool round_to_input = count < blocksize && !std::is_same_v<T, float>;
      for (int64_t i = 0; i < count; ++i) {
        float s = static_cast<float>(x[begin + i]) * r;
        if (round_to_input) s = static_cast<float>(static_cast<T>(s));
        if (!std::isnan(s)) s = std::clamp(s, -1.0f, 1.0f);
        q[i] = nearest_nf4(s);
      }
      uint8_t* p = packed + begin / 2;
      for (int64_t i = 0; i + 1 < count; i += 2) p[i / 2] = static_cast<uint8_t>(q[i] << 4 | q[i + 1]);
      if (count & 1) p[count / 2] = static_cast<uint8_t>(q[count - 1] << 4);
    }
  });
  FTUNE_CHECK(!bad, "quantize_nf4: the weight holds a non-finite value (inf or nan)");
}

// bitsandbytes' quantize_blockwise on CPU (csrc/common.cpp quantize_block): per block of
// `blocksize` the absmax, then x / absmax placed by binary search and moved right when the right
// neighbour is strictly closer. An all-equal block (absmax 0; bitsandbytes crashes there) maps to
// the code's zero.
void quantize_8bit_cpu(const float* x, int64_t n, int64_t blocksize, const float* code,
                       float* absmax, uint8_t* out) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const uint8_t zero = static_cast<uint8_t>(std::find(code, code + 256, 0.0f) - code);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
    float m = -std::numeric_limits<float>::max();
    for (int64_t i = begin; i < end; ++i) m = std::fmax(m, std::fabs(x[i]));
    absmax[b] = m;
    for (int64_t i = begin; i < end; ++i) {
      if (m == 0) {
        out[i] = zero;
        continue;
      }
      const float v = x[i] / m;
      int64_t idx = std::upper_bound(code, code + 256, v) - code - 1;
      idx = std::clamp<int64_t>(idx, 0, 255);
      if (idx < 255) {
        const float dl = std::fabs(v - code[idx]), dr = std::fabs(v - code[idx + 1]);
        if (dr < dl) idx += 1;
      }
      out[i] = static_cast<uint8_t>(idx);
    }
  }
}

kernel::DequantFn pick_kernel() {
#if defined(__x86_64__) || defined(__i386__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return kernel::dequant_blocks_avx2;
  }
#endif
  return kernel::dequant_blocks_default;
}

// The 16 code values as the output dtype rounds them (bitsandbytes casts the code to the dtype
// before the product), as floats.
std::array<float, 16> code_in(at::ScalarType dtype) {
  at::Tensor c = nf4_code_tensor().to(dtype).to(at::kFloat);
  std::array<float, 16> out;
  std::copy(c.data_ptr<float>(), c.data_ptr<float>() + 16, out.begin());
  return out;
}

void check_dequant_dtype(at::ScalarType dtype) {
  FTUNE_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "dequantize_nf4: expected fp32, bf16 or fp16 output, got ", c10::toString(dtype));
}

#ifdef FTUNE_NF4_CUDA
at::Tensor dequantize_nf4_cuda(const Nf4Tensor& t, at::ScalarType dtype) {
  cuda::Nf4DeviceArgs a;
  a.packed = t.packed.data_ptr<uint8_t>();
  if (t.double_quant()) {
    a.absmax_u8 = t.absmax.data_ptr<uint8_t>();
    a.nested_absmax = t.nested_absmax.data_ptr<float>();
    a.nested_quant_map = t.nested_quant_map.data_ptr<float>();
    a.offset = t.offset;
    a.nested_blocksize = t.nested_blocksize;
  } else {
    a.absmax_f32 = t.absmax.data_ptr<float>();
  }
  const std::array<float, 16> code = code_in(dtype);
  std::copy(code.begin(), code.end(), a.code);
  a.n = t.numel();
  a.blocksize = t.blocksize;
  const bool bf16 = dtype == at::kBFloat16;
  at::Tensor out = at::empty({a.n}, t.packed.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const int err = cuda::launch_dequantize_nf4(
      a, out.data_ptr(), bf16 ? cuda::OutDtype::kBF16 : cuda::OutDtype::kF32,
      c10::cuda::getCurrentCUDAStream(t.packed.device().index()).stream());
  FTUNE_CHECK(err == 0, "dequantize_nf4: CUDA kernel launch failed: ", cuda::cuda_error_string(err));
  if (dtype == at::kHalf) out = out.to(at::kHalf);
  return out.view(t.shape);
}
#endif

}  // namespace

void validate(const QuantOptions& o, const std::string& origin) {
  FTUNE_CHECK(o.type == "nf4", origin, ".type: '", o.type,
              "' is not a quantization type ftune has: expected nf4");
  FTUNE_CHECK(valid_blocksize(o.blocksize), origin, ".blocksize: ", o.blocksize,
              " is not supported: expected 64, 128, 256, 512, 1024, 2048 or 4096");
  FTUNE_CHECK(o.compute_dtype == at::kFloat || o.compute_dtype == at::kBFloat16, origin,
              ".compute_dtype: ", c10::toString(o.compute_dtype), ": expected fp32 or bf16");
}

const std::array<float, 16>& nf4_code() { return kNf4; }

at::Tensor dynamic_map() { return dynamic_map_tensor(); }

int64_t Nf4Tensor::numel() const { return checked_numel(shape); }

int64_t Nf4Tensor::nbytes() const {
  int64_t b = static_cast<int64_t>(packed.nbytes() + absmax.nbytes());
  if (quant_map.defined()) b += static_cast<int64_t>(quant_map.nbytes());
  if (double_quant()) {
    b += static_cast<int64_t>(nested_absmax.nbytes() + nested_quant_map.nbytes()) + 4;  // + offset
  }
  return b;
}

Nf4Tensor Nf4Tensor::to(at::Device device) const {
  Nf4Tensor t = *this;
  auto move = [&](at::Tensor& x) {
    if (x.defined()) x = x.to(device);
  };
  move(t.packed);
  move(t.absmax);
  move(t.nested_absmax);
  move(t.nested_quant_map);
  move(t.quant_map);
  return t;
}

Nf4Tensor quantize_nf4(const at::Tensor& w, const QuantOptions& o) {
  validate(o, "quant");
  const at::ScalarType st = w.scalar_type();
  FTUNE_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
              "quantize_nf4: expected a fp32, bf16 or fp16 weight, got ", c10::toString(st));
  const int64_t n = w.numel();
  FTUNE_CHECK(n > 0 && n % 2 == 0, "quantize_nf4: expected an even, non-zero number of elements, got ",
              n, " (two 4-bit values share a byte)");
  at::Tensor x = w.detach().to(at::kCPU).contiguous().view(-1);
  Nf4Tensor t;
  t.shape = w.sizes().vec();
  t.dtype = st;
  t.blocksize = o.blocksize;
  const int64_t nblocks = t.nblocks();
  at::Tensor absmax = at::empty({nblocks}, at::kFloat);
  t.packed = at::empty({n / 2}, at::kByte);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "quantize_nf4", [&] {
    quantize_4bit_cpu(x.data_ptr<scalar_t>(), n, o.blocksize, absmax.data_ptr<float>(),
                      t.packed.data_ptr<uint8_t>());
  });
  t.quant_map = nf4_code_tensor();
  if (o.double_quant) {
    // bitsandbytes: offset = absmax.mean(); quantize_blockwise(absmax - offset, blocksize=256).
    at::Tensor mean = absmax.mean();
    t.offset = mean.item<float>();
    at::Tensor centered = (absmax - mean).contiguous();
    t.nested_absmax = at::empty({(nblocks + kNestedBlocksize - 1) / kNestedBlocksize}, at::kFloat);
    t.absmax = at::empty({nblocks}, at::kByte);
    t.nested_quant_map = dynamic_map_tensor();
    quantize_8bit_cpu(centered.data_ptr<float>(), nblocks, kNestedBlocksize,
                      t.nested_quant_map.data_ptr<float>(), t.nested_absmax.data_ptr<float>(),
                      t.absmax.data_ptr<uint8_t>());
  } else {
    t.absmax = absmax;
  }
  return w.device().is_cpu() ? t : t.to(w.device());
}

at::Tensor dequantize_absmax(const Nf4Tensor& t) {
  if (!t.double_quant()) return t.absmax.to(at::kFloat);
  // bitsandbytes' dequantize_blockwise: code[q] * absmax[block] in fp32, then += offset.
  at::Tensor codes = t.nested_quant_map.index({t.absmax.to(at::kLong)});  // [nblocks]
  const int64_t nb = t.absmax.numel(), nbs = t.nested_blocksize;
  at::Tensor scale = t.nested_absmax.repeat_interleave(nbs).slice(0, 0, nb);
  at::Tensor out = codes * scale;
  out.add_(t.offset);
  return out;
}

at::Tensor dequantize_nf4(const Nf4Tensor& t, at::ScalarType dtype) {
  check_dequant_dtype(dtype);
  const int64_t n = t.numel();
  if (t.device().is_cuda()) {
#ifdef FTUNE_NF4_CUDA
    return dequantize_nf4_cuda(t, dtype);
#else
    // Without the CUDA kernel: the same arithmetic as device-side ATen ops.
    at::Tensor p = t.packed.view(-1);
    at::Tensor q = at::stack({p.bitwise_right_shift(4), p.bitwise_and(15)}, 1).view(-1).slice(0, 0, n);
    at::Tensor code = t.quant_map.to(dtype).to(at::kFloat);
    at::Tensor vals = code.index({q.to(at::kLong)});
    at::Tensor a = dequantize_absmax(t).repeat_interleave(t.blocksize).slice(0, 0, n);
    return (vals * a).to(dtype).view(t.shape);
#endif
  }
  at::Tensor absmax = dequantize_absmax(t).contiguous();
  // fp16: products in fp32 with fp16-rounded codes, then one rounding (what bitsandbytes does).
  const at::ScalarType kernel_dtype = dtype == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
  const kernel::OutKind kind = dtype == at::kBFloat16 ? kernel::OutKind::kBF16 : kernel::OutKind::kF32;
  const std::array<float, 16> code = code_in(dtype);
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(kernel_dtype));
  static const kernel::DequantFn fn = pick_kernel();
  const uint8_t* packed = t.packed.data_ptr<uint8_t>();
  const float* am = absmax.data_ptr<float>();
  void* o = out.data_ptr();
  const int64_t bs = t.blocksize;
  // ~16k elements per task: large enough to amortize the thread hand-off.
  at::parallel_for(0, t.nblocks(), std::max<int64_t>(1, 16384 / bs), [&](int64_t b0, int64_t b1) {
    fn(packed, am, code.data(), o, kind, n, bs, b0, b1);
  });
  if (dtype == at::kHalf) out = out.to(at::kHalf);
  return out.view(t.shape);
}

at::Tensor dequantize_nf4_reference(const Nf4Tensor& t, at::ScalarType dtype) {
  check_dequant_dtype(dtype);
  FTUNE_CHECK(t.device().is_cpu(), "dequantize_nf4_reference: expected CPU tensors");
  const int64_t n = t.numel();
  at::Tensor absmax = dequantize_absmax(t);
  at::Tensor out = at::empty({n}, at::kFloat);
  const uint8_t* p = t.packed.data_ptr<uint8_t>();
  const float* a = absmax.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const int q = i % 2 == 0 ? p[i / 2] >> 4 : p[i / 2] & 15;
    float c = kNf4[q];
    if (dtype == at::kBFloat16) c = static_cast<float>(c10::BFloat16(c));
    if (dtype == at::kHalf) c = static_cast<float>(c10::Half(c));
    o[i] = c * a[i / t.blocksize];
  }
  return out.to(dtype).view(t.shape);
}

// ---- bitsandbytes serialization ----------------------------------------------------------------

namespace {
const char* const kQuantStateSuffix = ".quant_state.bitsandbytes__nf4";

std::string quant_state_json(const Nf4Tensor& t) {
  // json.dumps' layout (", " and ": "), keys in QuantState.as_dict order.
  std::string s = "{\"quant_type\": \"nf4\", \"blocksize\": " + std::to_string(t.blocksize) +
                  ", \"dtype\": \"" + dtype_json_name(t.dtype) + "\", \"shape\": [";
  for (size_t i = 0; i < t.shape.size(); ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  s += "]";
  if (t.double_quant()) {
    // nested_offset is offset.item(): the float as a double, in Python's shortest repr.
    s += ", \"nested_blocksize\": " + std::to_string(t.nested_blocksize) +
         ", \"nested_dtype\": \"float32\", \"nested_offset\": " +
         nlohmann::json(static_cast<double>(t.offset)).dump();
  }
  return s + "}";
}
}  // namespace

std::vector<std::string> bnb_key_suffixes(bool double_quant) {
  std::vector<std::string> s = {"", ".absmax", ".quant_map"};
  if (double_quant) {
    s.push_back(".nested_absmax");
    s.push_back(".nested_quant_map");
  }
  s.push_back(kQuantStateSuffix);
  return s;
}

bool is_bnb_state_key(const std::string& name) {
  for (const char* s : {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                        ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4"}) {
    const size_t len = std::char_traits<char>::length(s);
    if (name.size() > len && name.compare(name.size() - len, len, s) == 0) return true;
  }
  return false;
}

std::vector<std::pair<std::string, at::Tensor>> to_bnb_tensors(const Nf4Tensor& t,
                                                               const std::string& prefix) {
  FTUNE_CHECK(dtype_json_name(t.dtype) != nullptr, prefix, ": unsupported weight dtype ",
              c10::toString(t.dtype));
  std::vector<std::pair<std::string, at::Tensor>> out;
  auto cpu = [](const at::Tensor& x) { return x.to(at::kCPU).contiguous(); };
  out.emplace_back(prefix, cpu(t.packed).view({-1, 1}));  // Params4bit keeps [n / 2, 1]
  out.emplace_back(prefix + ".absmax", cpu(t.absmax));
  out.emplace_back(prefix + ".quant_map", cpu(t.quant_map));
  if (t.double_quant()) {
    out.emplace_back(prefix + ".nested_absmax", cpu(t.nested_absmax));
    out.emplace_back(prefix + ".nested_quant_map", cpu(t.nested_quant_map));
  }
  const std::string js = quant_state_json(t);
  at::Tensor bytes = at::empty({static_cast<int64_t>(js.size())}, at::kByte);
  std::memcpy(bytes.data_ptr<uint8_t>(), js.data(), js.size());
  out.emplace_back(prefix + kQuantStateSuffix, bytes);
  return out;
}

Nf4Tensor from_bnb_tensors(const TensorGetter& get, const std::string& prefix,
                           const std::string& origin, const std::vector<int64_t>& expected_shape) {
  auto need = [&](const std::string& suffix, at::ScalarType dtype) {
    const std::string key = prefix + suffix;
    at::Tensor x = get(key);
    FTUNE_CHECK(x.defined(), origin, ": ", key, ": missing (bitsandbytes 4-bit layout)");
    FTUNE_CHECK(x.scalar_type() == dtype, origin, ": ", key, ": dtype ", c10::toString(x.scalar_type()),
                ", expected ", c10::toString(dtype));
    return x;
  };
  auto shape_is = [&](const at::Tensor& x, const std::string& suffix, int64_t n) {
    FTUNE_CHECK(x.dim() == 1 && x.size(0) == n, origin, ": ", prefix, suffix, ": shape ", x.sizes(),
                ", expected [", n, "]");
  };
  const std::string qs_key = prefix + kQuantStateSuffix;
  {
    at::Tensor fp4 = get(prefix + ".quant_state.bitsandbytes__fp4");
    FTUNE_CHECK(!fp4.defined(), origin, ": ", prefix, ".quant_state.bitsandbytes__fp4: quant_type fp4 ",
                "is not supported: expected nf4");
  }
  at::Tensor qs = need(kQuantStateSuffix, at::kByte);
  FTUNE_CHECK(qs.dim() == 1, origin, ": ", qs_key, ": expected a 1-D uint8 tensor of JSON");
  qs = qs.contiguous();
  const std::string text(reinterpret_cast<const char*>(qs.data_ptr<uint8_t>()),
                         static_cast<size_t>(qs.numel()));
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail(origin, ": ", qs_key, ": invalid JSON: ", e.what());
  }
  FTUNE_CHECK(j.is_object(), origin, ": ", qs_key, ": expected a JSON object");
  static const std::set<std::string> known = {"quant_type", "blocksize", "dtype", "shape",
                                              "nested_blocksize", "nested_dtype", "nested_offset"};
  for (const auto& [k, v] : j.items()) {
    FTUNE_CHECK(known.count(k), origin, ": ", qs_key, ": unknown field '", k, "'");
  }
  auto field = [&](const char* k) -> const nlohmann::json& {
    auto it = j.find(k);
    FTUNE_CHECK(it != j.end(), origin, ": ", qs_key, ": ", k, ": missing");
    return *it;
  };
  auto int_field = [&](const char* k) {
    const auto& v = field(k);
    FTUNE_CHECK(v.is_number_integer(), origin, ": ", qs_key, ": ", k, ": expected an integer, got ",
                v.dump());
    return v.get<int64_t>();
  };
  const auto& qt = field("quant_type");
  FTUNE_CHECK(qt.is_string() && qt.get<std::string>() == "nf4", origin, ": ", qs_key,
              ": quant_type: ", qt.dump(), " is not supported: expected nf4");
  Nf4Tensor t;
  t.blocksize = int_field("blocksize");
  FTUNE_CHECK(valid_blocksize(t.blocksize), origin, ": ", qs_key, ": blocksize: ", t.blocksize,
              ": expected 64, 128, 256, 512, 1024, 2048 or 4096");
  const auto& dt = field("dtype");
  const std::string dts = dt.is_string() ? dt.get<std::string>() : "";
  if (dts == "float32") t.dtype = at::kFloat;
  else if (dts == "bfloat16") t.dtype = at::kBFloat16;
  else if (dts == "float16") t.dtype = at::kHalf;
  else fail(origin, ": ", qs_key, ": dtype: ", dt.dump(), ": expected float32, bfloat16 or float16");
  const auto& sh = field("shape");
  FTUNE_CHECK(sh.is_array() && !sh.empty(), origin, ": ", qs_key, ": shape: expected a list of sizes");
  for (const auto& d : sh) {
    FTUNE_CHECK(d.is_number_integer() && d.get<int64_t>() > 0, origin, ": ", qs_key,
                ": shape: expected positive integers, got ", sh.dump());
    t.shape.push_back(d.get<int64_t>());
  }
  const int64_t n = checked_numel(t.shape);
  FTUNE_CHECK(n > 0 && n % 2 == 0, origin, ": ", qs_key, ": shape: ", sh.dump(),
              " overflows or has an odd number of elements");
  if (!expected_shape.empty()) {
    FTUNE_CHECK(t.shape == expected_shape, origin, ": ", qs_key, ": shape: ", sh.dump(),
                " does not match config shape ", at::IntArrayRef(expected_shape));
  }
  const int64_t nblocks = t.nblocks();
  at::Tensor packed = need("", at::kByte);
  FTUNE_CHECK(packed.numel() == n / 2 && (packed.dim() == 1 || (packed.dim() == 2 && packed.size(1) == 1)),
              origin, ": ", prefix, ": shape ", packed.sizes(), ", expected [", n / 2,
              ", 1] (4-bit packed, shape ", sh.dump(), ")");
  t.packed = packed.contiguous().view(-1);
  at::Tensor qm = need(".quant_map", at::kFloat);
  shape_is(qm, ".quant_map", 16);
  FTUNE_CHECK(at::equal(qm.contiguous(), nf4_code_tensor()), origin, ": ", prefix,
              ".quant_map: expected the NF4 code table");
  t.quant_map = nf4_code_tensor();
  const bool nested = j.contains("nested_offset") || j.contains("nested_blocksize") ||
                      j.contains("nested_dtype") || get(prefix + ".nested_absmax").defined();
  if (nested) {
    t.nested_blocksize = int_field("nested_blocksize");
    FTUNE_CHECK(t.nested_blocksize > 0 && t.nested_blocksize <= (int64_t{1} << 20), origin, ": ",
                qs_key, ": nested_blocksize: ", t.nested_blocksize, ": expected a positive size");
    const auto& nd = field("nested_dtype");
    FTUNE_CHECK(nd.is_string() && nd.get<std::string>() == "float32", origin, ": ", qs_key,
                ": nested_dtype: ", nd.dump(), ": expected float32");
    const auto& off = field("nested_offset");
    FTUNE_CHECK(off.is_number() && std::isfinite(off.get<double>()), origin, ": ", qs_key,
                ": nested_offset: expected a finite number, got ", off.dump());
    t.offset = static_cast<float>(off.get<double>());
    t.absmax = need(".absmax", at::kByte).contiguous();
    shape_is(t.absmax, ".absmax", nblocks);
    t.nested_absmax = need(".nested_absmax", at::kFloat).contiguous();
    shape_is(t.nested_absmax, ".nested_absmax",
             (nblocks + t.nested_blocksize - 1) / t.nested_blocksize);
    at::Tensor nqm = need(".nested_quant_map", at::kFloat).contiguous();
    shape_is(nqm, ".nested_quant_map", 256);
    // Share the table when it is ours (every file ftune or bitsandbytes' CPU path writes).
    t.nested_quant_map = at::equal(nqm, dynamic_map_tensor()) ? dynamic_map_tensor() : nqm;
    FTUNE_CHECK(at::isfinite(t.nested_quant_map).all().item<bool>() &&
                    at::isfinite(t.nested_absmax).all().item<bool>(),
                origin, ": ", prefix, ".nested_absmax: expected finite values");
  } else {
    t.absmax = need(".absmax", at::kFloat).contiguous();
    shape_is(t.absmax, ".absmax", nblocks);
    FTUNE_CHECK(at::isfinite(t.absmax).all().item<bool>(), origin, ": ", prefix,
                ".absmax: expected finite values");
  }
  return t;
}

// ---- the 4-bit linear ---------------------------------------------------------------------------

namespace {

// The frozen weight, co-owned by the autograd graph (its tensors are shared, not copied).
struct Nf4Capsule : torch::CustomClassHolder {
  explicit Nf4Capsule(const Nf4Tensor& t) : w(t) {}
  Nf4Tensor w;
};

struct Nf4Linear : public torch::autograd::Function<Nf4Linear> {
  // x arrives in the compute dtype.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const Nf4Tensor& w) {
    ctx->saved_data["w"] = at::IValue::make_capsule(c10::make_intrusive<Nf4Capsule>(w));
    // bitsandbytes: dequantize_4bit (to the weight's own dtype), then .to(A.dtype).
    at::Tensor weight = dequantize_nf4(w, w.dtype).to(x.scalar_type());  // [out, in]
    return at::linear(x, weight);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    const at::Tensor& g = grad_out[0];  // [..., out]
    if (!ctx->needs_input_grad(0)) return {at::Tensor(), at::Tensor()};
    auto capsule = c10::static_intrusive_pointer_cast<Nf4Capsule>(ctx->saved_data["w"].toCapsule());
    at::Tensor weight = dequantize_nf4(capsule->w, capsule->w.dtype).to(g.scalar_type());
    return {at::matmul(g, weight), at::Tensor()};  // [..., in]
  }
};

}  // namespace

at::Tensor nf4_linear(const at::Tensor& x, const Nf4Tensor& w, const at::Tensor& bias,
                      at::ScalarType compute_dtype) {
  FTUNE_CHECK(w.shape.size() == 2, "nf4_linear: expected a 2-D weight, got ", w.shape.size(), " dims");
  FTUNE_CHECK(x.dim() >= 1 && x.size(-1) == w.shape[1], "nf4_linear: input has ",
              x.dim() ? x.size(-1) : 0, " features, the weight expects ", w.shape[1]);
  at::Tensor y = Nf4Linear::apply(x.to(compute_dtype), w);
  // The bias outside the function, so plain autograd gives it its gradient when it has one.
  if (bias.defined()) y = y + bias.to(compute_dtype);
  return y.to(x.scalar_type());
}

}  // namespace ftune::quant
