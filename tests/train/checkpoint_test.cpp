// Checkpoint mechanics without a training loop: a save/load round trip restores weights, optimizer
// state and the RNG exactly; latest_checkpoint ignores temp and incomplete dirs; keep_last prunes
// only older checkpoints; trainer_state.json values out of range are errors naming the field;
// metrics.jsonl keeps the lines up to the resumed step; checksums.json lists every file and
// verify_checkpoint names a flipped, truncated or missing one. Crash safety: a forked child is killed
// (SIGKILL, through the crash_point seam of core/fs.h) at every step of replace_dir_atomic and in
// the middle of a checkpoint write; the parent then checks that a loadable final/ (or the
// previous checkpoint) remains.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <functional>

#include "core/crc32c.h"
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

// A checkpoint of `m` at `step`, with the byte-level tokenizer (written into <dir>/tok), as a
// run writes it.
fs::path save_at(const fs::path& dir, model::LlamaForCausalLM& m, const optim::AdamW& opt,
                 int64_t step, int64_t keep_last = 2) {
  const fs::path tok = dir / "tok";
  if (!fs::exists(tok)) model::write_byte_level_tokenizer(tok);
  train::TrainState st;
  st.step = step;
  return train::save_checkpoint(dir, m, opt, st, keep_last, {}, tok);
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

namespace {

// The message verify_checkpoint throws for `dir`, "" when it passes.
std::string verify_error(const fs::path& dir) {
  try {
    train::verify_checkpoint(dir);
    return "";
  } catch (const Error& e) {
    return e.what();
  }
}

}  // namespace

TEST(Checkpoint, ChecksumsListEveryFileAndNameTheDamagedOne) {
  TempDir dir;
  auto m = tiny(0);
  optim::AdamW opt(named(m), {});
  const fs::path ck = save_at(dir.path, m, opt, 3);
  // checksums.json lists every other file with its size and CRC-32C (checked here by
  // checksum_file, whose own oracle is tests/core).
  const nlohmann::json j = nlohmann::json::parse(read_file(ck / "checksums.json"));
  std::vector<std::string> files, listed;
  for (const auto& e : fs::recursive_directory_iterator(ck)) {
    if (e.is_regular_file() && e.path().filename() != "checksums.json") {
      files.push_back(fs::relative(e.path(), ck).generic_string());
    }
  }
  std::sort(files.begin(), files.end());
  for (const auto& [rel, e] : j.at("files").items()) {
    listed.push_back(rel);
    const FileChecksum c = checksum_file(ck / rel);
    EXPECT_EQ(e.at("size").get<int64_t>(), c.size) << rel;
    char hex[9];
    std::snprintf(hex, sizeof(hex), "%08x", c.crc32c);
    EXPECT_EQ(e.at("crc32c").get<std::string>(), hex) << rel;
  }
  EXPECT_EQ(listed, files);
  EXPECT_GE(files.size(), 5u);  // weights, config, optimizer, RNG, trainer state, tokenizer
  EXPECT_TRUE(train::verify_checkpoint(ck).has_checksums);

  const std::string where = "checkpoint " + ck.string() + ": ";
  const std::string state = read_file(ck / "trainer_state.json");
  const std::string opt_bytes = read_file(ck / "optimizer.safetensors");
  const int64_t n = static_cast<int64_t>(opt_bytes.size());
  {  // one flipped bit in the middle of a tensor
    std::string bad = opt_bytes;
    bad[bad.size() / 2] ^= 0x10;
    std::ofstream(ck / "optimizer.safetensors", std::ios::binary) << bad;
    const std::string e = verify_error(ck);
    EXPECT_EQ(e.rfind(where + "optimizer.safetensors: expected CRC-32C " +
                      j["files"]["optimizer.safetensors"]["crc32c"].get<std::string>() +
                      " (checksums.json), found ", 0), 0u) << e;
    EXPECT_NE(e.find(": the file is corrupted"), std::string::npos) << e;
  }
  std::ofstream(ck / "optimizer.safetensors", std::ios::binary)
      << opt_bytes.substr(0, opt_bytes.size() - 100);
  EXPECT_EQ(verify_error(ck), where + "optimizer.safetensors: expected " + std::to_string(n) +
                                  " bytes (checksums.json), found " + std::to_string(n - 100) +
                                  ": truncated or overwritten");
  fs::remove(ck / "optimizer.safetensors");
  EXPECT_EQ(verify_error(ck), where + "optimizer.safetensors: missing (checksums.json lists it)");
  std::ofstream(ck / "optimizer.safetensors", std::ios::binary) << opt_bytes;
  EXPECT_EQ(verify_error(ck), "");
  // trainer_state.json is covered too (a changed digit still parses).
  std::string edited = state;
  edited[edited.find("\"step\": 3")+8] = '4';
  std::ofstream(ck / "trainer_state.json", std::ios::binary) << edited;
  EXPECT_NE(verify_error(ck).find(where + "trainer_state.json: expected CRC-32C"),
            std::string::npos);
  std::ofstream(ck / "trainer_state.json", std::ios::binary) << state;
  // A checkpoint that says it has checksums but lost them is damaged; one written before
  // checksums (format_version 1, no checksums.json) loads unverified.
  fs::remove(ck / "checksums.json");
  EXPECT_EQ(verify_error(ck), where + "checksums.json: missing (trainer_state.json says "
                                      "format_version 2, which has one)");
  nlohmann::json old = nlohmann::json::parse(state);
  old["format_version"] = 1;
  std::ofstream(ck / "trainer_state.json", std::ios::binary) << old.dump(2);
  EXPECT_FALSE(train::verify_checkpoint(ck).has_checksums);
  auto b = tiny(3);
  optim::AdamW opt_b(named(b), {});
  EXPECT_EQ(train::load_checkpoint(ck, b, opt_b).step, 3);
  // resume: auto's candidates: every step-N dir, newest first, complete or not.
  fs::create_directories(dir.path / "checkpoints" / "step-10");
  fs::create_directories(dir.path / "checkpoints" / ".tmp-step-12-1");
  EXPECT_EQ(train::checkpoint_dirs(dir.path),
            (std::vector<fs::path>{dir.path / "checkpoints" / "step-10", ck}));
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

namespace {

const char* g_crash_at = nullptr;

// Runs `body` in a forked child that is SIGKILLed when it reaches crash_point(point); returns
// whether it died there (false: it finished or failed otherwise).
bool killed_at(const char* point, const std::function<void()>& body) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    g_crash_at = point;
    set_crash_hook([](const char* p) {
      if (std::strcmp(p, g_crash_at) == 0) ::kill(::getpid(), SIGKILL);
    });
    try {
      body();
    } catch (...) {
      ::_exit(2);
    }
    ::_exit(0);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
}

bool same_weights(model::LlamaForCausalLM& a, model::LlamaForCausalLM& b) {
  auto pb = b->named_parameters();
  for (const auto& p : a->named_parameters()) {
    if (!at::equal(p.value(), pb[p.key()])) return false;
  }
  return true;
}

}  // namespace

TEST(ReplaceDir, AKillAtAnyPointLeavesALoadableFinalDir) {
  auto old_model = tiny(1), new_model = tiny(2);
  for (bool fallback : {false, true}) {
    for (const char* point : {"replace_dir:before_switch", "replace_dir:fallback_between_renames",
                              "replace_dir:after_switch", "replace_dir:after_cleanup"}) {
      SCOPED_TRACE(std::string(fallback ? "fallback " : "exchange ") + point);
      const bool between = std::strcmp(point, "replace_dir:fallback_between_renames") == 0;
      if (between && !fallback) continue;
      TempDir dir;
      const fs::path final_dir = dir.path / "final", tmp = dir.path / ".tmp-final-1";
      model::save_model(final_dir, old_model);
      model::save_model(tmp, new_model);
      set_replace_dir_fallback_for_testing(fallback);
      EXPECT_TRUE(killed_at(point, [&] { replace_dir_atomic(tmp, final_dir); }));
      set_replace_dir_fallback_for_testing(false);
      // With RENAME_EXCHANGE final/ is complete at every instant. The fallback, killed between its
      // renames, has final/ aside; the next replace (or a run's start) puts it back.
      if (!between) EXPECT_TRUE(fs::exists(final_dir / "model.safetensors"));
      recover_replaced_dir(final_dir);
      auto loaded = model::load_model(final_dir);
      const bool switched = std::strcmp(point, "replace_dir:after_switch") == 0 ||
                            std::strcmp(point, "replace_dir:after_cleanup") == 0;
      EXPECT_TRUE(same_weights(loaded, switched ? new_model : old_model));
      // Only the dir and leftovers of the cut switch (removed by the next run) remain; a later
      // replace works and leaves nothing else behind.
      fs::remove_all(tmp);
      model::save_model(tmp, new_model);
      replace_dir_atomic(tmp, final_dir);
      auto again = model::load_model(final_dir);
      EXPECT_TRUE(same_weights(again, new_model));
      std::vector<std::string> names;
      for (const auto& e : fs::directory_iterator(dir.path)) names.push_back(e.path().filename());
      EXPECT_EQ(names, std::vector<std::string>{"final"});
    }
  }
}

TEST(Checkpoint, AKillMidWriteKeepsThePreviousCheckpoint) {
  TempDir dir;
  auto m = tiny(0);
  optim::AdamW opt(named(m), {});
  const fs::path ck4 = save_at(dir.path, m, opt, 4);
  // Checkpoints are model dirs with the tokenizer, so eval/generate take them as they are.
  EXPECT_TRUE(fs::exists(ck4 / "tokenizer.json"));
  const std::string state4 = read_file(ck4 / "trainer_state.json");
  step(opt, 0.5);
  EXPECT_TRUE(killed_at("checkpoint:after_weights", [&] { save_at(dir.path, m, opt, 6, 1); }));
  const fs::path root = dir.path / "checkpoints";
  bool half_written = false;
  for (const auto& e : fs::directory_iterator(root)) {
    half_written |= e.path().filename().string().rfind(".tmp-step-6-", 0) == 0 &&
                    fs::exists(e.path() / "optimizer.safetensors");
  }
  EXPECT_TRUE(half_written);
  EXPECT_FALSE(fs::exists(root / "step-6"));
  EXPECT_EQ(*train::latest_checkpoint(dir.path), ck4);
  EXPECT_EQ(read_file(ck4 / "trainer_state.json"), state4);
  auto b = tiny(3);
  optim::AdamW opt_b(named(b), {});
  EXPECT_EQ(train::load_checkpoint(ck4, b, opt_b).step, 4);
  train::remove_stale_checkpoint_temps(dir.path);
  EXPECT_EQ(std::distance(fs::directory_iterator(root), fs::directory_iterator()), 1);
}

TEST(Checkpoint, TrainerStateOutOfRangeNamesFileAndField) {
  const nlohmann::json good = train::TrainState{}.to_json();
  auto error_of = [&](const char* key, const nlohmann::json& v) -> std::string {
    nlohmann::json j = good;
    j[key] = v;
    try {
      train::TrainState::from_json(j, "ck/trainer_state.json");
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_EQ(error_of("step", 3), "");
  EXPECT_EQ(error_of("step", -1),
            "ck/trainer_state.json: state.step: expected an integer in [0, 1099511627776], got -1");
  EXPECT_NE(error_of("step", int64_t{1} << 50).find("state.step: expected an integer in [0, "),
            std::string::npos);
  EXPECT_NE(error_of("step", uint64_t{1} << 63).find("state.step: expected an integer"),
            std::string::npos);
  EXPECT_NE(error_of("step", 2.5).find("state.step: expected an integer"), std::string::npos);
  EXPECT_NE(error_of("step", "3").find("state.step: expected an integer"), std::string::npos);
  EXPECT_NE(error_of("epoch", -2).find("ck/trainer_state.json: state.epoch: expected an integer"),
            std::string::npos);
  EXPECT_NE(error_of("position", -1).find("state.position: expected an integer"),
            std::string::npos);
  EXPECT_NE(error_of("tokens_seen", -5).find("state.tokens_seen: expected an integer"),
            std::string::npos);
  EXPECT_NE(error_of("elapsed_s", -1.0).find("state.elapsed_s: expected a finite number >= 0"),
            std::string::npos);
  EXPECT_NE(error_of("last_loss", std::numeric_limits<double>::infinity())
                .find("state.last_loss: expected a finite number"),
            std::string::npos);
  EXPECT_NE(error_of("last_eval_step", 7).find("state.last_eval_step: 7 is after state.step 0"),
            std::string::npos);
  nlohmann::json j = good;
  j.erase("position");
  try {
    train::TrainState::from_json(j, "f.json");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "f.json: state.position: missing");
  }
}
