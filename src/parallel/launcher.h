// `ftune launch`: starts this node's worker processes with torchrun's environment (RANK,
// WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT), prefixes their
// output with the rank, and supervises them: the first failure stops the rest, SIGINT/SIGTERM are
// forwarded, and no worker outlives the launcher. Plain POSIX (fork/exec, pipes, poll): it knows
// nothing of c10d; the workers' rank 0 hosts the store (see process_group.h).
// Defines LaunchOptions, validate_launch_options, worker_env, pick_free_port, find_on_path, launch.
#pragma once

#include <string>
#include <vector>

namespace ftune::parallel {

struct LaunchOptions {
  int nproc = 1;                          // workers on this node (LOCAL_WORLD_SIZE)
  int nnodes = 1;                         // nodes in the job; WORLD_SIZE = nnodes * nproc
  int node_rank = 0;                      // this node's index in [0, nnodes) (GROUP_RANK)
  std::string master_addr = "127.0.0.1";  // host where rank 0 hosts the rendezvous store
  int master_port = 29500;                // its port; 0 = pick a free one (single node only)
  bool exec = false;       // run command[0] from PATH instead of this ftune binary (--no-python)
  double grace_s = 10;     // seconds between SIGTERM and SIGKILL when stopping workers
};

// Throws ftune::Error "launch: --flag: what was expected" for values no run can use: nproc or
// nnodes < 1, node_rank outside [0, nnodes), a port outside 0..65535, port 0 with nnodes > 1
// (the other nodes could not learn it), an empty master_addr, grace_s outside 0..86400.
void validate_launch_options(const LaunchOptions& o);

// The environment of local worker `local_rank`: `parent` ("KEY=VALUE" entries) with the torchrun
// variables set for this worker, TORCHELASTIC_USE_AGENT_STORE removed (no agent store here: the
// workers' rank 0 hosts it) and OMP_NUM_THREADS=1 added when `parent` lacks it.
// o.master_port must already be resolved (not 0).
std::vector<std::string> worker_env(const LaunchOptions& o, int local_rank,
                                    const std::vector<std::string>& parent);

// A TCP port free on `addr` right now: binds port 0 there, reads the port the kernel chose and
// closes the socket. Another process may take it before the store binds it (as with torchrun).
// Throws ftune::Error naming --master-addr when `addr` does not resolve or cannot be bound.
int pick_free_port(const std::string& addr);

// The executable `name` would run as under execvp: `name` itself when it holds a '/', else the
// first executable regular file `dir/name` over $PATH (`path`). "" when there is none.
std::string find_on_path(const std::string& name, const std::string& path);

// Runs `command` in o.nproc workers and supervises them until all have exited; returns the exit
// code the launcher should end with: 0 when every worker exited 0; the first failed worker's
// status (128 + signal when it was killed), after printing one "ftune: error: launch: ..." line
// naming its rank; 128 + the signal when the launcher itself got SIGINT or SIGTERM. Without
// o.exec, `command` is the argument list of this ftune binary (/proc/self/exe), e.g.
// {"train", "--config", "x.yaml"}. Throws ftune::Error for bad options or a command that cannot
// start (before any worker runs). Call it from the main thread: PR_SET_PDEATHSIG, which kills the
// workers when the launcher dies, fires when the thread that forked them exits.
int launch(const LaunchOptions& o, const std::vector<std::string>& command);

}  // namespace ftune::parallel
