// Checkpoint mechanics without a training loop: a save/load round trip restores weights, optimizer
// state and the RNG exactly; latest_checkpoint ignores temp and incomplete dirs; keep_last prunes
// only older checkpoints; metrics.jsonl keeps the lines up to the resumed step.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>

#include "core/error.h"
#include "core/fs.h"
#include "model/hf_io.h"
#include "train/checkpoint.h"
#include "train/metrics.h"

namespace fs = std::filesystem;
using namespace ftune;

namespace {

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("ftune_ckpt_test_" + std::to_string(::getpid()));
  TempDir() { fs::remove_all(path), fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

model::LlamaForCausalLM tiny(uint64_t seed) {
  model::LlamaForCausalLM m(model::preset_config("tiny"));
  model::init_weights(m, seed);
  return m;
}

optim::NamedTensors named(model::LlamaForCausalLM& m) {
  optim::NamedTensors out;
  for (const auto& p : m->named_parameters()) out.emplace_back(p.key(), p.value());
  return out;
}

// One AdamW step with a deterministic fake gradient.
void step(optim::AdamW& opt, double scale) {
  for (auto& [name, p] : opt.params()) p.mutable_grad() = at::ones_like(p) * scale;
  opt.step(1e-2);
}

}  // namespace

TEST(Checkpoint, RoundTripRestoresEverythingExactly) {
  TempDir dir;
  auto a = tiny(1);
  optim::AdamW opt_a(named(a), {});
  step(opt_a, 0.5);
  train::TrainState st;
  st.step = 1;
  st.epoch = 2;
  st.position = 17;
  st.tokens_seen = 1234;
  st.last_loss = 3.25;
  at::manual_seed(99);
  (void)at::rand({3});
  auto ck = train::save_checkpoint(dir.path, a, opt_a, st, 2);
  EXPECT_EQ(ck, dir.path / "checkpoints" / "step-1");
  const at::Tensor expected_draw = at::rand({4});  // what the RNG gives right after the save

  auto b = tiny(2);  // different weights, fresh optimizer
  optim::AdamW opt_b(named(b), {});
  at::manual_seed(5);
  train::TrainState got = train::load_checkpoint(ck, b, opt_b);
  EXPECT_EQ(got.step, 1);
  EXPECT_EQ(got.epoch, 2);
  EXPECT_EQ(got.position, 17);
  EXPECT_EQ(got.tokens_seen, 1234);
  EXPECT_EQ(got.last_loss, 3.25);
  EXPECT_TRUE(at::equal(at::rand({4}), expected_draw));
  auto pa = a->named_parameters(), pb = b->named_parameters();
  for (const auto& p : pa) EXPECT_TRUE(at::equal(p.value(), pb[p.key()])) << p.key();
  // Both optimizers now continue identically.
  step(opt_a, -0.25);
  step(opt_b, -0.25);
  for (const auto& p : pa) EXPECT_TRUE(at::equal(p.value(), pb[p.key()])) << p.key();
}

TEST(Checkpoint, LatestIgnoresTempAndIncompleteAndPrunesOldest) {
  TempDir dir;
  auto m = tiny(0);
  optim::AdamW opt(named(m), {});
  EXPECT_FALSE(train::latest_checkpoint(dir.path));
  train::TrainState st;
  for (int64_t s : {2, 4, 6}) {
    st.step = s;
    train::save_checkpoint(dir.path, m, opt, st, /*keep_last=*/2);
  }
  const fs::path root = dir.path / "checkpoints";
  EXPECT_FALSE(fs::exists(root / "step-2"));
  EXPECT_TRUE(fs::exists(root / "step-4"));
  EXPECT_EQ(*train::latest_checkpoint(dir.path), root / "step-6");
  // A half-written newer checkpoint (temp dir, or a dir without trainer_state.json) is ignored.
  fs::create_directories(root / ".tmp-step-8-123");
  write_file_atomic(root / ".tmp-step-8-123" / "trainer_state.json", "{}");
  fs::create_directories(root / "step-10");
  fs::create_directories(root / "step-12x");
  EXPECT_EQ(*train::latest_checkpoint(dir.path), root / "step-6");
  train::remove_stale_checkpoint_temps(dir.path);
  EXPECT_FALSE(fs::exists(root / ".tmp-step-8-123"));
  // Loading a dir that is not a complete checkpoint names it.
  try {
    train::load_checkpoint(root / "step-10", m, opt);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("step-10: not a complete checkpoint"), std::string::npos);
  }
}

TEST(Metrics, ResumeKeepsLinesUpToTheCheckpointStep) {
  TempDir dir;
  const fs::path p = dir.path / "metrics.jsonl";
  {
    train::MetricsLog log(p, 0);
    for (int s = 1; s <= 6; ++s) log.write({{"step", s}, {"loss", 1.0 / s}});
  }
  {
    train::MetricsLog log(p, 4);
    log.write({{"step", 5}, {"loss", 0.5}});
  }
  std::string text = read_file(p);
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 5);
  EXPECT_NE(text.find("{\"loss\":0.5,\"step\":5}"), std::string::npos);
  train::MetricsLog fresh(p, 0);
  EXPECT_EQ(read_file(p), "");
}

TEST(Metrics, FlopsPerTokenAndDuration) {
  auto c = model::preset_config("tiny");
  // 6 * (all params - input embedding, untied) + 12 * L * h * s
  const double expect = 6.0 * (c.num_parameters() - c.vocab_size * c.hidden_size) +
                        12.0 * c.num_hidden_layers * c.hidden_size * 128;
  EXPECT_DOUBLE_EQ(train::train_flops_per_token(c, 128), expect);
  EXPECT_EQ(train::format_duration(3725), "1:02:05");
  EXPECT_EQ(train::format_duration(65), "01:05");
  EXPECT_GT(train::peak_memory_bytes(at::kCPU), 0);
}
