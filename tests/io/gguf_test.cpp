// Unit tests for src/io/gguf on tiny GGUF files built here byte by byte (a minimal writer below):
// every metadata type, nested arrays, alignment, tensor infos, dequantization of the simple block
// formats against values computed from the format definition, and every rejection path (bad magic
// and version, absurd counts and lengths, unknown types, out-of-file, misaligned or overlapping
// tensor data, truncation at every byte, random corruption). Bit-exact parity for all quant types
// is in tests/python/test_gguf_io.py.
#include "io/gguf.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <random>

#include "core/error.h"

namespace {
namespace fs = std::filesystem;
using ftune::io::GgmlType;
using ftune::io::GgufFile;
using ftune::io::GgufValueType;
using Bytes = std::vector<uint8_t>;

template <typename T>
void put(Bytes& b, T v) {
  const auto* p = reinterpret_cast<const uint8_t*>(&v);
  b.insert(b.end(), p, p + sizeof(T));
}
void put_str(Bytes& b, const std::string& s) {
  put<uint64_t>(b, s.size());
  b.insert(b.end(), s.begin(), s.end());
}
uint16_t half_bits(float f) {
  at::Half h(f);
  return h.x;
}

// Minimal GGUF writer for tests: key/values with pre-encoded values, tensors with raw data.
struct TestGguf {
  uint32_t version = 3;
  uint32_t magic = 0x46554747;
  int64_t alignment = 32;
  struct Kv {
    std::string key;
    uint32_t type;
    Bytes value;
  };
  struct Tensor {
    std::string name;
    std::vector<uint64_t> ne;
    uint32_t type;
    Bytes data;
    int64_t offset = -1;  // >= 0: written instead of the packed offset (the data stays packed)
  };
  std::vector<Kv> kvs;
  std::vector<Tensor> tensors;

  template <typename T>
  void kv(const std::string& key, GgufValueType t, T v) {
    Bytes b;
    put(b, v);
    kvs.push_back({key, static_cast<uint32_t>(t), b});
  }
  void kv_str(const std::string& key, const std::string& s) {
    Bytes b;
    put_str(b, s);
    kvs.push_back({key, static_cast<uint32_t>(GgufValueType::STRING), b});
  }
  void tensor(const std::string& name, std::vector<uint64_t> ne, GgmlType type, Bytes data) {
    tensors.push_back({name, std::move(ne), static_cast<uint32_t>(type), std::move(data)});
  }

  Bytes build() const {
    Bytes b;
    put<uint32_t>(b, magic);
    put<uint32_t>(b, version);
    put<uint64_t>(b, tensors.size());
    put<uint64_t>(b, kvs.size());
    for (const Kv& kv : kvs) {
      put_str(b, kv.key);
      put<uint32_t>(b, kv.type);
      b.insert(b.end(), kv.value.begin(), kv.value.end());
    }
    uint64_t offset = 0;
    for (const Tensor& t : tensors) {
      put_str(b, t.name);
      put<uint32_t>(b, t.ne.size());
      for (uint64_t d : t.ne) put<uint64_t>(b, d);
      put<uint32_t>(b, t.type);
      put<uint64_t>(b, t.offset >= 0 ? static_cast<uint64_t>(t.offset) : offset);
      offset += (t.data.size() + alignment - 1) / alignment * alignment;
    }
    b.resize((b.size() + alignment - 1) / alignment * alignment, 0);
    for (const Tensor& t : tensors) {
      b.insert(b.end(), t.data.begin(), t.data.end());
      b.resize((b.size() + alignment - 1) / alignment * alignment, 0);
    }
    return b;
  }
};

Bytes f32_bytes(std::initializer_list<float> v) {
  Bytes b;
  for (float f : v) put(b, f);
  return b;
}

void expect_error(const Bytes& bytes, std::initializer_list<const char*> parts) {
  try {
    GgufFile f = GgufFile::from_bytes(bytes, "t.gguf");
    ADD_FAILURE() << "no error";
  } catch (const ftune::Error& e) {
    std::string msg = e.what();
    EXPECT_EQ(msg.rfind("t.gguf: ", 0), 0u) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    for (const char* p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  }
}

// A small valid file used by the robustness tests.
TestGguf sample() {
  TestGguf g;
  g.kv_str("general.architecture", "llama");
  g.kv("llama.block_count", GgufValueType::U32, uint32_t{2});
  Bytes arr;
  put<uint32_t>(arr, static_cast<uint32_t>(GgufValueType::STRING));
  put<uint64_t>(arr, 2);
  put_str(arr, "a");
  put_str(arr, "bc");
  g.kvs.push_back({"tokenizer.ggml.tokens", static_cast<uint32_t>(GgufValueType::ARRAY), arr});
  g.tensor("w", {4, 2}, GgmlType::F32, f32_bytes({1, 2, 3, 4, 5, 6, 7, 8}));
  Bytes q(34, 0);
  uint16_t d = half_bits(0.5f);
  std::memcpy(q.data(), &d, 2);
  for (int i = 0; i < 32; ++i) q[2 + i] = static_cast<uint8_t>(i * 7);
  g.tensor("q", {32}, GgmlType::Q8_0, q);
  return g;
}

TEST(Gguf, MetadataOfEveryType) {
  TestGguf g;
  g.kv("u8", GgufValueType::U8, uint8_t{200});
  g.kv("i8", GgufValueType::I8, int8_t{-5});
  g.kv("u16", GgufValueType::U16, uint16_t{60000});
  g.kv("i16", GgufValueType::I16, int16_t{-300});
  g.kv("u32", GgufValueType::U32, uint32_t{4000000000u});
  g.kv("i32", GgufValueType::I32, int32_t{-2000000000});
  g.kv("f32", GgufValueType::F32, 1.25f);
  g.kv("bool", GgufValueType::BOOL, uint8_t{1});
  g.kv_str("str", "h\xc3\xa9llo");
  g.kv("u64", GgufValueType::U64, uint64_t{1} << 40);
  g.kv("i64", GgufValueType::I64, -(int64_t{1} << 40));
  g.kv("f64", GgufValueType::F64, 0.1);
  Bytes nested;  // [[1, 2], [3]] as an array of u8 arrays
  put<uint32_t>(nested, 9);
  put<uint64_t>(nested, 2);
  put<uint32_t>(nested, 0);
  put<uint64_t>(nested, 2);
  nested.push_back(1);
  nested.push_back(2);
  put<uint32_t>(nested, 0);
  put<uint64_t>(nested, 1);
  nested.push_back(3);
  g.kvs.push_back({"nested", 9, nested});
  Bytes empty;
  put<uint32_t>(empty, static_cast<uint32_t>(GgufValueType::I32));
  put<uint64_t>(empty, 0);
  g.kvs.push_back({"empty", 9, empty});

  for (uint32_t version : {2u, 3u}) {
    g.version = version;
    GgufFile f = GgufFile::from_bytes(g.build());
    const auto& m = f.metadata();
    EXPECT_EQ(f.version(), version);
    EXPECT_EQ(m["u8"].get<uint64_t>(), 200u);
    EXPECT_EQ(m["i8"].get<int64_t>(), -5);
    EXPECT_EQ(m["u16"].get<uint64_t>(), 60000u);
    EXPECT_EQ(m["i16"].get<int64_t>(), -300);
    EXPECT_EQ(m["u32"].get<uint64_t>(), 4000000000u);
    EXPECT_EQ(m["i32"].get<int64_t>(), -2000000000);
    EXPECT_EQ(m["f32"].get<double>(), 1.25);
    EXPECT_EQ(m["bool"].get<bool>(), true);
    EXPECT_EQ(m["str"].get<std::string>(), "h\xc3\xa9llo");
    EXPECT_EQ(m["u64"].get<uint64_t>(), uint64_t{1} << 40);
    EXPECT_EQ(m["i64"].get<int64_t>(), -(int64_t{1} << 40));
    EXPECT_EQ(m["f64"].get<double>(), 0.1);
    EXPECT_EQ(m["nested"], nlohmann::json::parse("[[1,2],[3]]"));
    EXPECT_EQ(m["empty"], nlohmann::json::array());
    EXPECT_EQ(f.metadata_type("i16"), GgufValueType::I16);
    EXPECT_EQ(f.metadata_type("nested"), GgufValueType::ARRAY);
    EXPECT_EQ(f.metadata_array_type("nested"), GgufValueType::ARRAY);
    EXPECT_EQ(f.metadata_array_type("empty"), GgufValueType::I32);
    EXPECT_TRUE(f.tensors().empty());
  }
}

TEST(Gguf, TensorInfosAlignmentAndRaw) {
  TestGguf g = sample();
  g.alignment = 64;
  g.kv("general.alignment", GgufValueType::U32, uint32_t{64});
  Bytes bytes = g.build();
  fs::path p = fs::temp_directory_path() / ("ftune_gguf_" + std::to_string(::getpid()) + ".gguf");
  std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  GgufFile f(p);
  fs::remove(p);  // the mapping stays valid
  EXPECT_EQ(f.alignment(), 64);
  EXPECT_EQ(f.data_offset() % 64, 0);
  ASSERT_EQ(f.tensors().size(), 2u);
  const auto& w = f.tensor_info("w");
  EXPECT_EQ(w.ne, (std::vector<int64_t>{4, 2}));
  EXPECT_EQ(w.shape(), (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(w.n_bytes, 32);
  EXPECT_EQ(f.tensor_info("q").offset, 64);
  EXPECT_EQ(f.tensor_info("q").n_bytes, 34);
  at::Tensor wt = f.dequantize("w");
  EXPECT_TRUE(at::equal(wt, at::arange(1, 9, at::kFloat).reshape({2, 4})));
  at::Tensor raw = f.raw("q");
  EXPECT_EQ(raw.numel(), 34);
  EXPECT_EQ(raw[2].item<uint8_t>(), 0);
  EXPECT_EQ(raw[3].item<uint8_t>(), 7);
  EXPECT_FALSE(f.contains("nope"));
  EXPECT_THROW(f.tensor_info("nope"), ftune::Error);
  EXPECT_EQ(f.metadata()["tokenizer.ggml.tokens"], nlohmann::json({"a", "bc"}));
}

TEST(Gguf, DequantizeSimpleFormats) {
  TestGguf g;
  const std::vector<float> vals = {0.5f, -1.25f, 3.0e-6f, 65504.0f, -0.0f, 1.0f / 3.0f, 7.0f, -2.5f};
  Bytes f16, bf16;
  at::Tensor src = at::tensor(vals);
  for (float v : vals) put<uint16_t>(f16, half_bits(v));
  for (float v : vals) put<uint16_t>(bf16, at::BFloat16(v).x);
  g.tensor("f16", {8}, GgmlType::F16, f16);
  g.tensor("bf16", {4, 2}, GgmlType::BF16, bf16);

  // Q8_0: d = 0.5, q = -128..127 stepping by 8; value = q * d.
  Bytes q8;
  put<uint16_t>(q8, half_bits(0.5f));
  std::vector<float> q8_expect;
  for (int i = 0; i < 32; ++i) {
    q8.push_back(static_cast<uint8_t>(static_cast<int8_t>(-128 + 8 * i)));
    q8_expect.push_back((-128 + 8 * i) * 0.5f);
  }
  g.tensor("q8_0", {32}, GgmlType::Q8_0, q8);

  // Q4_0: d = 0.25; element j < 16 is the low nibble of byte j, element j >= 16 the high one;
  // value = (nibble - 8) * d. Q4_1: d = 0.5, m = -1; value = nibble * d + m.
  Bytes q40, q41;
  put<uint16_t>(q40, half_bits(0.25f));
  put<uint16_t>(q41, half_bits(0.5f));
  put<uint16_t>(q41, half_bits(-1.0f));
  std::vector<float> q40_expect(32), q41_expect(32);
  for (int j = 0; j < 16; ++j) {
    const int lo = j, hi = 15 - j;
    q40.push_back(static_cast<uint8_t>(lo | (hi << 4)));
    q41.push_back(static_cast<uint8_t>(lo | (hi << 4)));
    q40_expect[j] = (lo - 8) * 0.25f;
    q40_expect[j + 16] = (hi - 8) * 0.25f;
    q41_expect[j] = lo * 0.5f - 1.0f;
    q41_expect[j + 16] = hi * 0.5f - 1.0f;
  }
  g.tensor("q4_0", {32}, GgmlType::Q4_0, q40);
  g.tensor("q4_1", {32}, GgmlType::Q4_1, q41);
  Bytes i16;
  for (int16_t v : {int16_t{-3}, int16_t{7}}) put(i16, v);
  g.tensor("i16", {2}, GgmlType::I16, i16);

  GgufFile f = GgufFile::from_bytes(g.build());
  EXPECT_TRUE(at::equal(f.dequantize("f16"), src.to(at::kHalf).to(at::kFloat)));
  EXPECT_TRUE(at::equal(f.dequantize("bf16"), src.to(at::kBFloat16).to(at::kFloat).reshape({2, 4})));
  EXPECT_TRUE(at::equal(f.dequantize("q8_0"), at::tensor(q8_expect)));
  EXPECT_TRUE(at::equal(f.dequantize("q4_0"), at::tensor(q40_expect)));
  EXPECT_TRUE(at::equal(f.dequantize("q4_1"), at::tensor(q41_expect)));
  EXPECT_TRUE(at::equal(f.dequantize("i16"), at::tensor({-3.0f, 7.0f})));
}

TEST(Gguf, UnsupportedDequantizationIsAnError) {
  TestGguf g;
  g.tensor("iq", {256}, GgmlType::IQ2_XXS, Bytes(66, 0));
  GgufFile f = GgufFile::from_bytes(g.build());
  EXPECT_EQ(f.raw("iq").numel(), 66);
  try {
    f.dequantize("iq");
    ADD_FAILURE();
  } catch (const ftune::Error& e) {
    EXPECT_NE(std::string(e.what()).find("IQ2_XXS (16)"), std::string::npos) << e.what();
  }
}

TEST(Gguf, RejectsBadHeader) {
  TestGguf g = sample();
  g.magic = 0x46554746;
  expect_error(g.build(), {"header", "bad magic"});
  g = sample();
  g.version = 1;
  expect_error(g.build(), {"header", "unsupported version 1"});
  g.version = 4;
  expect_error(g.build(), {"unsupported version 4"});
  g.version = 0x03000000;  // a big-endian v3 file read as little-endian
  expect_error(g.build(), {"big-endian"});
  expect_error(Bytes{'G', 'G'}, {"header", "truncated", "magic"});
  expect_error(Bytes{}, {"header", "truncated"});
}

TEST(Gguf, RejectsAbsurdCountsAndLengths) {
  Bytes b = sample().build();
  Bytes c = b;
  const uint64_t huge = uint64_t{1} << 62;
  std::memcpy(c.data() + 8, &huge, 8);  // tensor count
  expect_error(c, {"tensor count", "impossible"});
  c = b;
  std::memcpy(c.data() + 16, &huge, 8);  // kv count
  expect_error(c, {"metadata count", "impossible"});
  c = b;
  std::memcpy(c.data() + 24, &huge, 8);  // length of the first key
  expect_error(c, {"metadata #0", "key length", "exceeds the remaining"});

  TestGguf g;
  Bytes arr;
  put<uint32_t>(arr, static_cast<uint32_t>(GgufValueType::U32));
  put<uint64_t>(arr, huge);
  g.kvs.push_back({"big", 9, arr});
  expect_error(g.build(), {"metadata 'big'", "array length", "impossible"});

  g = TestGguf();
  Bytes deep;
  for (int i = 0; i < 100; ++i) {
    put<uint32_t>(deep, 9);
    put<uint64_t>(deep, 1);
  }
  put<uint32_t>(deep, 0);
  put<uint64_t>(deep, 0);
  g.kvs.push_back({"deep", 9, deep});
  expect_error(g.build(), {"metadata 'deep'", "nested deeper"});

  g = TestGguf();
  g.kvs.push_back({"t", 13, Bytes{0, 0, 0, 0}});
  expect_error(g.build(), {"metadata 't'", "unknown value type 13"});
  g = TestGguf();
  g.kv("general.alignment", GgufValueType::U32, uint32_t{48});
  expect_error(g.build(), {"general.alignment", "not a power of two"});
  g = TestGguf();
  g.kv("general.alignment", GgufValueType::U64, uint64_t{32});
  expect_error(g.build(), {"general.alignment", "expected a u32"});
  g = TestGguf();
  g.kv("k", GgufValueType::U8, uint8_t{1});
  g.kv("k", GgufValueType::U8, uint8_t{2});
  expect_error(g.build(), {"metadata 'k'", "duplicate key"});
}

TEST(Gguf, RejectsBadTensorInfos) {
  TestGguf g;
  g.tensor("x", {32}, static_cast<GgmlType>(99), Bytes(32, 0));
  expect_error(g.build(), {"tensor 'x'", "unknown ggml type 99"});
  g = TestGguf();
  g.tensor("x", {1, 1, 1, 1, 1}, GgmlType::F32, Bytes(4, 0));
  expect_error(g.build(), {"tensor 'x'", "n_dims 5"});
  g = TestGguf();
  g.tensor("x", {uint64_t{1} << 40, uint64_t{1} << 40}, GgmlType::F32, Bytes(4, 0));
  expect_error(g.build(), {"tensor 'x'", "overflows"});
  g = TestGguf();
  g.tensor("x", {uint64_t{1} << 63}, GgmlType::F32, Bytes(4, 0));
  expect_error(g.build(), {"tensor 'x'", "overflows"});
  g = TestGguf();
  g.tensor("x", {16}, GgmlType::Q4_0, Bytes(18, 0));
  expect_error(g.build(), {"tensor 'x'", "not a multiple of the Q4_0 block size 32"});
  g = TestGguf();
  g.tensor("x", {4}, GgmlType::F32, Bytes(16, 0));
  g.tensor("x", {4}, GgmlType::F32, Bytes(16, 0));
  expect_error(g.build(), {"tensor 'x'", "duplicate tensor name"});
  g = TestGguf();
  g.tensor("x", {64}, GgmlType::F32, Bytes(16, 0));  // claims 256 bytes, file holds 32
  expect_error(g.build(), {"tensor 'x'", "outside the file"});
  Bytes b = sample().build();
  // Point the first tensor's offset far past the end of the file.
  size_t pos = b.size();
  for (size_t i = 0; i + 1 < b.size(); ++i) {
    if (b[i] == 'w' && b[i - 1] == 0 && b[i + 1] == 2) {  // name "w", then n_dims = 2
      pos = i + 1 + 4 + 16 + 4;
      break;
    }
  }
  ASSERT_LT(pos, b.size());
  const uint64_t far = uint64_t{1} << 50;
  std::memcpy(b.data() + pos, &far, 8);
  expect_error(b, {"tensor 'w'", "outside the file"});
}

TEST(Gguf, RejectsMisalignedAndOverlappingData) {
  // sample(): "w" holds bytes [0, 32) of the data section, "q" [32, 66).
  TestGguf g = sample();
  g.tensors[1].offset = 16;
  expect_error(g.build(), {"tensor 'q'", "offset 16 is not a multiple of general.alignment 32"});
  g.tensors[1].offset = 0;
  expect_error(g.build(), {"tensor 'q'", "offset 0 overlaps tensor 'w' (data [0, 32))"});
  g = sample();
  g.tensors[0].offset = 32;  // both at 32: "w" [32, 64) and "q" [32, 66)
  expect_error(g.build(), {"overlaps tensor '"});
  // The alignment is general.alignment's, not 32.
  g = sample();
  g.alignment = 64;
  g.kv("general.alignment", GgufValueType::U32, uint32_t{64});
  EXPECT_NO_THROW(GgufFile::from_bytes(g.build()));
  g.tensors[1].offset = 32;
  expect_error(g.build(), {"tensor 'q'", "offset 32 is not a multiple of general.alignment 64"});
  // An empty tensor occupies no byte, so it may share an offset.
  g = sample();
  g.tensor("e", {0}, GgmlType::F32, Bytes{});
  g.tensors.back().offset = 0;
  GgufFile f = GgufFile::from_bytes(g.build());
  EXPECT_EQ(f.tensor_info("e").n_bytes, 0);
  EXPECT_EQ(f.dequantize("e").numel(), 0);
}

TEST(Gguf, NamesInErrorsStayOnOneLine) {
  TestGguf g;
  g.tensor(std::string(64, 'n'), {4}, GgmlType::F32, Bytes(16, 0));
  expect_error(g.build(), {"tensor #0", "name of 64 bytes is too long (llama.cpp's limit is 63)"});
  g = TestGguf();
  g.tensor("a\nb\xff", {4}, GgmlType::F32, Bytes(16, 0));
  g.tensor("a\nb\xff", {4}, GgmlType::F32, Bytes(16, 0));
  expect_error(g.build(), {"tensor 'a\\nb\xef\xbf\xbd'", "duplicate tensor name"});
  EXPECT_EQ(ftune::io::gguf_printable(std::string(150, 'k')), std::string(100, 'k') + "...");
  EXPECT_EQ(ftune::io::gguf_printable("t\"x\x01"), "t\\\"x\\u0001");
}

TEST(Gguf, EveryTruncationIsAnError) {
  Bytes b = sample().build();
  // Cutting anywhere before the end of the last tensor's data must fail (trailing padding may go).
  GgufFile full = GgufFile::from_bytes(b);
  const auto& last = full.tensors().back();
  const size_t end = static_cast<size_t>(full.data_offset() + last.offset + last.n_bytes);
  ASSERT_LT(end, b.size());
  EXPECT_NO_THROW(GgufFile::from_bytes(Bytes(b.begin(), b.begin() + static_cast<int64_t>(end))));
  for (size_t n = 0; n < end; ++n) {
    Bytes c(b.begin(), b.begin() + static_cast<int64_t>(n));
    EXPECT_THROW(GgufFile::from_bytes(c, "t.gguf"), ftune::Error) << "prefix " << n;
  }
  EXPECT_NO_THROW(GgufFile::from_bytes(b));
}

TEST(Gguf, RandomCorruptionNeverCrashes) {
  const Bytes b = sample().build();
  std::mt19937 rng(1234);
  int parsed = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    Bytes c = b;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) c[rng() % c.size()] = static_cast<uint8_t>(rng());
    try {
      GgufFile f = GgufFile::from_bytes(std::move(c));
      for (const auto& t : f.tensors()) {
        auto* tr = ftune::io::ggml_type_traits(t.type);
        if (tr->can_dequantize) f.dequantize(t.name);
      }
      ++parsed;
    } catch (const ftune::Error&) {
    }
  }
  EXPECT_GT(parsed, 0);
}

TEST(Gguf, MissingFile) {
  try {
    GgufFile f("/nonexistent/x.gguf");
    ADD_FAILURE();
  } catch (const ftune::Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("/nonexistent/x.gguf: ", 0), 0u) << e.what();
  }
}

}  // namespace
