// The one place that knows c10d: where this process sits in a run (read from the environment the
// way torchrun, SLURM and Open MPI set it), rendezvous through a TCPStore bound only to
// MASTER_ADDR, and a Gloo (CPU) or NCCL (CUDA) backend whose every collective has a timeout and
// fails with one line naming this rank, the collective and the ranks that lag or failed.
// It also counts what moves (payload and ring bytes per collective type) and how long this rank
// waited on communication that compute did not hide.
// Defines DistEnv, read_dist_env, first_host_of_nodelist, GroupOptions, CommStats, ProcessGroup.
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace ftune::parallel {

// This process's place in a run. One process (world_size 1) when no launcher variable is set.
struct DistEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;        // rank within this node: picks the GPU (cuda:local_rank)
  int local_world_size = 1;
  std::string master_addr;   // host of the TCPStore ("" = not set)
  int master_port = 0;       // its port (0 = not set)
  // torchrun's agent already hosts the store at MASTER_ADDR:MASTER_PORT
  // (TORCHELASTIC_USE_AGENT_STORE=True): every rank, rank 0 included, connects as a client.
  bool agent_store = false;
  std::string source;        // which variables gave it: "torchrun", "slurm", "ompi" or "" (none)
  bool distributed() const { return world_size > 1; }
};

// Reads, in this order of precedence: RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE (torchrun,
// `ftune launch`), SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_NTASKS_PER_NODE (MASTER_ADDR
// defaults to the first host of SLURM_JOB_NODELIST), OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/
// LOCAL_SIZE; MASTER_ADDR and MASTER_PORT apply to all. Malformed or inconsistent values
// (RANK >= WORLD_SIZE, a non-number, a missing MASTER_ADDR when world_size > 1) are errors naming
// the variable. `getenv` returns nullopt for an unset variable (tests pass a map).
DistEnv read_dist_env(const std::function<std::optional<std::string>(const char*)>& getenv);
DistEnv read_dist_env();  // from the process environment

// The first host of a SLURM node list: "gpu[07-09,12],cpu3" -> "gpu07", "node1,node2" -> "node1".
std::string first_host_of_nodelist(const std::string& nodelist);

struct GroupOptions {
  std::chrono::milliseconds timeout{std::chrono::seconds(300)};  // rendezvous and each collective
  at::Device device = at::kCPU;  // kCPU: Gloo; kCUDA: NCCL on cuda:local_rank
};

// What this rank's collectives moved and waited since the last ProcessGroup::take_stats().
struct CommStats {
  std::map<std::string, int64_t> calls;          // by collective: "all_reduce", "broadcast", ...
  std::map<std::string, int64_t> payload_bytes;  // bytes of the tensors handed to the collective
  // Bytes each rank sends under the ring algorithm (REFERENCE.md §5): all-reduce
  // 2(n-1)/n * payload, all-gather and reduce-scatter (n-1)/n * the full tensor, broadcast payload.
  std::map<std::string, int64_t> wire_bytes;
  double wait_s = 0;  // time blocked in wait(): communication that compute did not hide
  int64_t total_wire() const;
  CommStats& operator+=(const CommStats& o);  // adds every count
};

class ProcessGroup {
 public:
  // A collective in flight (from an *_async call). wait() blocks until it finishes; the time
  // blocked counts as exposed communication. Failure or timeout throws ftune::Error.
  class Pending {
   public:
    Pending() = default;
    void wait();

   private:
    friend class ProcessGroup;
    struct Work;
    std::shared_ptr<Work> work_;
  };

  // Rendezvous: rank 0 hosts the TCPStore (unless env.agent_store) on a socket bound to
  // env.master_addr:env.master_port only, the others connect (retrying until o.timeout); every
  // rank checks that all agree on WORLD_SIZE; then the Gloo or NCCL backend is built.
  // Errors (port taken, unreachable master, mismatched WORLD_SIZE) name the variable at fault.
  // A one-rank group (world_size 1) may give master_port 0: any free port on master_addr.
  static std::unique_ptr<ProcessGroup> create(const DistEnv& env, const GroupOptions& o);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  // A group over `ranks` (global ranks, ascending, this one among them) for collectives among
  // them only (a pipeline stage's data-parallel replicas, the stages of one pipeline). Every
  // member calls it with the same ranks and name, and members create their subgroups in the same
  // order. It shares this group's store, timeout, traffic counts, progress and failure reports;
  // its errors name global ranks and "(<name> group)". Destroy it before this group.
  std::unique_ptr<ProcessGroup> subgroup(const std::vector<int>& ranks, const std::string& name);

  int rank() const;         // within this group
  int size() const;
  int global_rank() const;  // within the world
  at::Device device() const;  // where its tensors must live (kCPU for Gloo)

  // Collectives. `what` names it in errors ("all-reduce of gradient bucket 2/5"). Tensors are
  // contiguous and on the group's device; results land in place (all_reduce, broadcast) or in
  // `out`. all_gather_into: out = cat over ranks of `in` along dim 0 (out.numel() = n * in).
  // reduce_scatter: out = this rank's 1/n slice of the sum of every rank's `in`.
  Pending all_reduce_async(const at::Tensor& t, const std::string& what);  // sum
  void all_reduce(const at::Tensor& t, const std::string& what);
  void broadcast(const at::Tensor& t, int root, const std::string& what);
  void all_gather_into(const at::Tensor& out, const at::Tensor& in, const std::string& what);
  void reduce_scatter(const at::Tensor& out, const at::Tensor& in, const std::string& what);
  // The same started in the background (FSDP's prefetch and per-unit reduce-scatter); the
  // tensors must stay alive and untouched until wait() returns.
  Pending all_gather_into_async(const at::Tensor& out, const at::Tensor& in,
                                const std::string& what);
  Pending reduce_scatter_async(const at::Tensor& out, const at::Tensor& in,
                               const std::string& what);
  // Point to point (peers are ranks of this group). A send may wait for the matching recv, so a
  // pipeline starts its sends with send_async and waits for them later.
  // A recv takes the messages of `src` with its `tag` in the order they were sent.
  Pending send_async(const at::Tensor& t, int dst, const std::string& what, int tag = 0);
  void send(const at::Tensor& t, int dst, const std::string& what, int tag = 0);
  void recv(const at::Tensor& t, int src, const std::string& what, int tag = 0);
  // A barrier with its own timeout (default: the group's), e.g. longer while rank 0 saves.
  void barrier(const std::string& what,
               std::optional<std::chrono::milliseconds> timeout = std::nullopt);

  // Records that this rank has reached `step`: timeout messages name the ranks that lag behind.
  void mark_progress(int64_t step);
  // Records this rank's fatal error in the store so the others can name it, and makes the
  // destructor skip the backend's orderly shutdown (which would wait on peers).
  void mark_failed(const std::string& message);

  CommStats take_stats();  // returns the counts since the last call and resets them

 private:
  struct Impl;
  explicit ProcessGroup(std::unique_ptr<Impl> impl);
  Pending new_pending(const std::string& what);  // not started yet
  std::unique_ptr<Impl> impl_;
};

}  // namespace ftune::parallel
