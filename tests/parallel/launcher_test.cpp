// The launcher's pure helpers: the torchrun environment each worker gets, the option checks and
// their messages, free-port probing (checked by binding the port it returns) and the PATH lookup
// of --exec. Real launches are in tests/python/test_launch.py.
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include "core/error.h"
#include "parallel/launcher.h"

namespace ftune::parallel {
namespace {

std::map<std::string, std::string> as_map(const std::vector<std::string>& env) {
  std::map<std::string, std::string> m;
  for (const auto& e : env) {
    const auto eq = e.find('=');
    EXPECT_NE(eq, std::string::npos) << e;
    EXPECT_TRUE(m.emplace(e.substr(0, eq), e.substr(eq + 1)).second) << "duplicate " << e;
  }
  return m;
}

TEST(WorkerEnv, TorchrunVariablesForEachWorker) {
  LaunchOptions o;
  o.nproc = 2;
  o.nnodes = 3;
  o.node_rank = 1;
  o.master_addr = "node0";
  o.master_port = 1234;
  const std::vector<std::string> parent = {"PATH=/bin", "RANK=9", "WORLD_SIZE=99",
                                           "TORCHELASTIC_USE_AGENT_STORE=True", "A=b=c"};
  auto env = as_map(worker_env(o, 1, parent));
  EXPECT_EQ(env["RANK"], "3");  // node_rank * nproc + local_rank
  EXPECT_EQ(env["WORLD_SIZE"], "6");
  EXPECT_EQ(env["LOCAL_RANK"], "1");
  EXPECT_EQ(env["LOCAL_WORLD_SIZE"], "2");
  EXPECT_EQ(env["GROUP_RANK"], "1");
  EXPECT_EQ(env["GROUP_WORLD_SIZE"], "3");
  EXPECT_EQ(env["MASTER_ADDR"], "node0");
  EXPECT_EQ(env["MASTER_PORT"], "1234");
  EXPECT_EQ(env["OMP_NUM_THREADS"], "1");  // absent in the parent
  EXPECT_EQ(env["PATH"], "/bin");
  EXPECT_EQ(env["A"], "b=c");
  EXPECT_EQ(env.count("TORCHELASTIC_USE_AGENT_STORE"), 0u);
  EXPECT_EQ(env.size(), 11u);

  env = as_map(worker_env(o, 0, {"OMP_NUM_THREADS=4"}));
  EXPECT_EQ(env["OMP_NUM_THREADS"], "4");  // the user's choice stays
  EXPECT_EQ(env["RANK"], "2");
  EXPECT_EQ(env["LOCAL_RANK"], "0");
}

// The message of the ftune::Error that f() throws; "" when it throws none.
template <typename F>
std::string thrown(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::string error_of(const LaunchOptions& o) {
  return thrown([&] { validate_launch_options(o); });
}

TEST(ValidateLaunchOptions, DefaultsPassAndEachBadValueNamesItsFlag) {
  EXPECT_EQ(error_of(LaunchOptions{}), "");
  LaunchOptions o;
  o.nproc = 0;
  EXPECT_EQ(error_of(o), "launch: --nproc: expected an integer >= 1, got 0");
  o = {};
  o.nnodes = 0;
  EXPECT_EQ(error_of(o), "launch: --nnodes: expected an integer >= 1, got 0");
  o = {};
  o.nnodes = 2;
  o.node_rank = 2;
  const std::string range = "launch: --node-rank: expected an integer in [0, --nnodes) = [0, 2)";
  EXPECT_EQ(error_of(o), range + ", got 2");
  o.node_rank = -1;
  EXPECT_EQ(error_of(o), range + ", got -1");
  o.node_rank = 1;
  EXPECT_EQ(error_of(o), "");
  o.master_port = 0;
  EXPECT_EQ(error_of(o),
            "launch: --master-port: 0 (pick a free port) works only with --nnodes 1; with 2 nodes "
            "the others could not learn the port, so give one");
  o = {};
  o.master_port = 0;
  EXPECT_EQ(error_of(o), "");
  o.master_port = 65536;
  EXPECT_EQ(error_of(o), "launch: --master-port: expected an integer in 0..65535, got 65536");
  o = {};
  o.master_addr = "";
  EXPECT_EQ(error_of(o), "launch: --master-addr: expected a host name or IP address, got \"\"");
  o = {};
  o.grace_s = -1;
  EXPECT_EQ(error_of(o), "launch: --grace-s: expected a number of seconds in 0..86400, got -1");
  o.grace_s = std::nan("");
  EXPECT_EQ(error_of(o), "launch: --grace-s: expected a number of seconds in 0..86400, got nan");
  o.grace_s = 1e300;  // would overflow the clock's duration
  EXPECT_EQ(error_of(o), "launch: --grace-s: expected a number of seconds in 0..86400, got 1e+300");
  o.grace_s = 0;
  EXPECT_EQ(error_of(o), "");
  o.nproc = 2048;
  o.nnodes = 1024;
  EXPECT_EQ(error_of(o),
            "launch: --nproc, --nnodes: expected at most 1048576 workers in all, got 2097152");
}

TEST(Launch, RefusesAnEmptyCommandBeforeStartingAnything) {
  EXPECT_EQ(thrown([] { launch(LaunchOptions{}, {}); }),
            "launch: expected the worker command after -- (e.g. ftune launch --nproc 2 -- "
            "train --config FILE)");
}

TEST(PickFreePort, ReturnsAPortThatCanBeBound) {
  for (int i = 0; i < 3; ++i) {
    const int port = pick_free_port("127.0.0.1");
    ASSERT_GT(port, 0);
    ASSERT_LE(port, 65535);
    // The oracle: the kernel lets us listen on it right away.
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0) << port;
    EXPECT_EQ(listen(fd, 1), 0);
    close(fd);
  }
}

TEST(PickFreePort, AnAddressNotOfThisMachineIsAnError) {
  EXPECT_EQ(thrown([] { pick_free_port("192.0.2.1"); }),  // TEST-NET-1: never a local address
            "launch: --master-port 0: cannot bind a port on --master-addr 192.0.2.1 (Cannot "
            "assign requested address)");
}

TEST(FindOnPath, LooksUpLikeExecvp) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("ftune_path_" + std::to_string(getpid()));
  fs::create_directories(dir / "sub");
  std::ofstream(dir / "tool") << "#!/bin/sh\n";
  std::ofstream(dir / "plain") << "data\n";
  fs::permissions(dir / "tool", fs::perms::owner_all);
  const std::string d = dir.string();
  EXPECT_EQ(find_on_path("tool", "/nonexistent:" + d), d + "/tool");
  EXPECT_EQ(find_on_path("plain", d), "");  // not executable
  EXPECT_EQ(find_on_path("sub", d), "");    // a directory
  EXPECT_EQ(find_on_path("tool", "/nonexistent"), "");
  EXPECT_EQ(find_on_path(d + "/tool", ""), d + "/tool");  // a '/' skips PATH
  EXPECT_EQ(find_on_path(d + "/plain", d), "");
  EXPECT_EQ(find_on_path("", d), "");
  const fs::path cwd = fs::current_path();
  fs::current_path(dir);
  EXPECT_EQ(find_on_path("tool", "/nonexistent::/bin"), "./tool");  // an empty entry is "."
  EXPECT_EQ(find_on_path("tool", "/nonexistent:"), "./tool");
  EXPECT_EQ(find_on_path("tool", ""), "./tool");
  fs::current_path(cwd);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace ftune::parallel
