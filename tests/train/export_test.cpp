// The streamed export (train::save_trained_streamed) against save_trained, byte for byte, in one
// process: a full model (one file and shards), LoRA adapters on an fp32 and a bf16 base, QLoRA
// adapters on an NF4 base, and an NF4 model without adapters (bitsandbytes' layout). The strategy
// used poisons every tensor outside the unit it hands to the export (NaN, 0xAB bytes), so a
// tensor read outside its unit's gather would show in the bytes; a non-main rank writes nothing
// but takes part in every gather.
#include <gtest/gtest.h>
#include <unistd.h>

#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "core/fs.h"
#include "lora/lora.h"
#include "model/hf_io.h"
#include "train/checkpoint.h"
#include "train/export.h"

namespace fs = std::filesystem;
using namespace ftune;

namespace {

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("ftune_export_test_" + std::to_string(::getpid()));
  TempDir() { fs::remove_all(path), fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

std::map<std::string, std::string> files_of(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out[e.path().filename().string()] = read_file(e.path());
  return out;
}

void expect_same_files(const fs::path& want, const fs::path& got) {
  const auto a = files_of(want), b = files_of(got);
  EXPECT_GT(a.size(), 1u);
  ASSERT_EQ(a.size(), b.size()) << want << " vs " << got;
  for (const auto& [name, bytes] : a) {
    ASSERT_TRUE(b.count(name)) << name << " missing from " << got;
    EXPECT_TRUE(b.at(name) == bytes) << name << " differs (" << bytes.size() << " vs "
                                     << b.at(name).size() << " bytes)";
  }
}

// Every tensor the export may read, with its unit: parameters (base and adapters) and the 4-bit
// weights' own tensors (not the code tables, which all linears share).
std::vector<std::pair<int64_t, at::Tensor>> unit_tensors(model::LlamaForCausalLM& m) {
  std::vector<std::pair<int64_t, at::Tensor>> out;
  const auto& c = m->config();
  for (const auto& p : m->named_parameters()) out.emplace_back(model::unit_of(p.key(), c), p.value());
  for (const auto& item : m->named_modules()) {
    auto lin = std::dynamic_pointer_cast<model::LinearImpl>(item.value());
    if (!lin || !lin->nf4) continue;
    const int64_t u = model::unit_of(item.key() + ".weight", c);
    for (const at::Tensor* t : {&lin->nf4->packed, &lin->nf4->absmax, &lin->nf4->nested_absmax}) {
      if (t->defined()) out.emplace_back(u, *t);
    }
  }
  return out;
}

// One process, but unit u's tensors hold their values only while fn(u) runs, as under FSDP.
class PoisoningStrategy : public train::SingleDevice {
 public:
  explicit PoisoningStrategy(int rank = 0) : rank_(rank) {}
  int rank() const override { return rank_; }
  void for_each_unit_gathered(model::LlamaForCausalLM& m,
                              const std::function<void(int64_t)>& fn) override {
    torch::NoGradGuard no_grad;
    auto tensors = unit_tensors(m);
    std::vector<at::Tensor> saved;
    for (auto& [u, t] : tensors) saved.push_back(t.clone());
    for (int64_t u = 0; u < model::unit_count(m->config()); ++u) {
      for (auto& [k, t] : tensors) {
        if (k == u) continue;
        if (at::isFloatingType(t.scalar_type())) {
          t.fill_(std::numeric_limits<float>::quiet_NaN());
        } else {
          t.fill_(0xAB);
        }
      }
      units.push_back(u);
      fn(u);
      for (size_t i = 0; i < tensors.size(); ++i) tensors[i].second.copy_(saved[i]);
    }
  }
  std::vector<int64_t> units;  // the units handed out, in order

 private:
  int rank_;
};

model::LlamaForCausalLM tiny(at::ScalarType dtype = at::kFloat) {
  model::LlamaForCausalLM m(model::preset_config("tiny"));
  model::init_weights(m, 3);
  m->to(dtype);
  return m;
}

// All-linear adapters with non-zero B (fresh adapters have B = 0).
void add_adapters(model::LlamaForCausalLM& m) {
  lora::LoraOptions o;
  o.r = 4;
  o.alpha = 8;
  o.targets = {"all-linear"};
  lora::apply_lora(m, o, 1);
  torch::NoGradGuard no_grad;
  at::manual_seed(2);
  for (auto& [name, p] : lora::adapter_parameters(m)) p.normal_(0, 0.1);
}

// An NF4 tiny model: quantized at load from a dense dir written under `root`.
model::LlamaForCausalLM tiny_nf4(const fs::path& root, bool double_quant) {
  auto dense = tiny();
  model::save_model(root / "dense", dense);
  model::LoadOptions lo;
  lo.quant = quant::QuantOptions();
  lo.quant->double_quant = double_quant;
  lo.quant->compute_dtype = at::kFloat;
  return model::load_model(root / "dense", lo);
}

// save_trained into want/, the streamed export through the poisoning strategy into got/.
void check_export(model::LlamaForCausalLM& m, const fs::path& root) {
  train::save_trained(root / "want", m, "base/dir");
  PoisoningStrategy s;
  train::save_trained_streamed(root / "got", m, "base/dir", s);
  std::vector<int64_t> all;
  for (int64_t u = 0; u < model::unit_count(m->config()); ++u) all.push_back(u);
  EXPECT_EQ(s.units, all);
  expect_same_files(root / "want", root / "got");
}

}  // namespace

TEST(StreamedExport, FullModelMatchesSaveTrained) {
  TempDir d;
  auto m = tiny();
  check_export(m, d.path);
  EXPECT_TRUE(fs::exists(d.path / "got" / "model.safetensors"));
}

TEST(StreamedExport, ShardedFullModelMatchesSaveModel) {
  TempDir d;
  auto m = tiny();
  model::save_model(d.path / "want", m, /*max_shard_bytes=*/40000);
  PoisoningStrategy s;
  train::save_trained_streamed(d.path / "got", m, "", s, /*max_shard_bytes=*/40000);
  EXPECT_TRUE(fs::exists(d.path / "got" / "model.safetensors.index.json"));
  EXPECT_GT(files_of(d.path / "got").size(), 4u);  // several shards, the index, two configs
  expect_same_files(d.path / "want", d.path / "got");
}

TEST(StreamedExport, LoraAdaptersMatchSaveTrained) {
  for (at::ScalarType base : {at::kFloat, at::kBFloat16}) {
    TempDir d;
    auto m = tiny(base);
    add_adapters(m);
    check_export(m, d.path);
    EXPECT_TRUE(fs::exists(d.path / "got" / "adapter_model.safetensors")) << base;
    EXPECT_FALSE(fs::exists(d.path / "got" / "model.safetensors")) << base;
  }
}

TEST(StreamedExport, QloraAdaptersAndNf4ModelMatchSaveTrained) {
  for (bool double_quant : {true, false}) {
    TempDir d;
    auto m = tiny_nf4(d.path, double_quant);
    ASSERT_TRUE(model::has_nf4_linears(m));
    check_export(m, d.path / "nf4");  // no adapters: the bitsandbytes layout, 4-bit tensors last
    const std::string cfg = read_file(d.path / "nf4" / "got" / "config.json");
    EXPECT_NE(cfg.find("\"load_in_4bit\": true"), std::string::npos);
    add_adapters(m);
    check_export(m, d.path / "qlora");
  }
}

TEST(StreamedExport, OtherRanksGatherButWriteNothing) {
  TempDir d;
  auto m = tiny();
  add_adapters(m);
  PoisoningStrategy rank1(1);
  train::save_trained_streamed(d.path / "out", m, "", rank1);
  EXPECT_EQ(rank1.units.size(), static_cast<size_t>(model::unit_count(m->config())));
  EXPECT_FALSE(fs::exists(d.path / "out"));
}
