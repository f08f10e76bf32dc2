// Sharded checkpoints without a process group: plan_range_reads' copies and its errors for
// uncovered elements; a checkpoint written by n simulated ranks (ZeRO's layout: the flat space cut
// into equal shards, called rank by rank, rank 0 last since its barrier does not wait) loads into
// m ranks' pieces and into whole parameters with every value and AdamW state element exact; a
// consolidated checkpoint loads by flat range too; a rank killed (SIGKILL through crash_point)
// after writing its shard leaves the previous checkpoint the latest and loadable.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include "core/error.h"
#include "core/fs.h"
#include "io/safetensors.h"
#include "train/checkpoint_sharded.h"

namespace fs = std::filesystem;
using namespace ftune;
using train::PieceInfo;

namespace {

struct TempDir {
  fs::path path = fs::temp_directory_path() / ("ftune_shard_test_" + std::to_string(::getpid()));
  TempDir() { fs::remove_all(path), fs::create_directories(path); }
  ~TempDir() { fs::remove_all(path); }
};

// Rank `rank` of `world`, without collectives (barrier returns at once).
class FakeRank : public train::Strategy {
 public:
  FakeRank(int rank, int world) : rank_(rank), world_(world) {}
  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  std::string name() const override { return "zero2"; }

 private:
  int rank_, world_;
};

// The "model": two trainable parameters, 12 + 5 elements, with distinct values, and a full
// optimizer state derived from them.
struct Full {
  optim::NamedTensors params = {{"w", at::arange(12, at::kFloat).view({3, 4}) + 0.5},
                                {"b", at::arange(5, at::kFloat) * -1.25}};
  at::Tensor exp_avg(size_t i) const { return params[i].second * 2 + 1; }
  at::Tensor exp_avg_sq(size_t i) const { return params[i].second * params[i].second + 3; }
  static constexpr int64_t kStep = 7;
};

// ZeRO's pieces of rank `rank` of `world` over `full` (flat space cut into ceil(17 / world)).
struct Pieces {
  optim::NamedTensors params;
  std::vector<PieceInfo> layout;
  std::map<std::string, at::Tensor> state;
};
Pieces zero_pieces(const Full& full, int rank, int world, bool with_values) {
  int64_t total = 0;
  for (const auto& [n, p] : full.params) total += p.numel();
  const int64_t shard = (total + world - 1) / world, lo = rank * shard, hi = lo + shard;
  Pieces out;
  int64_t start = 0;
  for (size_t i = 0; i < full.params.size(); ++i) {
    const auto& [name, p] = full.params[i];
    const int64_t b = std::max(lo, start), e = std::min(hi, start + p.numel());
    start += p.numel();
    if (b >= e) continue;
    const int64_t off = b - (start - p.numel()), len = e - b;
    auto slice = [&](const at::Tensor& t) { return t.reshape({-1}).narrow(0, off, len).clone(); };
    out.params.emplace_back(name, with_values ? slice(p) : at::zeros({len}));
    out.layout.push_back({name, p.sizes().vec(), off});
    out.state[name + ".exp_avg"] = slice(full.exp_avg(i));
    out.state[name + ".exp_avg_sq"] = slice(full.exp_avg_sq(i));
    out.state[name + ".step"] = at::scalar_tensor(Full::kStep, at::kLong);
  }
  return out;
}

// Writes checkpoints/step-<step> as `world` ranks would.
fs::path save_as_ranks(const fs::path& out, const Full& full, int world, int64_t step) {
  fs::path dir;
  for (int r = world - 1; r >= 0; --r) {
    Pieces pc = zero_pieces(full, r, world, true);
    optim::AdamW opt(pc.params, {});
    opt.load_state(pc.state, "test");
    train::TrainState st;
    st.step = step;
    FakeRank rank(r, world);
    dir = train::save_sharded_checkpoint(out, pc.layout, opt, st, 2, {{"world_size", world}}, {},
                                         rank, at::kCPU);
  }
  return dir;
}

// Loads `dir` into fresh (zeroed) pieces of every rank of `world` (0 = whole parameters) and
// checks every element against `full`.
void expect_loads_exactly(const fs::path& dir, const Full& full, int world) {
  for (int r = 0; r < std::max(world, 1); ++r) {
    SCOPED_TRACE("into rank " + std::to_string(r) + " of " + std::to_string(world));
    Pieces want = world > 0 ? zero_pieces(full, r, world, true) : Pieces{};
    optim::NamedTensors params;
    std::vector<PieceInfo> layout;
    if (world > 0) {
      layout = want.layout;
      for (const auto& [n, p] : want.params) params.emplace_back(n, at::zeros_like(p));
    } else {
      for (size_t i = 0; i < full.params.size(); ++i) {
        const auto& [n, p] = full.params[i];
        params.emplace_back(n, at::zeros_like(p));
        want.params.emplace_back(n, p);
        want.state[n + ".exp_avg"] = full.exp_avg(i);
        want.state[n + ".exp_avg_sq"] = full.exp_avg_sq(i);
      }
    }
    optim::AdamW opt(params, {});
    const train::TrainState st = train::load_checkpoint_pieces(dir, layout, opt, at::kCPU);
    EXPECT_EQ(st.step, 3);
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_TRUE(at::equal(params[i].second, want.params[i].second)) << params[i].first;
    }
    for (const auto& [key, t] : opt.state()) {
      if (key.size() > 5 && key.compare(key.size() - 5, 5, ".step") == 0) {
        EXPECT_EQ(t.item<int64_t>(), Full::kStep) << key;
      } else {
        EXPECT_TRUE(at::equal(t, want.state.at(key))) << key;
      }
    }
  }
}

}  // namespace

TEST(PlanRangeReads, FillsTheWantedRangeFromOverlappingShards) {
  const std::vector<train::SavedRange> saved = {{2, 12, 8}, {0, 0, 5}, {1, 5, 7}};
  const auto copies = train::plan_range_reads(saved, 3, 12, "w");
  ASSERT_EQ(copies.size(), 3u);
  const int64_t want[3][4] = {{0, 3, 0, 2}, {1, 0, 2, 7}, {2, 0, 9, 3}};
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(copies[i].source, want[i][0]);
    EXPECT_EQ(copies[i].src_offset, want[i][1]);
    EXPECT_EQ(copies[i].dst_offset, want[i][2]);
    EXPECT_EQ(copies[i].length, want[i][3]);
  }
  // Inside one shard: one copy.
  const auto one = train::plan_range_reads(saved, 6, 4, "w");
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].source, 1);
  EXPECT_EQ(one[0].src_offset, 1);
  EXPECT_EQ(one[0].length, 4);
}

TEST(PlanRangeReads, UncoveredElementsAreNamed) {
  const std::vector<train::SavedRange> gap = {{0, 0, 5}, {1, 7, 13}};
  try {
    train::plan_range_reads(gap, 0, 20, "index.json: w");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("index.json: w: elements [5, 7) are in no shard"),
              std::string::npos) << e.what();
  }
  try {
    train::plan_range_reads({{0, 0, 5}}, 2, 6, "w");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("elements [5, 8) are in no shard"), std::string::npos)
        << e.what();
  }
}

TEST(ShardedCheckpoint, ReshardsToAnyWorldSizeExactly) {
  const Full full;
  for (int saved : {1, 2, 3, 4}) {
    TempDir tmp;
    const fs::path dir = save_as_ranks(tmp.path, full, saved, 3);
    ASSERT_TRUE(train::is_sharded_checkpoint(dir));
    EXPECT_EQ(train::latest_checkpoint(tmp.path), dir);
    for (int load : {0, 1, 2, 3, 5}) {
      SCOPED_TRACE("saved at " + std::to_string(saved));
      expect_loads_exactly(dir, full, load);
    }
  }
}

TEST(ShardedCheckpoint, ConsolidatedCheckpointLoadsByFlatRange) {
  // The single-process format: model.safetensors + optimizer.safetensors, whole tensors.
  const Full full;
  TempDir tmp;
  const fs::path dir = tmp.path / "step-3";
  fs::create_directories(dir);
  io::TensorList weights, opt_state;
  for (size_t i = 0; i < full.params.size(); ++i) {
    const auto& [n, p] = full.params[i];
    weights.emplace_back(n, p);
    opt_state.emplace_back(n + ".exp_avg", full.exp_avg(i));
    opt_state.emplace_back(n + ".exp_avg_sq", full.exp_avg_sq(i));
    opt_state.emplace_back(n + ".step", at::scalar_tensor(Full::kStep, at::kLong));
  }
  io::save_safetensors(dir / "model.safetensors", weights);
  io::save_safetensors(dir / "optimizer.safetensors", opt_state);
  train::write_rng_state(dir / train::kRngFile, at::kCPU);
  train::TrainState st;
  st.step = 3;
  write_file_atomic(dir / "trainer_state.json",
                    nlohmann::json{{"format_version", 1}, {"state", st.to_json()}}.dump());
  for (int load : {0, 2, 3}) expect_loads_exactly(dir, full, load);
}

TEST(ShardedCheckpoint, ErrorsNameTheFileAndParameter) {
  const Full full;
  TempDir tmp;
  const fs::path dir = save_as_ranks(tmp.path, full, 2, 3);
  // A run whose parameter has another shape.
  optim::NamedTensors params = {{"w", at::zeros({4, 3})}, {"b", at::zeros({5})}};
  optim::AdamW opt(params, {});
  try {
    train::load_checkpoint_pieces(dir, {}, opt, at::kCPU);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("index.json: w: shape [3, 4] in the checkpoint, [4, 3] "
                                         "in this run"), std::string::npos) << e.what();
  }
  // A run that trains fewer parameters than the checkpoint holds (whole parameters).
  optim::AdamW only_b({{"b", at::zeros({5})}}, {});
  EXPECT_THROW(train::load_checkpoint_pieces(dir, {}, only_b, at::kCPU), Error);
  // A missing rank file.
  fs::remove(dir / "shards" / "rank-1-of-2.safetensors");
  optim::AdamW whole({{"w", at::zeros({3, 4})}, {"b", at::zeros({5})}}, {});
  EXPECT_THROW(train::load_checkpoint_pieces(dir, {}, whole, at::kCPU), Error);
}

namespace {
const char* g_crash_at = nullptr;
}  // namespace

TEST(ShardedCheckpoint, ARankKilledAfterWritingItsShardLeavesThePreviousCheckpoint) {
  const Full full;
  TempDir tmp;
  const fs::path prev = save_as_ranks(tmp.path, full, 2, 3);
  // Rank 1 of the next checkpoint writes its shard and dies before rank 0 completes the dir.
  const pid_t pid = ::fork();
  if (pid == 0) {
    g_crash_at = "checkpoint:shard_written";
    set_crash_hook([](const char* p) {
      if (std::strcmp(p, g_crash_at) == 0) ::kill(::getpid(), SIGKILL);
    });
    Full changed;
    for (auto& [n, p] : changed.params) p = p + 100;
    try {
      save_as_ranks(tmp.path, changed, 2, 5);
    } catch (...) {
      ::_exit(2);
    }
    ::_exit(0);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  EXPECT_TRUE(fs::exists(tmp.path / "checkpoints" / ".tmp-step-5" / "shards" /
                         "rank-1-of-2.safetensors"));
  EXPECT_EQ(train::latest_checkpoint(tmp.path), prev);
  expect_loads_exactly(prev, full, 3);
  train::remove_stale_checkpoint_temps(tmp.path);
  EXPECT_FALSE(fs::exists(tmp.path / "checkpoints" / ".tmp-step-5"));
}
