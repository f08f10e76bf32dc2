// NF4: the vectorized, multi-threaded dequantization against the scalar reference (bit for bit),
// the bitsandbytes key layout round trip and its rejections, the 4-bit linear's values and
// gradients against a dense linear on the dequantized weight, and a 4-bit model end to end (load
// with quantization, save in bitsandbytes' layout, reload, LoRA on top). bitsandbytes itself is
// the oracle in tests/python/test_quant.py.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>

#include "core/error.h"
#include "lora/lora.h"
#include "model/hf_io.h"
#include "quant/nf4.h"

namespace fs = std::filesystem;
using namespace ftune;
using quant::Nf4Tensor;
using quant::QuantOptions;

namespace {

at::Tensor random_weight(std::vector<int64_t> shape, at::ScalarType dtype, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(shape, gen, at::kFloat).mul_(0.05).to(dtype);
}

QuantOptions opts(bool dq, int64_t blocksize = 64) {
  QuantOptions o;
  o.double_quant = dq;
  o.blocksize = blocksize;
  return o;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const ftune::Error& e) {
    return e.what();
  }
  return "(no error)";
}

std::map<std::string, at::Tensor> as_map(const std::vector<std::pair<std::string, at::Tensor>>& v) {
  return {v.begin(), v.end()};
}

Nf4Tensor parse(const std::map<std::string, at::Tensor>& m, const std::string& prefix = "w.weight") {
  return quant::from_bnb_tensors(
      [&](const std::string& k) { return m.count(k) ? m.at(k) : at::Tensor(); }, prefix, "f.safetensors");
}

}  // namespace

TEST(Nf4, CodeTablesAreBitsandbytes) {
  EXPECT_EQ(quant::nf4_code()[0], -1.0f);
  EXPECT_EQ(quant::nf4_code()[7], 0.0f);
  EXPECT_EQ(quant::nf4_code()[15], 1.0f);
  at::Tensor d = quant::dynamic_map();
  ASSERT_EQ(d.numel(), 256);
  EXPECT_EQ(d[0].item<float>(), -1.0f);  // bitsandbytes' CPU quantizer overwrites -0.99297
  EXPECT_EQ(d[127].item<float>(), 0.0f);
  EXPECT_EQ(d[255].item<float>(), 1.0f);
  EXPECT_TRUE((d.slice(0, 1) > d.slice(0, 0, 255)).all().item<bool>());
}

TEST(Nf4, PacksEvenElementInHighNibble) {
  // absmax 1: values on the code table map to their own index.
  at::Tensor w = at::zeros({64}, at::kFloat);
  w[0] = 1.0f;                       // index 15
  w[1] = -1.0f;                      // index 0
  w[2] = quant::nf4_code()[9];       // index 9
  w[3] = 0.0f;                       // index 7
  Nf4Tensor t = quant::quantize_nf4(w, opts(false));
  EXPECT_EQ(t.packed[0].item<uint8_t>(), 0xF0);
  EXPECT_EQ(t.packed[1].item<uint8_t>(), 0x97);
  EXPECT_EQ(t.absmax[0].item<float>(), 1.0f);
  EXPECT_TRUE(at::equal(quant::dequantize_nf4(t, at::kFloat), w));
  // An all-zero block gets index 0 and absmax 0, as bitsandbytes' CPU path gives.
  Nf4Tensor z = quant::quantize_nf4(at::zeros({2, 64}), opts(false));
  EXPECT_EQ(z.packed.sum().item<int64_t>(), 0);
  EXPECT_TRUE(at::equal(quant::dequantize_nf4(z, at::kFloat).abs(), at::zeros({2, 64})));
}

TEST(Nf4, DequantizeEqualsScalarReferenceBitForBit) {
  struct Case {
    std::vector<int64_t> shape;
    at::ScalarType in;
    bool dq;
    int64_t blocksize;
  };
  const std::vector<Case> cases = {
      {{128, 64}, at::kFloat, true, 64},     {{100, 2}, at::kFloat, true, 64},  // partial block
      {{172, 64}, at::kBFloat16, true, 64},  {{64, 172}, at::kFloat, false, 64},
      {{256, 96}, at::kFloat, true, 128},    {{640, 1024}, at::kBFloat16, true, 64},  // 10240 blocks
      {{3, 6}, at::kFloat, false, 64}};
  for (const Case& c : cases) {
    Nf4Tensor t = quant::quantize_nf4(random_weight(c.shape, c.in, 7), opts(c.dq, c.blocksize));
    for (at::ScalarType out : {at::kFloat, at::kBFloat16, at::kHalf}) {
      at::Tensor fast = quant::dequantize_nf4(t, out);
      at::Tensor ref = quant::dequantize_nf4_reference(t, out);
      ASSERT_EQ(fast.sizes(), at::IntArrayRef(c.shape));
      ASSERT_EQ(fast.scalar_type(), out);
      // Bitwise: compare the raw bytes, not the values.
      EXPECT_TRUE(at::equal(fast.view(out == at::kFloat ? at::kInt : at::kShort),
                            ref.view(out == at::kFloat ? at::kInt : at::kShort)))
          << "shape " << at::IntArrayRef(c.shape) << " out " << out;
    }
  }
}

TEST(Nf4, DequantizeIsTheSameOnOneThreadAndMany) {
  Nf4Tensor t = quant::quantize_nf4(random_weight({512, 512}, at::kFloat, 3), opts(true));
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  at::Tensor one = quant::dequantize_nf4(t, at::kBFloat16);
  at::set_num_threads(std::max(threads, 2));
  at::Tensor many = quant::dequantize_nf4(t, at::kBFloat16);
  at::set_num_threads(threads);
  EXPECT_TRUE(at::equal(one.view(at::kShort), many.view(at::kShort)));
}

TEST(Nf4, QuantizationErrorIsBoundedByTheCodeSpacing) {
  at::Tensor w = random_weight({256, 64}, at::kFloat, 11);
  Nf4Tensor t = quant::quantize_nf4(w, opts(false));
  // At most half the largest gap between neighbouring codes, times the block absmax.
  float gap = 0;
  for (int j = 1; j < 16; ++j) gap = std::max(gap, quant::nf4_code()[j] - quant::nf4_code()[j - 1]);
  EXPECT_NEAR(gap, 1 - 0.6961928f, 1e-7);  // between -1 and -0.696
  at::Tensor err = (quant::dequantize_nf4(t, at::kFloat) - w).abs().view({-1, 64});
  at::Tensor bound = t.absmax.view({-1, 1}) * gap / 2 + 1e-7;
  EXPECT_TRUE((err <= bound).all().item<bool>());
}

TEST(Nf4, BytesAre4127BitsPerParamWithDoubleQuant) {
  Nf4Tensor t = quant::quantize_nf4(random_weight({4096, 256}, at::kBFloat16, 1), opts(true));
  const int64_t n = 4096 * 256, blocks = n / 64, nested = blocks / 256;
  EXPECT_EQ(t.nbytes(), n / 2 + blocks + nested * 4 + 256 * 4 + 16 * 4 + 4);
  const double bits = 8.0 * (n / 2 + blocks + nested * 4) / n;
  EXPECT_NEAR(bits, 4.127, 0.001);
  Nf4Tensor s = quant::quantize_nf4(random_weight({4096, 256}, at::kBFloat16, 1), opts(false));
  EXPECT_EQ(s.nbytes(), n / 2 + blocks * 4 + 16 * 4);
}

TEST(Nf4, BitsandbytesLayoutRoundTrips) {
  for (bool dq : {true, false}) {
    Nf4Tensor t = quant::quantize_nf4(random_weight({96, 64}, at::kBFloat16, 5), opts(dq));
    auto tensors = quant::to_bnb_tensors(t, "w.weight");
    ASSERT_EQ(tensors.size(), dq ? 6u : 4u);
    EXPECT_EQ(tensors[0].first, "w.weight");
    EXPECT_EQ(tensors[0].second.sizes(), at::IntArrayRef({96 * 64 / 2, 1}));
    const at::Tensor& js = tensors.back().second;
    const std::string text(reinterpret_cast<const char*>(js.data_ptr<uint8_t>()), js.numel());
    if (dq) {
      EXPECT_EQ(text.rfind("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", "
                           "\"shape\": [96, 64], \"nested_blocksize\": 256, \"nested_dtype\": "
                           "\"float32\", \"nested_offset\": ", 0), 0u) << text;
    } else {
      EXPECT_EQ(text, "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", "
                      "\"shape\": [96, 64]}");
    }
    Nf4Tensor back = parse(as_map(tensors));
    EXPECT_EQ(back.shape, t.shape);
    EXPECT_EQ(back.dtype, t.dtype);
    EXPECT_EQ(back.offset, t.offset);
    EXPECT_TRUE(at::equal(back.packed, t.packed));
    EXPECT_TRUE(at::equal(back.absmax, t.absmax));
    EXPECT_TRUE(at::equal(quant::dequantize_nf4(back, at::kBFloat16), quant::dequantize_nf4(t, at::kBFloat16)));
  }
}

TEST(Nf4, BadBitsandbytesTensorsAreOneClearError) {
  Nf4Tensor t = quant::quantize_nf4(random_weight({8, 64}, at::kFloat, 2), opts(true));
  const auto good = as_map(quant::to_bnb_tensors(t, "w.weight"));
  auto with = [&](const std::string& key, const at::Tensor& v) {
    auto m = good;
    if (v.defined()) m[key] = v; else m.erase(key);
    return error_of([&] { parse(m); });
  };
  auto json_bytes = [](const std::string& s) {
    at::Tensor b = at::empty({static_cast<int64_t>(s.size())}, at::kByte);
    std::memcpy(b.data_ptr<uint8_t>(), s.data(), s.size());
    return b;
  };
  const std::string qs = "w.weight.quant_state.bitsandbytes__nf4";
  EXPECT_EQ(with("w.weight.absmax", at::Tensor()),
            "f.safetensors: w.weight.absmax: missing (bitsandbytes 4-bit layout)");
  EXPECT_EQ(with("w.weight.absmax", at::zeros({8}, at::kFloat)),
            "f.safetensors: w.weight.absmax: dtype Float, expected Byte");
  EXPECT_EQ(with("w.weight.absmax", at::zeros({7}, at::kByte)),
            "f.safetensors: w.weight.absmax: shape [7], expected [8]");
  EXPECT_EQ(with("w.weight", at::zeros({255, 1}, at::kByte)),
            "f.safetensors: w.weight: shape [255, 1], expected [256, 1] (4-bit packed, shape [8,64])");
  EXPECT_EQ(with("w.weight.quant_map", at::zeros({16}, at::kFloat)),
            "f.safetensors: w.weight.quant_map: expected the NF4 code table");
  EXPECT_EQ(with(qs, json_bytes("{not json")).substr(0, 68),
            "f.safetensors: w.weight.quant_state.bitsandbytes__nf4: invalid JSON:");
  EXPECT_EQ(with(qs, json_bytes("{\"quant_type\": \"fp4\"}")),
            "f.safetensors: " + qs + ": quant_type: \"fp4\" is not supported: expected nf4");
  EXPECT_EQ(with(qs, json_bytes("{\"quant_type\": \"nf4\", \"bogus\": 1}")),
            "f.safetensors: " + qs + ": unknown field 'bogus'");
  EXPECT_EQ(with(qs, json_bytes("{\"quant_type\": \"nf4\", \"blocksize\": 48}")),
            "f.safetensors: " + qs + ": blocksize: 48: expected 64, 128, 256, 512, 1024, 2048 or 4096");
  EXPECT_EQ(with(qs, json_bytes("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"int8\"}")),
            "f.safetensors: " + qs + ": dtype: \"int8\": expected float32, bfloat16 or float16");
  EXPECT_EQ(with(qs, json_bytes("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", "
                                "\"shape\": [8, -64]}")),
            "f.safetensors: " + qs + ": shape: expected positive integers, got [8,-64]");
  EXPECT_EQ(with(qs, json_bytes("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"float32\", "
                                "\"shape\": [8, 64], \"nested_blocksize\": 256, \"nested_dtype\": "
                                "\"float32\", \"nested_offset\": null}")),
            "f.safetensors: " + qs + ": nested_offset: expected a finite number, got null");
  EXPECT_EQ(error_of([&] {
              quant::from_bnb_tensors([&](const std::string& k) { return good.count(k) ? good.at(k) : at::Tensor(); },
                                      "w.weight", "f.safetensors", {64, 8});
            }),
            "f.safetensors: " + qs + ": shape: [8,64] does not match config shape [64, 8]");
}

TEST(Nf4, OptionsAndInputsAreValidated) {
  QuantOptions o;
  o.type = "fp4";
  EXPECT_EQ(error_of([&] { quant::validate(o, "quant"); }),
            "quant.type: 'fp4' is not a quantization type ftune has: expected nf4");
  o = QuantOptions();
  o.blocksize = 32;
  EXPECT_EQ(error_of([&] { quant::validate(o, "quant"); }),
            "quant.blocksize: 32 is not supported: expected 64, 128, 256, 512, 1024, 2048 or 4096");
  o = QuantOptions();
  o.compute_dtype = at::kHalf;
  EXPECT_EQ(error_of([&] { quant::validate(o, "quant"); }), "quant.compute_dtype: Half: expected fp32 or bf16");
  at::Tensor w = random_weight({4, 64}, at::kFloat, 1);
  w[1][3] = std::numeric_limits<float>::infinity();
  EXPECT_EQ(error_of([&] { quant::quantize_nf4(w, {}); }),
            "quantize_nf4: the weight holds a non-finite value (inf or nan)");
  EXPECT_EQ(error_of([&] { quant::quantize_nf4(at::ones({3}), {}); }),
            "quantize_nf4: expected an even, non-zero number of elements, got 3 (two 4-bit values "
            "share a byte)");
}

TEST(Nf4, LinearMatchesDenseLinearOnTheDequantizedWeight) {
  for (at::ScalarType compute : {at::kFloat, at::kBFloat16}) {
    Nf4Tensor t = quant::quantize_nf4(random_weight({48, 64}, at::kFloat, 4), opts(true));
    at::Tensor dense = quant::dequantize_nf4(t, at::kFloat).to(compute);
    at::Tensor x0 = random_weight({2, 5, 64}, at::kFloat, 9).mul_(20);
    at::Tensor b0 = random_weight({48}, at::kFloat, 8);
    at::Tensor x1 = x0.clone().requires_grad_(true), b1 = b0.clone().requires_grad_(true);
    at::Tensor x2 = x0.clone().requires_grad_(true), b2 = b0.clone().requires_grad_(true);
    at::Tensor y1 = quant::nf4_linear(x1, t, b1, compute);
    at::Tensor y2 = (at::linear(x2.to(compute), dense) + b2.to(compute)).to(at::kFloat);
    EXPECT_EQ(y1.scalar_type(), at::kFloat);
    EXPECT_TRUE(at::equal(y1, y2)) << compute;
    at::Tensor g = random_weight({2, 5, 48}, at::kFloat, 10);
    y1.backward(g);
    y2.backward(g);
    EXPECT_TRUE(at::equal(x1.grad(), x2.grad())) << compute;
    EXPECT_TRUE(at::equal(b1.grad(), b2.grad())) << compute;
  }
}

TEST(Nf4, LinearKeepsOnlyThePackedWeightForBackward) {
  Nf4Tensor t = quant::quantize_nf4(random_weight({256, 256}, at::kFloat, 4), opts(true));
  at::Tensor x = random_weight({4, 256}, at::kFloat, 9).requires_grad_(true);
  const int64_t packed_uses = t.packed.use_count();
  at::Tensor y = quant::nf4_linear(x, t, at::Tensor(), at::kFloat);
  // The graph holds the NF4 tensors by reference (one more owner) and no dense weight: its only
  // saved state is the capsule (checked through the reference count of the packed bytes).
  EXPECT_EQ(t.packed.use_count(), packed_uses + 1);
  y.sum().backward();
  EXPECT_TRUE(x.grad().defined());
}

// A tiny model end to end: quantize at load, the 4-bit forward against the dense forward on the
// dequantized weights, save in bitsandbytes' layout, reload without re-quantizing, LoRA on top.
TEST(Nf4Model, LoadQuantizedSaveReloadAndLora) {
  const fs::path dir = fs::temp_directory_path() / ("nf4_model_test_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  model::LlamaConfig c = model::preset_config("tiny");
  {
    model::LlamaForCausalLM m(c, at::kFloat);
    model::init_weights(m, 1);
    model::save_model(dir / "dense", m);
  }
  model::LoadOptions lo;
  lo.quant = QuantOptions();
  lo.quant->compute_dtype = at::kFloat;
  auto q = model::load_model(dir / "dense", lo);
  ASSERT_TRUE(model::has_nf4_linears(q));
  for (const auto& p : q->named_parameters()) {
    EXPECT_EQ(p.key().find("_proj.weight"), std::string::npos) << p.key() << " is still dense";
  }
  const model::BaseBytes bytes = model::base_bytes(q);
  EXPECT_EQ(bytes.nf4_params, 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 172));
  auto d = model::load_model(dir / "dense", lo);
  model::dequantize_linears(d, at::kFloat);
  EXPECT_FALSE(model::has_nf4_linears(d));
  at::Tensor ids = at::randint(0, c.vocab_size, {2, 9}, at::kLong);
  torch::NoGradGuard no_grad;
  at::Tensor lq = q->forward(ids), ld = d->forward(ids);
  EXPECT_TRUE(at::equal(lq, ld));

  model::save_model(dir / "nf4", q);
  auto r = model::load_model(dir / "nf4", {});  // bitsandbytes layout: loads as NF4 as stored
  ASSERT_TRUE(model::has_nf4_linears(r));
  EXPECT_TRUE(at::equal(r->forward(ids), lq));  // compute dtype fp32 came from quantization_config
  EXPECT_EQ(model::base_bytes(r).total_bytes(), bytes.total_bytes());

  // LoRA on the 4-bit base: adapters get gradients, the base none.
  lora::LoraOptions lopt;
  lopt.targets = {"all-linear"};
  lora::apply_lora(r, lopt, 0);
  {
    torch::AutoGradMode grad(true);
    for (auto& [name, p] : lora::adapter_parameters(r)) {
      if (name.find("lora_B") != std::string::npos) p.data().normal_(0, 0.1);
    }
    r->forward(ids).sum().backward();
    for (auto& [name, p] : lora::adapter_parameters(r)) EXPECT_TRUE(p.grad().defined()) << name;
    for (auto& [name, p] : model::base_parameters(*r)) EXPECT_FALSE(p.grad().defined()) << name;
  }
  fs::remove_all(dir);
}
