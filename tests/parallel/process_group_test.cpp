// ProcessGroup on real processes over Gloo on localhost: each test forks its ranks (before the
// parent touches ATen, so no thread pool is forked), every rank checks its results against values
// it computes itself, and reports through its exit status and a pipe. Also: reading the
// torchrun/SLURM/Open MPI environment, and each rendezvous fault ending in one clear error; and
// FSDP's gather of the trainable tensors alone on forked ranks.
#include "parallel/process_group.h"

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <ATen/Parallel.h>

#include <chrono>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "parallel/fsdp.h"

namespace ftune::parallel {
namespace {

using Env = std::map<std::string, std::string>;

DistEnv read(const Env& vars) {
  return read_dist_env([&](const char* name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  });
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(DistEnv, NoVariablesIsOneProcess) {
  DistEnv e = read({});
  EXPECT_EQ(e.world_size, 1);
  EXPECT_EQ(e.rank, 0);
  EXPECT_FALSE(e.distributed());
  EXPECT_EQ(e.source, "");
}

TEST(DistEnv, Torchrun) {
  DistEnv e = read({{"RANK", "3"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "1"},
                    {"LOCAL_WORLD_SIZE", "2"}, {"MASTER_ADDR", "10.0.0.1"},
                    {"MASTER_PORT", "1234"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"}});
  EXPECT_EQ(e.source, "torchrun");
  EXPECT_EQ(e.rank, 3);
  EXPECT_EQ(e.world_size, 4);
  EXPECT_EQ(e.local_rank, 1);
  EXPECT_EQ(e.local_world_size, 2);
  EXPECT_EQ(e.master_addr, "10.0.0.1");
  EXPECT_EQ(e.master_port, 1234);
  EXPECT_TRUE(e.agent_store);
}

TEST(DistEnv, Slurm) {
  DistEnv e = read({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"},
                    {"SLURM_NTASKS_PER_NODE", "4(x2)"},
                    {"SLURM_JOB_NODELIST", "gpu[007-009,012],cpu3"}});
  EXPECT_EQ(e.source, "slurm");
  EXPECT_EQ(e.rank, 5);
  EXPECT_EQ(e.world_size, 8);
  EXPECT_EQ(e.local_rank, 1);
  EXPECT_EQ(e.local_world_size, 4);
  EXPECT_EQ(e.master_addr, "gpu007");
  EXPECT_EQ(e.master_port, 29500);
  EXPECT_FALSE(e.agent_store);
}

TEST(DistEnv, OpenMpi) {
  DistEnv e = read({{"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"},
                    {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
                    {"MASTER_ADDR", "h"}});
  EXPECT_EQ(e.source, "ompi");
  EXPECT_EQ(e.rank, 1);
  EXPECT_EQ(e.local_rank, 1);
  EXPECT_EQ(e.master_port, 29500);
}

TEST(DistEnv, FirstHostOfNodelist) {
  EXPECT_EQ(first_host_of_nodelist("node1,node2"), "node1");
  EXPECT_EQ(first_host_of_nodelist("gpu[07-09,12]"), "gpu07");
  EXPECT_EQ(first_host_of_nodelist("a[3,5]-ib,b1"), "a3-ib");
  EXPECT_EQ(first_host_of_nodelist("single"), "single");
}

TEST(DistEnv, BadValuesNameTheVariable) {
  EXPECT_NE(error_of([] { read({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"},
                                {"MASTER_PORT", "1"}}); })
                .find("RANK=2: must be below WORLD_SIZE=2"),
            std::string::npos);
  EXPECT_NE(error_of([] { read({{"RANK", "x"}, {"WORLD_SIZE", "2"}}); }).find("RANK=x"),
            std::string::npos);
  EXPECT_NE(error_of([] { read({{"RANK", "0"}}); }).find("WORLD_SIZE is not set"),
            std::string::npos);
  EXPECT_NE(error_of([] { read({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "5"}}); })
                .find("MASTER_ADDR is not set"),
            std::string::npos);
  EXPECT_NE(error_of([] { read({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}}); })
                .find("MASTER_PORT is not set"),
            std::string::npos);
  EXPECT_NE(error_of([] { read({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"},
                                {"MASTER_PORT", "70000"}}); })
                .find("MASTER_PORT=70000"),
            std::string::npos);
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

DistEnv env_of(int rank, int world, int port) {
  DistEnv e;
  e.rank = rank;
  e.world_size = world;
  e.local_rank = rank;
  e.local_world_size = world;
  e.master_addr = "127.0.0.1";
  e.master_port = port;
  e.source = "torchrun";
  return e;
}

struct RankResult {
  int status = -1;      // exit status (0 = every check passed)
  std::string output;   // what the rank wrote (its error line, if any)
  double seconds = 0;
};

// Forks `world` ranks running body(rank, world, port, out); each exits 0 unless it threw (its
// message goes to `out`). Returns per-rank results.
std::vector<RankResult> run_ranks(
    int world, const std::function<void(int rank, int world, int port)>& body,
    const std::function<int(int rank)>& world_of = nullptr) {
  const int port = free_port();
  std::vector<pid_t> pids;
  std::vector<int> fds;
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < world; ++r) {
    int p[2];
    EXPECT_EQ(::pipe(p), 0);
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::close(p[0]);
      at::set_num_threads(1);
      std::string msg;
      int code = 0;
      try {
        body(r, world_of ? world_of(r) : world, port);
      } catch (const std::exception& e) {
        msg = e.what();
        code = 1;
      }
      if (!msg.empty()) (void)!::write(p[1], msg.data(), msg.size());
      ::close(p[1]);
      std::fflush(nullptr);
      ::_exit(code);
    }
    ::close(p[1]);
    pids.push_back(pid);
    fds.push_back(p[0]);
  }
  std::vector<RankResult> out(world);
  for (int r = 0; r < world; ++r) {
    char buf[4096];
    ssize_t n;
    while ((n = ::read(fds[r], buf, sizeof(buf))) > 0) out[r].output.append(buf, n);
    ::close(fds[r]);
    int st = 0;
    ::waitpid(pids[r], &st, 0);
    out[r].status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    out[r].seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return out;
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error("check failed: " + what);
}

TEST(ProcessGroup, CollectivesOnThreeRanks) {
  auto res = run_ranks(3, [](int rank, int world, int port) {
    GroupOptions o;
    o.timeout = std::chrono::seconds(30);
    auto pg = ProcessGroup::create(env_of(rank, world, port), o);
    require(pg->rank() == rank && pg->size() == world, "rank/size");
    // all-reduce (sum) of rank-dependent values, async form
    at::Tensor a = at::arange(5, at::kFloat) + rank;
    auto pending = pg->all_reduce_async(a, "all-reduce test");
    pending.wait();
    require(at::equal(a, at::arange(5, at::kFloat) * 3 + 3), "all_reduce");
    // broadcast from rank 2
    at::Tensor b = at::full({4}, static_cast<double>(rank), at::kDouble);
    pg->broadcast(b, 2, "broadcast test");
    require(at::equal(b, at::full({4}, 2.0, at::kDouble)), "broadcast");
    // all-gather into one tensor
    at::Tensor g = at::empty({world * 2}, at::kLong);
    pg->all_gather_into(g, at::full({2}, rank, at::kLong), "all-gather test");
    require(at::equal(g, at::tensor({0, 0, 1, 1, 2, 2}, at::kLong)), "all_gather_into");
    // reduce-scatter: rank r gets slice r of the sum
    at::Tensor in = at::arange(6, at::kFloat) * (rank + 1);  // sum over ranks = arange * 6
    at::Tensor rs = at::empty({2}, at::kFloat);
    pg->reduce_scatter(rs, in, "reduce-scatter test");
    require(at::equal(rs, at::arange(2 * rank, 2 * rank + 2, at::kFloat) * 6), "reduce_scatter");
    // send/recv around a ring
    at::Tensor s = at::full({3}, rank, at::kInt), r = at::empty({3}, at::kInt);
    if (rank % 2 == 0) {
      pg->send(s, (rank + 1) % world, "send test");
      pg->recv(r, (rank + world - 1) % world, "recv test");
    } else {
      pg->recv(r, (rank + world - 1) % world, "recv test");
      pg->send(s, (rank + 1) % world, "send test");
    }
    require(at::equal(r, at::full({3}, (rank + world - 1) % world, at::kInt)), "send/recv");
    pg->barrier("barrier test");
    // accounting: all-reduce payload 20 bytes, ring 2(n-1)/n of it
    CommStats st = pg->take_stats();
    require(st.payload_bytes.at("all_reduce") == 20, "all_reduce payload");
    require(st.wire_bytes.at("all_reduce") == 27, "all_reduce wire 2*(2/3)*20 = 26.7");
    require(st.payload_bytes.at("all_gather") == 6 * 8, "all_gather payload");
    require(st.calls.at("barrier") == 1, "barrier count");
    require(pg->take_stats().calls.empty(), "stats reset");
  });
  for (int r = 0; r < 3; ++r) EXPECT_EQ(res[r].status, 0) << "rank " << r << ": " << res[r].output;
}

// FSDP's gather of the trainable tensors alone (what a LoRA adapter's export uses), on 3 ranks
// with uneven shards: the trainable tensors come back whole from the ranks' pieces, the frozen one
// keeps no storage and moves no bytes; a later whole gather brings it back too. And the export's
// switch of a mixed-precision run's trainable tensors to fp32 and back.
TEST(Fsdp, GatherTrainableLeavesTheFrozenTensorsSharded) {
  auto res = run_ranks(3, [](int rank, int world, int port) {
    GroupOptions o;
    o.timeout = std::chrono::seconds(30);
    auto pg = ProcessGroup::create(env_of(rank, world, port), o);
    const at::Tensor base0 = at::arange(20, at::kFloat).reshape({5, 4});
    const at::Tensor a0 = at::arange(21, at::kFloat).mul_(0.5).reshape({7, 3});
    const at::Tensor b0 = at::arange(8, at::kFloat).sub_(3).reshape({2, 4});  // rank 2: no rows
    at::Tensor base = base0.clone(), a = a0.clone().requires_grad_(true),
               b = b0.clone().requires_grad_(true);
    Fsdp fsdp(*pg, {{{"base", base, false, true}, {"a", a, true, true}, {"b", b, true, true}}});
    require(base.storage().nbytes() == 0 && a.storage().nbytes() == 0, "sharded after setup");
    (void)pg->take_stats();

    fsdp.gather_trainable(0);
    require(at::equal(a, a0) && at::equal(b, b0), "trainable tensors gathered whole");
    require(base.storage().nbytes() == 0, "frozen tensor left without storage");
    require(fsdp.gathered_bytes() == (21 + 8) * 4, "gathered bytes: the trainable tensors");
    // Per rank, 16-byte aligned blocks: a 3 rows x 3 (36 -> 48), b 1 row x 4 (16): 64 bytes.
    CommStats st = pg->take_stats();
    require(st.payload_bytes.at("all_gather") == 64 * 3, "all-gather payload without the base");

    fsdp.gather(0);  // whole: the frozen tensor too
    require(at::equal(base, base0) && at::equal(a, a0) && at::equal(b, b0), "whole gather");
    require(fsdp.gathered_bytes() == (20 + 21 + 8) * 4, "gathered bytes: the whole unit");
    require(pg->take_stats().payload_bytes.at("all_gather") == fsdp.gather_payload_bytes(),
            "whole gather payload");
    fsdp.reshard(0);
    require(fsdp.gathered_bytes() == 0 && base.storage().nbytes() == 0 &&
                a.storage().nbytes() == 0, "resharded");

    // Mixed precision: trainable tensors gather in bf16 from their fp32 pieces; an export sets
    // them to fp32 for a while and gets the pieces' values exactly, then back to bf16.
    const at::Tensor c0 = at::arange(21, at::kFloat).mul_(1.0 / 3).reshape({7, 3});
    at::Tensor c = c0.clone().requires_grad_(true);
    FsdpOptions bf16;
    bf16.param_dtype = at::kBFloat16;
    Fsdp mixed(*pg, {{{"c", c, true, true}}}, bf16);
    mixed.gather(0);
    require(c.scalar_type() == at::kBFloat16 && at::equal(c, c0.to(at::kBFloat16)), "bf16 gather");
    mixed.set_trainable_dtype(at::kFloat);
    require(c.scalar_type() == at::kFloat && c.storage().nbytes() == 0, "resharded as fp32");
    mixed.gather_trainable(0);
    require(at::equal(c, c0), "fp32 gather: the pieces' exact values");
    mixed.set_trainable_dtype(at::kBFloat16);
    mixed.gather(0);
    require(at::equal(c, c0.to(at::kBFloat16)), "bf16 again");
  });
  for (int r = 0; r < 3; ++r) EXPECT_EQ(res[r].status, 0) << "rank " << r << ": " << res[r].output;
}

TEST(ProcessGroup, StalledPeerTimesOutNamingCollectiveAndRank) {
  auto res = run_ranks(2, [](int rank, int world, int port) {
    GroupOptions o;
    o.timeout = std::chrono::seconds(3);
    auto pg = ProcessGroup::create(env_of(rank, world, port), o);
    pg->mark_progress(1);
    at::Tensor t = at::ones({8});
    pg->all_reduce(t, "all-reduce of gradient bucket 1/1");
    if (rank == 1) {
      std::this_thread::sleep_for(std::chrono::seconds(8));  // stalls: never joins step 2
      return;
    }
    pg->mark_progress(2);
    pg->all_reduce(t, "all-reduce of gradient bucket 1/1");
  });
  EXPECT_EQ(res[0].status, 1);
  EXPECT_NE(res[0].output.find("rank 0: all-reduce of gradient bucket 1/1 (step 2) timed out after "
                               "3 s (parallel.timeout_s)"),
            std::string::npos)
      << res[0].output;
  EXPECT_NE(res[0].output.find("rank 1 at step 1"), std::string::npos) << res[0].output;
}

TEST(ProcessGroup, DeadPeerFailsTheOthersNamingIt) {
  auto res = run_ranks(2, [](int rank, int world, int port) {
    GroupOptions o;
    o.timeout = std::chrono::seconds(20);
    auto pg = ProcessGroup::create(env_of(rank, world, port), o);
    pg->mark_progress(4);
    if (rank == 1) {
      pg->mark_failed("out of memory in step 4");
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      ::_exit(3);  // dies without a goodbye
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    at::Tensor t = at::ones({8});
    pg->all_reduce(t, "all-reduce of gradient bucket 2/3");
  });
  EXPECT_EQ(res[1].status, 3);
  EXPECT_EQ(res[0].status, 1);
  EXPECT_NE(res[0].output.find("rank 0: all-reduce of gradient bucket 2/3 (step 4)"),
            std::string::npos)
      << res[0].output;
  // Rank 0 hosts the store, so it can name the rank that failed and why.
  EXPECT_NE(res[0].output.find("rank 1 failed: out of memory in step 4"), std::string::npos)
      << res[0].output;
  EXPECT_LT(res[0].seconds, 15) << "a dead peer should not cost the whole timeout";
}

TEST(ProcessGroup, PortTakenIsOneClearError) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(::listen(fd, 1), 0);
  socklen_t len = sizeof(a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  const int port = ntohs(a.sin_port);
  auto res = run_ranks(1, [port](int, int, int) {
    GroupOptions o;
    o.timeout = std::chrono::seconds(5);
    DistEnv e = env_of(0, 2, port);
    ProcessGroup::create(e, o);
  });
  ::close(fd);
  EXPECT_EQ(res[0].status, 1);
  EXPECT_NE(res[0].output.find("MASTER_PORT=" + std::to_string(port) + ": 127.0.0.1:" +
                               std::to_string(port) + " is already in use"),
            std::string::npos)
      << res[0].output;
}

TEST(ProcessGroup, MismatchedWorldSizeIsOneClearError) {
  auto res = run_ranks(
      2,
      [](int rank, int world, int port) {
        GroupOptions o;
        o.timeout = std::chrono::seconds(10);
        ProcessGroup::create(env_of(rank, world, port), o);
      },
      [](int rank) { return rank == 0 ? 2 : 3; });
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(res[r].status, 1) << res[r].output;
    EXPECT_NE(res[r].output.find("WORLD_SIZE mismatch"), std::string::npos) << res[r].output;
    EXPECT_LT(res[r].seconds, 9);
  }
}

TEST(ProcessGroup, MissingRankZeroTimesOut) {
  auto res = run_ranks(1, [](int, int, int port) {
    GroupOptions o;
    o.timeout = std::chrono::seconds(2);
    ProcessGroup::create(env_of(1, 2, port), o);  // rank 1 alone: nobody hosts the store
  });
  EXPECT_EQ(res[0].status, 1);
  EXPECT_NE(res[0].output.find("cannot reach the store at MASTER_ADDR:MASTER_PORT 127.0.0.1:"),
            std::string::npos)
      << res[0].output;
}

}  // namespace
}  // namespace ftune::parallel
