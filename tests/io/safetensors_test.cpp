// Unit tests for src/io/safetensors: writer/reader round trip for every dtype, the on-disk layout
// (8-byte header length, space padding), each malformed-header rejection (files built by hand), and
// the single-file / sharded model-dir layouts of load_weights / save_weights.
#include "io/safetensors.h"

#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <map>
#include <fstream>
#include <initializer_list>
#include <set>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"

namespace {
namespace fs = std::filesystem;
using ftune::io::SafetensorsReader;
using ftune::io::TensorList;

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("ftune_st_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes <8-byte length><header><data> exactly as given (length = header size unless overridden).
  fs::path write_raw(const std::string& header, const std::string& data, int64_t length = -1,
                     const std::string& name = "bad.safetensors") {
    fs::path p = dir_ / name;
    std::ofstream os(p, std::ios::binary);
    uint64_t n = length >= 0 ? static_cast<uint64_t>(length) : header.size();
    os.write(reinterpret_cast<const char*>(&n), 8);
    os << header << data;
    return p;
  }

  // Expects SafetensorsReader(p) to throw ftune::Error whose message has the path and all `parts`.
  void expect_error(const fs::path& p, std::initializer_list<const char*> parts) {
    try {
      SafetensorsReader r(p);
      ADD_FAILURE() << "no error for " << p;
    } catch (const ftune::Error& e) {
      std::string msg = e.what();
      EXPECT_EQ(msg.rfind(p.string() + ": ", 0), 0u) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
      for (const char* part : parts) EXPECT_NE(msg.find(part), std::string::npos) << "'" << part << "' not in: " << msg;
    }
  }

  fs::path dir_;
};

TensorList sample_tensors() {
  at::manual_seed(0);
  TensorList t;
  t.emplace_back("f64", at::randn({2, 3}, at::kDouble));
  t.emplace_back("f32", at::randn({4, 5}));
  t.emplace_back("f16", at::randn({3}, at::kHalf));
  t.emplace_back("bf16", at::randn({2, 2, 2}, at::kBFloat16));
  t.emplace_back("i64", at::randint(-1000, 1000, {5}, at::kLong));
  t.emplace_back("i32", at::randint(-1000, 1000, {2, 1}, at::kInt));
  t.emplace_back("i16", at::randint(-1000, 1000, {3}, at::kShort));
  t.emplace_back("i8", at::randint(-128, 127, {7}, at::kChar));
  t.emplace_back("u8", at::randint(0, 255, {1, 9}, at::kByte));
  t.emplace_back("bool", at::randint(0, 2, {6}, at::kLong).to(at::kBool));
  t.emplace_back("scalar", at::scalar_tensor(3.5));
  t.emplace_back("empty", at::empty({0, 4}));
  t.emplace_back("strided", at::randn({4, 6}).t());  // non-contiguous input
  return t;
}

TEST_F(SafetensorsTest, RoundTripAllDtypes) {
  TensorList in = sample_tensors();
  fs::path p = dir_ / "a.safetensors";
  ftune::io::save_safetensors(p, in, {{"format", "pt"}, {"note", "x"}});
  at::Tensor kept;
  {
    SafetensorsReader r(p);
    ASSERT_EQ(r.names().size(), in.size());
    for (size_t i = 0; i < in.size(); ++i) {
      EXPECT_EQ(r.names()[i], in[i].first);  // written in order, so offset order == input order
      at::Tensor t = r.tensor(in[i].first);
      EXPECT_EQ(t.scalar_type(), in[i].second.scalar_type()) << in[i].first;
      EXPECT_EQ(t.sizes(), in[i].second.sizes()) << in[i].first;
      EXPECT_TRUE(at::equal(t, in[i].second)) << in[i].first;
    }
    EXPECT_EQ(r.metadata().at("format"), "pt");
    EXPECT_EQ(r.metadata().at("note"), "x");
    EXPECT_EQ(r.entry("f32").dtype, at::kFloat);
    EXPECT_EQ(r.entry("f32").end - r.entry("f32").begin, 4 * 5 * 4);
    EXPECT_FALSE(r.contains("nope"));
    EXPECT_THROW(r.tensor("nope"), ftune::Error);
    kept = r.tensor("f32");
  }
  // The tensor keeps the mapping alive after the reader is gone.
  EXPECT_TRUE(at::equal(kept, in[1].second));
  // Writing into a zero-copy tensor must not crash (private copy-on-write mapping) nor touch the file.
  kept.fill_(7.0f);
  SafetensorsReader again(p);
  EXPECT_TRUE(at::equal(again.tensor("f32"), in[1].second));
}

TEST_F(SafetensorsTest, HeaderLayoutMatchesPythonWriter) {
  fs::path p = dir_ / "b.safetensors";
  ftune::io::save_safetensors(p, {{"x", at::ones({3}, at::kHalf)}}, {{"format", "pt"}});
  std::string bytes = ftune::read_file(p);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  ASSERT_EQ(n % 8, 0u);
  std::string header = bytes.substr(8, n);
  auto j = nlohmann::json::parse(header);
  EXPECT_EQ(header.find("{\"__metadata__\""), 0u);  // metadata first, compact JSON
  EXPECT_EQ(j["x"]["dtype"], "F16");
  EXPECT_EQ(j["x"]["data_offsets"], nlohmann::json({0, 6}));
  EXPECT_EQ(bytes.size(), 8 + n + 6);
  EXPECT_EQ(header.back() == ' ' || header.back() == '}', true);
}

TEST_F(SafetensorsTest, WriterRejectsBadInput) {
  fs::path p = dir_ / "c.safetensors";
  EXPECT_THROW(ftune::io::save_safetensors(p, {{"a", at::ones({1})}, {"a", at::ones({1})}}), ftune::Error);
  EXPECT_THROW(ftune::io::save_safetensors(p, {{"c", at::ones({1}, at::kComplexFloat)}}), ftune::Error);
  EXPECT_THROW(ftune::io::save_safetensors(p, {{"__metadata__", at::ones({1})}}), ftune::Error);
  EXPECT_FALSE(fs::exists(p));
}

const std::string kF32x2 = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";

TEST_F(SafetensorsTest, AcceptsHandBuiltFile) {
  float v[2] = {1.5f, -2.0f};
  fs::path p = write_raw("{" + kF32x2 + "}   ", std::string(reinterpret_cast<char*>(v), 8));
  SafetensorsReader r(p);
  at::Tensor t = r.tensor("t");
  EXPECT_EQ(t[0].item<float>(), 1.5f);
  EXPECT_EQ(t[1].item<float>(), -2.0f);
}

TEST_F(SafetensorsTest, RejectsTooShort) {
  fs::path p = dir_ / "short.safetensors";
  std::ofstream(p, std::ios::binary) << "abc";
  expect_error(p, {"header", "need at least 8"});
}

TEST_F(SafetensorsTest, RejectsHeaderLengthBeyondFile) {
  expect_error(write_raw("{}", "", 1000), {"header", "length 1000", "exceeds the file size"});
}

TEST_F(SafetensorsTest, RejectsBadJson) {
  expect_error(write_raw("{\"t\":", ""), {"header", "invalid JSON"});
  expect_error(write_raw("[1,2]", ""), {"header", "expected a JSON object"});
}

TEST_F(SafetensorsTest, RejectsNonObjectEntry) {
  expect_error(write_raw(R"({"t":[1,2]})", ""), {"t: expected an object"});
  expect_error(write_raw(R"({"__metadata__":{"k":1}})", ""), {"__metadata__.k", "expected a string"});
}

TEST_F(SafetensorsTest, RejectsUnknownDtype) {
  expect_error(write_raw(R"({"t":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", "xx"),
               {"t: dtype", "F8_E4M3"});
}

TEST_F(SafetensorsTest, RejectsBadShape) {
  expect_error(write_raw(R"({"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", "xxxx"), {"t: shape"});
  expect_error(write_raw(R"({"t":{"dtype":"F32","shape":"2","data_offsets":[0,8]}})", "xxxxxxxx"), {"t: shape"});
}

TEST_F(SafetensorsTest, RejectsSizeMismatch) {
  expect_error(write_raw(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::string(8, 'x')),
               {"t: data_offsets", "holds 8 bytes", "needs 12"});
}

TEST_F(SafetensorsTest, RejectsOffsetsOutOfRange) {
  expect_error(write_raw("{" + kF32x2 + "}", std::string(4, 'x')), {"t: data_offsets", "beyond the data section"});
  expect_error(write_raw(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", std::string(8, 'x')),
               {"t: data_offsets", "begin 8 > end 0"});
  expect_error(write_raw(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", std::string(8, 'x')),
               {"t: data_offsets"});
}

TEST_F(SafetensorsTest, RejectsOverlap) {
  std::string h = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                  R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
  expect_error(write_raw(h, std::string(12, 'x')), {"b: data_offsets", "overlaps a"});
}

TEST_F(SafetensorsTest, RejectsGapsAndUncoveredData) {
  std::string gap = R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                    R"("b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}})";
  expect_error(write_raw(gap, std::string(5, 'x')), {"b: data_offsets", "gap"});
  expect_error(write_raw("{" + kF32x2 + "}", std::string(12, 'x')), {"data_offsets", "cover 8 bytes", "has 12"});
}

TEST_F(SafetensorsTest, RejectsDuplicateNames) {
  std::string h = "{" + kF32x2 + "," + kF32x2 + "}";
  expect_error(write_raw(h, std::string(8, 'x')), {"t: duplicate name"});
}

class WeightsTest : public SafetensorsTest {};

TEST_F(WeightsTest, SingleFileAndShardedLayouts) {
  TensorList in = sample_tensors();
  int64_t total = 0;
  for (auto& [n, t] : in) total += t.nbytes();

  ftune::io::save_weights(dir_, in);
  EXPECT_TRUE(fs::exists(dir_ / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir_ / "model.safetensors.index.json"));
  auto w = ftune::io::load_weights(dir_);
  ASSERT_EQ(w.size(), in.size());
  for (auto& [n, t] : in) EXPECT_TRUE(at::equal(w.at(n), t)) << n;
  EXPECT_EQ(SafetensorsReader(dir_ / "model.safetensors").metadata().at("format"), "pt");

  // 100-byte shards: several files, split in order, plus an index; the single file is removed.
  ftune::io::save_weights(dir_, in, 100);
  EXPECT_FALSE(fs::exists(dir_ / "model.safetensors"));
  auto index = nlohmann::json::parse(ftune::read_file(dir_ / "model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"].get<int64_t>(), total);
  std::set<std::string> files;
  for (auto& [n, f] : index["weight_map"].items()) files.insert(f.get<std::string>());
  ASSERT_GT(files.size(), 2u);
  const std::string last = *files.rbegin();
  char expect_last[64];
  std::snprintf(expect_last, sizeof(expect_last), "model-%05zu-of-%05zu.safetensors", files.size(), files.size());
  EXPECT_EQ(last, expect_last);
  for (const auto& f : files) {
    EXPECT_TRUE(fs::exists(dir_ / f)) << f;
    EXPECT_LE(fs::file_size(dir_ / f), 100u + 1000u) << f;  // data <= 100 bytes unless one big tensor
  }
  EXPECT_EQ(index["weight_map"]["f64"], "model-00001-of-" + last.substr(15, 5) + ".safetensors");
  w = ftune::io::load_weights(dir_);
  ASSERT_EQ(w.size(), in.size());
  for (auto& [n, t] : in) EXPECT_TRUE(at::equal(w.at(n), t)) << n;

  // Back to one file: index and shards are removed.
  ftune::io::save_weights(dir_, in);
  EXPECT_TRUE(fs::exists(dir_ / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir_ / "model.safetensors.index.json"));
  for (const auto& f : files) EXPECT_FALSE(fs::exists(dir_ / f)) << f;
}

TEST_F(WeightsTest, Errors) {
  try {
    ftune::io::load_weights(dir_ / "missing");
    ADD_FAILURE();
  } catch (const ftune::Error& e) {
    EXPECT_EQ(std::string(e.what()),
              (dir_ / "missing").string() + ": no model.safetensors or model.safetensors.index.json");
  }
  ftune::io::save_weights(dir_, {{"a", at::ones({4})}, {"b", at::ones({4})}}, 16);
  // An index naming a tensor its shard lacks.
  auto index = nlohmann::json::parse(ftune::read_file(dir_ / "model.safetensors.index.json"));
  index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors";
  ftune::write_file_atomic(dir_ / "model.safetensors.index.json", index.dump());
  EXPECT_THROW(ftune::io::load_weights(dir_), ftune::Error);
  // An index pointing outside the model dir.
  index["weight_map"].erase("ghost");
  index["weight_map"]["a"] = "../model-00001-of-00002.safetensors";
  ftune::write_file_atomic(dir_ / "model.safetensors.index.json", index.dump());
  EXPECT_THROW(ftune::io::load_weights(dir_), ftune::Error);
}

TEST_F(WeightsTest, TensorInTwoShardsIsAnError) {
  // Both shards hold "a"; the index lists it once. A reader must not pick one silently.
  ftune::io::save_safetensors(dir_ / "model-00001-of-00002.safetensors", {{"a", at::ones({2})}});
  ftune::io::save_safetensors(dir_ / "model-00002-of-00002.safetensors",
                              {{"a", at::zeros({2})}, {"b", at::ones({2})}});
  nlohmann::json index = {{"weight_map", {{"a", "model-00001-of-00002.safetensors"},
                                          {"b", "model-00002-of-00002.safetensors"}}}};
  ftune::write_file_atomic(dir_ / "model.safetensors.index.json", index.dump());
  try {
    ftune::io::load_weights(dir_);
    ADD_FAILURE() << "no error";
  } catch (const ftune::Error& e) {
    EXPECT_EQ(std::string(e.what()), (dir_ / "model-00002-of-00002.safetensors").string() +
                                         ": a: tensor also present in " +
                                         (dir_ / "model-00001-of-00002.safetensors").string());
  }
}

TEST_F(WeightsTest, ReadIntoCopiesInChunksAndConverts) {
  // 24 MB of bf16 rows: read_into copies it in 16 MB chunks, converting to fp32, and the values
  // equal a plain conversion of the aliased tensor.
  at::manual_seed(1);
  at::Tensor big = at::randn({3000, 4000}, at::kBFloat16);
  ftune::io::save_safetensors(dir_ / "w.safetensors", {{"small", at::randn({3})}, {"big", big}});
  SafetensorsReader r(dir_ / "w.safetensors");
  at::Tensor dst = at::empty({3000, 4000}, at::kFloat);
  r.read_into("big", dst);
  EXPECT_TRUE(at::equal(dst, big.to(at::kFloat)));
  EXPECT_TRUE(at::equal(r.tensor("big"), big));  // dropped pages fault back in from the file
  at::Tensor wrong = at::empty({4000, 3000});
  EXPECT_THROW(r.read_into("big", wrong), ftune::Error);
}

}  // namespace

// Every file under `dir`, by name, with its bytes.
std::map<std::string, std::string> files_of(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out[e.path().filename().string()] = ftune::read_file(e.path());
  return out;
}

std::vector<ftune::io::TensorSpec> specs_of(const TensorList& tensors) {
  std::vector<ftune::io::TensorSpec> specs;
  for (const auto& [n, t] : tensors) specs.push_back({n, t.scalar_type(), t.sizes().vec()});
  return specs;
}

// The stream writer in reverse order, in shuffled order and in order gives save_safetensors'
// bytes exactly (the tensors land at the offsets the header announced).
TEST_F(SafetensorsTest, StreamWriterInAnyOrderGivesSaveSafetensorsBytes) {
  TensorList in = sample_tensors();
  const std::map<std::string, std::string> meta = {{"format", "pt"}};
  ftune::io::save_safetensors(dir_ / "ref.safetensors", in, meta);
  const std::string ref = ftune::read_file(dir_ / "ref.safetensors");
  std::vector<size_t> order(in.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::vector<std::vector<size_t>> orders = {order, {order.rbegin(), order.rend()}, order};
  std::swap(orders[2][1], orders[2][7]);
  std::swap(orders[2][0], orders[2][12]);
  for (size_t k = 0; k < orders.size(); ++k) {
    const fs::path p = dir_ / ("s" + std::to_string(k) + ".safetensors");
    ftune::io::SafetensorsStreamWriter w(p, specs_of(in), meta);
    for (size_t i : orders[k]) w.write(in[i].first, in[i].second);
    EXPECT_FALSE(fs::exists(p));  // nothing at the destination until finish()
    w.finish();
    EXPECT_EQ(ftune::read_file(p), ref) << "order " << k;
  }
}

TEST_F(SafetensorsTest, StreamWriterErrorsLeaveNothingBehind) {
  const fs::path p = dir_ / "x.safetensors";
  const std::vector<ftune::io::TensorSpec> specs = {{"a", at::kFloat, {2, 3}}, {"b", at::kByte, {4}}};
  auto message = [&](const std::function<void(ftune::io::SafetensorsStreamWriter&)>& f) {
    try {
      ftune::io::SafetensorsStreamWriter w(p, specs);
      f(w);
    } catch (const ftune::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string where = p.string() + ": ";
  EXPECT_EQ(message([](auto& w) { w.write("a", at::zeros({3, 2})); }),
            where + "a: produced Float [3, 2], announced Float [2, 3]");
  EXPECT_EQ(message([](auto& w) { w.write("b", at::zeros({4})); }),
            where + "b: produced Float [4], announced Byte [4]");
  EXPECT_EQ(message([](auto& w) { w.write("c", at::zeros({1})); }), where + "c: not in the header");
  EXPECT_EQ(message([](auto& w) {
              w.write("a", at::zeros({2, 3}));
              w.write("a", at::zeros({2, 3}));
            }),
            where + "a: written twice");
  EXPECT_EQ(message([](auto& w) {
              w.write("a", at::zeros({2, 3}));
              w.finish();
            }),
            where + "b: announced but never written");
  EXPECT_TRUE(fs::is_empty(dir_)) << "a failed writer left a file";
  try {
    ftune::io::SafetensorsStreamWriter w(p, {{"a", at::kFloat, {1}}, {"a", at::kFloat, {1}}});
    ADD_FAILURE();
  } catch (const ftune::Error& e) {
    EXPECT_EQ(std::string(e.what()), where + "a: duplicate tensor name");
  }
}

// The model-dir writer: the same files as save_weights (single and sharded), in any write order.
TEST_F(WeightsTest, StreamWriterGivesSaveWeightsFiles) {
  TensorList in = sample_tensors();
  for (int64_t max_shard : {int64_t{5} << 30, int64_t{100}}) {
    const fs::path ref = dir_ / ("ref" + std::to_string(max_shard));
    const fs::path got = dir_ / ("got" + std::to_string(max_shard));
    ftune::io::save_weights(ref, in, max_shard);
    ftune::io::WeightsStreamWriter w(got, specs_of(in), max_shard);
    for (size_t i = in.size(); i-- > 0;) w.write(in[i].first, in[i].second);
    w.finish();
    const auto a = files_of(ref), b = files_of(got);
    EXPECT_EQ(a.size(), max_shard == 100 ? 5u : 1u);  // pinned: 4 shards + index at 100 bytes
    ASSERT_EQ(a.size(), b.size());
    for (const auto& [name, bytes] : a) {
      ASSERT_TRUE(b.count(name)) << name;
      EXPECT_EQ(b.at(name), bytes) << name;
    }
  }
}
