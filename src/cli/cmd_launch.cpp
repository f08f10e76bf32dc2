// `ftune launch --nproc N [--nnodes K --node-rank R --master-addr A --master-port P] -- CMD...`:
// runs N workers of this ftune binary (or, with --exec, any program) on this node with torchrun's
// environment, rank-prefixed output and fail-fast supervision (parallel/launcher.h). The worker
// command follows `--`, so its own flags never mix with the launcher's. Also holds run_workers,
// which `ftune train --nproc N` shares.
#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "parallel/launcher.h"

namespace ftune::cli {
namespace {

struct LaunchArgs {
  parallel::LaunchOptions opts;
  std::vector<std::string> command;
};

CLI::Validator tcp_port() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        int v = -1;
        const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
        if (!s.empty() && ec == std::errc() && end == s.data() + s.size() && v >= 0 &&
            v <= 65535) {
          return "";
        }
        return "expected an integer in 0..65535 (0: pick a free port), got \"" + s + "\"";
      },
      "");
}

}  // namespace

void run_workers(const parallel::LaunchOptions& opts, const std::vector<std::string>& command) {
  const int code = parallel::launch(opts, command);
  if (code != 0) {
    std::fflush(nullptr);
    std::exit(code);  // the failed worker's status (or 128 + signal), not main()'s 1
  }
}

void register_launch(CLI::App& app) {
  auto a = std::make_shared<LaunchArgs>();
  auto* cmd = app.add_subcommand(
      "launch",
      "Run N worker processes on this node with torchrun's environment (RANK, WORLD_SIZE, "
      "MASTER_ADDR, ...): ftune launch --nproc N -- train --config FILE");
  cmd->add_option("--nproc", a->opts.nproc, "Worker processes on this node (LOCAL_WORLD_SIZE)")
      ->check(int_at_least(1))
      ->type_name("N");
  cmd->add_option("--nnodes", a->opts.nnodes, "Nodes in the run (default 1); WORLD_SIZE = "
                                              "nnodes * nproc")
      ->check(int_at_least(1))
      ->type_name("K");
  cmd->add_option("--node-rank", a->opts.node_rank, "This node's index in 0..K-1 (default 0)")
      ->check(int_at_least(0))
      ->type_name("R");
  cmd->add_option("--master-addr", a->opts.master_addr,
                  "Host of the rank-0 node, where the rendezvous store listens (default "
                  "127.0.0.1)")
      ->type_name("HOST");
  cmd->add_option("--master-port", a->opts.master_port,
                  "Port of the rendezvous store (default 29500; 0 = pick a free one, single "
                  "node only)")
      ->check(tcp_port())
      ->type_name("PORT");
  cmd->add_option("--grace-s", a->opts.grace_s,
                  "Seconds a stopping worker gets between SIGTERM and SIGKILL (default 10)")
      ->type_name("SECONDS");
  cmd->add_flag("--exec", a->opts.exec,
                "Run the command after -- as a program found on PATH, not as ftune arguments "
                "(like torchrun --no-python)");
  cmd->add_option("command", a->command,
                  "After --: the worker's ftune arguments (e.g. train --config FILE), or with "
                  "--exec a program and its arguments");
  cmd->callback([a, cmd] {
    FTUNE_CHECK(cmd->count("--nproc") > 0,
                "launch: --nproc: required (worker processes on this node)");
    // CLI11 keeps the `--` marker among the leftovers; a command without it would have had its
    // options parsed as the launcher's.
    const auto left = cmd->remaining();
    const bool marker = std::find(left.begin(), left.end(), "--") != left.end();
    FTUNE_CHECK(marker && !a->command.empty(),
                "launch: expected the worker command after -- (e.g. ftune launch --nproc 2 -- "
                "train --config FILE)");
    run_workers(a->opts, a->command);
  });
}

}  // namespace ftune::cli
