// c10d behind ftune's ProcessGroup; see process_group.h. The TCPStore server takes over a socket
// bound here to MASTER_ADDR (c10d would listen on every interface), Gloo's pairs bind to the
// address that routes to MASTER_ADDR (or GLOO_SOCKET_IFNAME), and every failure is rethrown as one
// ftune::Error line naming this rank, the collective, the time waited and what the store knows of
// the other ranks (the first one that failed and why, or the ones that lag behind).
#include "parallel/process_group.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <c10/util/Exception.h>
#include <c10/util/Logging.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if FTUNE_WITH_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cerrno>
#include <condition_variable>
#include <thread>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <regex>
#include <vector>

#include "core/error.h"

namespace ftune::parallel {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

int parse_int(const std::string& name, const std::string& value, int lo, int hi) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(value.c_str(), &end, 10);
  FTUNE_CHECK(!value.empty() && *end == '\0' && errno == 0 && v >= lo && v <= hi,
              "environment: ", name, "=", value, ": expected an integer in [", lo, ", ", hi, "]");
  return static_cast<int>(v);
}

std::string seconds_text(milliseconds ms) {
  std::ostringstream os;
  os << static_cast<double>(ms.count()) / 1000.0 << " s";
  return os.str();
}

std::string first_line(std::string s) {
  const auto nl = s.find('\n');
  if (nl != std::string::npos) s.resize(nl);
  return s;
}

std::vector<uint8_t> bytes_of(const std::string& s) { return {s.begin(), s.end()}; }
std::string string_of(const std::vector<uint8_t>& b) { return {b.begin(), b.end()}; }

// A listening socket on host:port only (port 0: the kernel picks one), for the TCPStore server.
int listen_on(const std::string& host, int port, const std::string& origin) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  const std::string port_text = std::to_string(port);
  const int rc = ::getaddrinfo(host.c_str(), port_text.c_str(), &hints, &res);
  FTUNE_CHECK(rc == 0, origin, ": MASTER_ADDR=", host, ": cannot resolve: ", gai_strerror(rc));
  int err = 0;
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      err = errno;
      continue;
    }
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, 2048) == 0) {
      ::freeaddrinfo(res);
      return fd;
    }
    err = errno;
    ::close(fd);
  }
  ::freeaddrinfo(res);
  if (err == EADDRINUSE) {
    fail(origin, ": MASTER_PORT=", port, ": ", host, ":", port, " is already in use (another run? "
         "pick another port, or `ftune launch --master-port 0` for a free one)");
  }
  fail(origin, ": MASTER_ADDR=", host, ": cannot listen on ", host, ":", port, ": ",
       std::strerror(err), " (MASTER_ADDR must be an address of rank 0's host)");
}

// The local address that routes to `host` (a connected UDP socket sends nothing): the interface
// Gloo binds its pairs to, so they listen where the other ranks can reach them, and only there.
std::string local_address_towards(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0) return host;
  std::string out = host;
  const int fd = ::socket(res->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd >= 0 && ::connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    char buf[INET6_ADDRSTRLEN] = {};
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0) {
      const void* addr =
          ss.ss_family == AF_INET
              ? static_cast<const void*>(&reinterpret_cast<sockaddr_in*>(&ss)->sin_addr)
              : static_cast<const void*>(&reinterpret_cast<sockaddr_in6*>(&ss)->sin6_addr);
      if (::inet_ntop(ss.ss_family, addr, buf, sizeof(buf)) != nullptr) out = buf;
    }
  }
  if (fd >= 0) ::close(fd);
  ::freeaddrinfo(res);
  return out;
}

std::optional<std::string> process_getenv(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return std::nullopt;
  return std::string(v);
}

// A Gloo (CPU) or NCCL (CUDA) backend over `store` for `size` ranks, this one being `rank`; env
// gives MASTER_ADDR/PORT (which interface Gloo binds to).
c10::intrusive_ptr<c10d::Backend> make_backend(const c10::intrusive_ptr<c10d::Store>& store,
                                               const DistEnv& env, int rank, int size,
                                               const GroupOptions& o, const std::string& origin) {
  c10::intrusive_ptr<c10d::Backend> backend;
  try {
    if (o.device.is_cuda()) {
#if FTUNE_WITH_NCCL
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(o.device.index()));
      auto no = c10d::ProcessGroupNCCL::Options::create();
      no->timeout = o.timeout;
      backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(
          c10::make_intrusive<c10d::PrefixStore>("nccl", store), rank, size, no);
#else
      fail(origin, ": model.device is ", o.device.str(),
           " but this ftune was built without CUDA, so without NCCL");
#endif
    } else {
      auto go = c10d::ProcessGroupGloo::Options::create(o.timeout);
      const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
      go->devices.push_back(
          ifname != nullptr && *ifname != '\0'
              ? c10d::ProcessGroupGloo::createDeviceForInterface(ifname)
              : c10d::ProcessGroupGloo::createDeviceForHostname(
                    local_address_towards(env.master_addr, env.master_port)));
      go->threads = 2;
      backend = c10::make_intrusive<c10d::ProcessGroupGloo>(
          c10::make_intrusive<c10d::PrefixStore>("gloo", store), rank, size, go);
    }
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& e) {
    fail(origin, ": cannot connect the ", o.device.is_cuda() ? "NCCL" : "Gloo", " group: ",
         first_line(e.what_without_backtrace()));
  } catch (const std::exception& e) {
    fail(origin, ": cannot connect the ", o.device.is_cuda() ? "NCCL" : "Gloo", " group: ",
         first_line(e.what()));
  }
  return backend;
}

}  // namespace

std::string first_host_of_nodelist(const std::string& nodelist) {
  // "prefix[a-b,c]suffix,..." -> prefix + a (zero padding kept) + suffix; "a,b" -> "a".
  std::string first;
  int depth = 0;
  for (char c : nodelist) {
    if (c == '[') ++depth;
    if (c == ']') --depth;
    if (c == ',' && depth == 0) break;
    first += c;
  }
  const auto open = first.find('[');
  if (open == std::string::npos) return first;
  const auto close = first.find(']', open);
  FTUNE_CHECK(close != std::string::npos, "environment: SLURM_JOB_NODELIST=", nodelist,
              ": unbalanced '['");
  std::string range = first.substr(open + 1, close - open - 1);
  range = range.substr(0, range.find(','));
  range = range.substr(0, range.find('-'));
  return first.substr(0, open) + range + first.substr(close + 1);
}

DistEnv read_dist_env(const std::function<std::optional<std::string>(const char*)>& getenv) {
  DistEnv e;
  auto get_int = [&](const char* name, int lo, int hi) -> std::optional<int> {
    const auto v = getenv(name);
    if (!v) return std::nullopt;
    return parse_int(name, *v, lo, hi);
  };
  constexpr int kMax = 1 << 20;
  const char* rank_var = nullptr;
  const char* size_var = nullptr;
  if (getenv("RANK") || getenv("WORLD_SIZE")) {
    rank_var = "RANK", size_var = "WORLD_SIZE";
    e.source = "torchrun";
    e.local_rank = get_int("LOCAL_RANK", 0, kMax).value_or(-1);
    e.local_world_size = get_int("LOCAL_WORLD_SIZE", 1, kMax).value_or(-1);
  } else if (getenv("SLURM_PROCID")) {
    rank_var = "SLURM_PROCID", size_var = "SLURM_NTASKS";
    e.source = "slurm";
    e.local_rank = get_int("SLURM_LOCALID", 0, kMax).value_or(-1);
    // SLURM_NTASKS_PER_NODE may read "4" or "4(x2)"; only its leading count matters here.
    if (auto v = getenv("SLURM_NTASKS_PER_NODE")) {
      const std::string lead = v->substr(0, v->find_first_not_of("0123456789"));
      if (!lead.empty()) e.local_world_size = parse_int("SLURM_NTASKS_PER_NODE", lead, 1, kMax);
    }
  } else if (getenv("OMPI_COMM_WORLD_RANK")) {
    rank_var = "OMPI_COMM_WORLD_RANK", size_var = "OMPI_COMM_WORLD_SIZE";
    e.source = "ompi";
    e.local_rank = get_int("OMPI_COMM_WORLD_LOCAL_RANK", 0, kMax).value_or(-1);
    e.local_world_size = get_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1, kMax).value_or(-1);
  } else {
    return e;  // one process
  }
  const auto rank = get_int(rank_var, 0, kMax);
  const auto size = get_int(size_var, 1, kMax);
  FTUNE_CHECK(rank && size, "environment: ", rank ? size_var : rank_var, " is not set (", rank_var,
              " and ", size_var, " come together; set both, or neither for one process)");
  e.rank = *rank;
  e.world_size = *size;
  FTUNE_CHECK(e.rank < e.world_size, "environment: ", rank_var, "=", e.rank, ": must be below ",
              size_var, "=", e.world_size);
  if (e.local_rank < 0) e.local_rank = e.world_size == 1 ? 0 : e.rank;
  if (e.local_world_size < 0) e.local_world_size = e.world_size;
  FTUNE_CHECK(e.local_rank < e.local_world_size || e.source == "slurm", "environment: local rank ",
              e.local_rank, " must be below the local world size ", e.local_world_size);

  if (auto a = getenv("MASTER_ADDR")) {
    e.master_addr = *a;
  } else if (e.source == "slurm") {
    if (auto nl = getenv("SLURM_JOB_NODELIST")) e.master_addr = first_host_of_nodelist(*nl);
  }
  if (auto p = getenv("MASTER_PORT")) e.master_port = parse_int("MASTER_PORT", *p, 1, 65535);
  if (e.master_port == 0 && e.source != "torchrun") e.master_port = 29500;
  if (e.world_size > 1) {
    FTUNE_CHECK(!e.master_addr.empty(), "environment: MASTER_ADDR is not set: with ", size_var, "=",
                e.world_size, " every rank needs the host of rank 0 (e.g. MASTER_ADDR=127.0.0.1 "
                "on one node)");
    FTUNE_CHECK(e.master_port != 0, "environment: MASTER_PORT is not set: with ", size_var, "=",
                e.world_size, " every rank needs the port of rank 0's store (e.g. 29500)");
  }
  if (auto a = getenv("TORCHELASTIC_USE_AGENT_STORE")) {
    e.agent_store = *a == "True" || *a == "true" || *a == "1";
  }
  return e;
}

DistEnv read_dist_env() { return read_dist_env(process_getenv); }

int64_t CommStats::total_wire() const {
  int64_t n = 0;
  for (const auto& [k, v] : wire_bytes) n += v;
  return n;
}

CommStats& CommStats::operator+=(const CommStats& o) {
  for (const auto& [k, v] : o.calls) calls[k] += v;
  for (const auto& [k, v] : o.payload_bytes) payload_bytes[k] += v;
  for (const auto& [k, v] : o.wire_bytes) wire_bytes[k] += v;
  wait_s += o.wait_s;
  return *this;
}

struct ProcessGroup::Impl {
  DistEnv env;
  GroupOptions opts;
  c10::intrusive_ptr<c10d::Store> tcp;    // the TCPStore itself (its timeout is set here)
  c10::intrusive_ptr<c10d::Store> store;  // prefixed "ftune/"
  c10::intrusive_ptr<c10d::Backend> backend;
  // A subgroup (ProcessGroup::subgroup) points at the world group's Impl, which counts its traffic
  // and holds the step and failure flags; the world group points at itself. group_rank/group_size
  // are the position in and size of this group; env stays the world's (messages name global ranks).
  Impl* root = this;
  int group_rank = 0, group_size = 1;
  std::string label;  // " (<name> group)" for a subgroup, in its error messages
  std::mutex stats_mutex;
  CommStats stats;
  std::atomic<int64_t> step{-1};
  bool failed = false;
  bool comm_failed = false;  // the failure was a collective's: a consequence, not a cause
  // Test seam: FTUNE_TEST_KILL_AT="<rank>:<text>" makes that rank SIGKILL itself as it starts the
  // first collective whose name contains <text> (fault tests aim a death inside a collective).
  std::string kill_at;

  // Heartbeat: a thread bumps "alive/<rank>" every kBeat, so a rank that waited in vain can tell
  // the peers that stopped beating (killed, SIGSTOPped, the machine gone) from the ones that are
  // merely busy or waiting too.
  static constexpr milliseconds kBeat{400};
  std::thread beat_thread;
  std::mutex beat_mutex;
  std::condition_variable beat_cv;
  bool beat_stop = false;

  void start_heartbeat() {
    beat_thread = std::thread([this] {
      int64_t n = 0;
      std::unique_lock<std::mutex> lock(beat_mutex);
      while (!beat_stop) {
        lock.unlock();
        try {
          store->set("alive/" + std::to_string(env.rank),
                     bytes_of(std::to_string(++n) + " " + std::to_string(step.load())));
        } catch (const std::exception&) {
          return;  // the store is gone: nothing left to tell
        }
        lock.lock();
        beat_cv.wait_for(lock, kBeat, [this] { return beat_stop; });
      }
    });
  }
  void stop_heartbeat() {
    {
      std::lock_guard<std::mutex> lock(beat_mutex);
      beat_stop = true;
    }
    beat_cv.notify_all();
    if (beat_thread.joinable()) beat_thread.join();
  }

  void count(const char* op, int64_t payload, double wire_factor) {
    std::lock_guard<std::mutex> lock(root->stats_mutex);
    root->stats.calls[op] += 1;
    root->stats.payload_bytes[op] += payload;
    root->stats.wire_bytes[op] +=
        static_cast<int64_t>(static_cast<double>(payload) * wire_factor + 0.5);
  }
  double ring_factor() const {  // (n-1)/n over this group
    return static_cast<double>(group_size - 1) / static_cast<double>(group_size);
  }

  // What the store says about the other ranks: the first failure one of them recorded as its own
  // (not a knock-on collective failure), else the ranks whose heartbeat stopped, else who lags.
  // Store operations get a short timeout here: this runs after a failure, when rank 0 (the
  // store's host) may be the one that is gone or stopped.
  std::string peers_report() {
    try {
      tcp->setTimeout(milliseconds(3000));
      for (int r = 0; r < env.world_size; ++r) {
        if (r == env.rank) continue;
        const std::string key = "failed/" + std::to_string(r);
        if (store->check({key})) {
          return "rank " + std::to_string(r) + " failed: " + string_of(store->get(key));
        }
      }
      // Heartbeats now and a few beats later: the ones that did not move have stopped.
      auto beats = [&] {
        std::vector<std::string> out(env.world_size);
        for (int r = 0; r < env.world_size; ++r) {
          const std::string key = "alive/" + std::to_string(r);
          if (r != env.rank && store->check({key})) out[r] = string_of(store->get(key));
        }
        return out;
      };
      const auto before = beats();
      std::this_thread::sleep_for(kBeat * 4);
      const auto after = beats();
      std::string stopped;
      for (int r = 0; r < env.world_size; ++r) {
        if (r == env.rank || before[r] != after[r]) continue;
        std::string at;
        const auto space = after[r].find(' ');
        if (space != std::string::npos && after[r].substr(space + 1) != "-1") {
          at = " (last at step " + after[r].substr(space + 1) + ")";
        }
        stopped += (stopped.empty() ? "" : ", ") + ("rank " + std::to_string(r) + at);
      }
      if (!stopped.empty()) {
        return stopped + (stopped.find(',') == std::string::npos ? " is" : " are") +
               " not responding (killed, stopped or its host is gone)";
      }
      std::string behind;
      for (int r = 0; r < env.world_size; ++r) {
        const std::string key = "progress/" + std::to_string(r);
        if (r == env.rank || !store->check({key})) continue;
        const int64_t s = std::stoll(string_of(store->get(key)));
        if (s < step) {
          behind += (behind.empty() ? "" : ", ") + ("rank " + std::to_string(r) + " at step " +
                                                    std::to_string(s));
        }
      }
      if (!behind.empty()) {
        return "behind this rank (step " + std::to_string(step) + "): " + behind +
               " (stalled, or still busy: a longer parallel.timeout_s may help)";
      }
      return "every other rank is alive; none recorded a failure";
    } catch (const std::exception&) {
      return "the store at " + env.master_addr + ":" + std::to_string(env.master_port) +
             " is unreachable (rank 0, which hosts it, has likely exited)";
    }
  }

  [[noreturn]] void rethrow(const std::string& what, Clock::time_point t0, const std::string& why) {
    const std::string cause = first_line(why);
    const bool timed_out = cause.find("imed out") != std::string::npos ||
                           cause.find("imeout") != std::string::npos;
    std::ostringstream os;
    const int64_t at_step = root->step;
    os << "rank " << env.rank << ": " << what << label;
    if (at_step >= 0) os << " (step " << at_step << ")";
    if (timed_out) {
      os << " timed out after " << seconds_text(opts.timeout) << " (parallel.timeout_s)";
    } else {
      os << " failed after " << seconds_since(t0) << " s: " << cause;
    }
    os << "; " << root->peers_report();
    failed = root->failed = true;
    comm_failed = root->comm_failed = true;
    throw Error(os.str());
  }

  void wait(const c10::intrusive_ptr<c10d::Work>& work, const std::string& what,
            std::optional<milliseconds> timeout = std::nullopt) {
    const auto t0 = Clock::now();
    try {
      work->wait(timeout.value_or(opts.timeout));
    } catch (const c10::Error& e) {
      account_wait(t0);
      rethrow(what, t0, e.what_without_backtrace());
    } catch (const std::exception& e) {
      account_wait(t0);
      rethrow(what, t0, e.what());
    }
    account_wait(t0);
  }
  void account_wait(Clock::time_point t0) {
    std::lock_guard<std::mutex> lock(root->stats_mutex);
    root->stats.wait_s += seconds_since(t0);
  }

  // Starting a collective can itself throw (a closed connection): same message.
  template <typename F>
  c10::intrusive_ptr<c10d::Work> start(const std::string& what, F&& f) {
    if (!kill_at.empty() && what.find(kill_at) != std::string::npos) ::raise(SIGKILL);
    const auto t0 = Clock::now();
    try {
      return f();
    } catch (const c10::Error& e) {
      rethrow(what, t0, e.what_without_backtrace());
    } catch (const std::exception& e) {
      rethrow(what, t0, e.what());
    }
  }

  void check_tensor(const at::Tensor& t, const std::string& what) const {
    FTUNE_CHECK(t.is_contiguous(), "rank ", env.rank, ": ", what, ": tensor is not contiguous");
    FTUNE_CHECK(t.device().type() == opts.device.type(), "rank ", env.rank, ": ", what,
                ": tensor on ", t.device().str(), ", the group runs on ", opts.device.str());
  }
};

struct ProcessGroup::Pending::Work {
  ProcessGroup::Impl* group = nullptr;
  c10::intrusive_ptr<c10d::Work> work;
  std::string what;
};

void ProcessGroup::Pending::wait() {
  if (!work_) return;
  auto w = std::move(work_);
  w->group->wait(w->work, w->what);
}

ProcessGroup::ProcessGroup(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

ProcessGroup::~ProcessGroup() {
  if (!impl_) return;
  if (impl_->root != impl_.get()) {  // a subgroup: no heartbeat of its own
    if (impl_->root->failed || std::uncaught_exceptions() > 0) (void)impl_.release();
    return;
  }
  if (impl_->failed || std::uncaught_exceptions() > 0) {
    // An orderly shutdown would join Gloo's threads (and the heartbeat), which may sit in a
    // collective or a store call with a dead or stalled peer until the timeout: leave them all
    // to the process exit instead.
    impl_->beat_thread.detach();
    if (impl_->env.rank == 0 && !impl_->env.agent_store && impl_->env.world_size > 2) {
      // This process hosts the store: the other survivors may still be asking it who failed.
      std::this_thread::sleep_for(Impl::kBeat * 4 + std::chrono::seconds(2));
    }
    (void)impl_.release();
    return;
  }
  impl_->stop_heartbeat();
}

std::unique_ptr<ProcessGroup> ProcessGroup::create(const DistEnv& env, const GroupOptions& o) {
  // c10d logs each failure it throws, with a stack, at ERROR level; ftune reports it once, in one
  // line. TORCH_CPP_LOG_LEVEL (as in PyTorch) brings c10d's own logs back for debugging.
  if (std::getenv("TORCH_CPP_LOG_LEVEL") == nullptr) FLAGS_caffe2_log_level = 3;  // FATAL only
  auto impl = std::make_unique<Impl>();
  impl->env = env;
  impl->group_rank = env.rank;
  impl->group_size = env.world_size;
  if (const char* k = std::getenv("FTUNE_TEST_KILL_AT")) {
    const std::string spec = k;
    const auto colon = spec.find(':');
    if (colon != std::string::npos && spec.substr(0, colon) == std::to_string(env.rank)) {
      impl->kill_at = spec.substr(colon + 1);
    }
  }
  impl->opts = o;
  const std::string origin = "rank " + std::to_string(env.rank) + ": rendezvous";
  const std::string where = env.master_addr + ":" + std::to_string(env.master_port);

  // 1. The store: rank 0 hosts it on a socket bound to MASTER_ADDR only.
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(env.master_port);
  so.numWorkers = static_cast<size_t>(env.world_size);
  so.waitWorkers = false;
  so.timeout = o.timeout;
  const bool host = env.rank == 0 && !env.agent_store;
  so.isServer = host;
  if (host) {
    so.masterListenFd = listen_on(env.master_addr, env.master_port, origin);
    if (env.master_port == 0) {  // a one-rank group picks any free port
      sockaddr_storage ss{};
      socklen_t len = sizeof(ss);
      ::getsockname(*so.masterListenFd, reinterpret_cast<sockaddr*>(&ss), &len);
      so.port = ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                               : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
    }
  }
  c10::intrusive_ptr<c10d::Store> tcp;
  try {
    tcp = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
  } catch (const std::exception& e) {
    const auto* ce = dynamic_cast<const c10::Error*>(&e);
    const std::string msg = first_line(ce ? ce->what_without_backtrace() : e.what());
    fail(origin, ": cannot reach the store at MASTER_ADDR:MASTER_PORT ", where, " within ",
         seconds_text(o.timeout), " (is rank 0 running, and are MASTER_ADDR/MASTER_PORT the same "
         "on every rank?): ", msg);
  }
  impl->tcp = tcp;
  impl->store = c10::make_intrusive<c10d::PrefixStore>("ftune", tcp);
  auto& store = *impl->store;

  // 2. Every rank joins once and agrees on WORLD_SIZE.
  try {
    const std::string me = std::to_string(env.rank);
    FTUNE_CHECK(store.add("rank_taken/" + me, 1) == 1, origin, ": RANK ", env.rank,
                " is already taken by another process: every process needs its own RANK");
    // Rank 0 publishes first and checks the others; each other rank checks rank 0's value before
    // publishing its own, so both sides of a mismatch see it before rank 0 (the store) exits.
    const auto mine = bytes_of(std::to_string(env.world_size));
    auto check_peer = [&](int r) {
      const std::string key = "world_size/" + std::to_string(r);
      store.wait({key}, o.timeout);
      const int theirs = std::stoi(string_of(store.get(key)));
      if (theirs != env.world_size && env.rank != 0) store.set("world_size/" + me, mine);
      FTUNE_CHECK(theirs == env.world_size, origin, ": WORLD_SIZE mismatch: rank ", r, " has ",
                  theirs, ", this rank has ", env.world_size, " (start every rank with the same "
                  "WORLD_SIZE)");
    };
    if (env.rank == 0) {
      store.set("world_size/0", mine);
      for (int r = 1; r < env.world_size; ++r) check_peer(r);
    } else {
      check_peer(0);
      store.set("world_size/" + me, mine);
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    fail(origin, ": not every rank joined the store at ", where, " within ",
         seconds_text(o.timeout), " (WORLD_SIZE=", env.world_size, "; are all ranks started?): ",
         first_line(e.what()));
  }

  // 3. The backend.
  impl->backend = make_backend(impl->store, env, env.rank, env.world_size, o, origin);
  impl->start_heartbeat();
  return std::unique_ptr<ProcessGroup>(new ProcessGroup(std::move(impl)));
}

std::unique_ptr<ProcessGroup> ProcessGroup::subgroup(const std::vector<int>& ranks,
                                                     const std::string& name) {
  Impl& root = *impl_->root;
  const auto me = std::find(ranks.begin(), ranks.end(), root.env.rank);
  FTUNE_CHECK(me != ranks.end() && std::is_sorted(ranks.begin(), ranks.end()) &&
                  std::adjacent_find(ranks.begin(), ranks.end()) == ranks.end() &&
                  ranks.front() >= 0 && ranks.back() < root.env.world_size,
              "rank ", root.env.rank, ": ", name, " group: expected ascending distinct ranks below ",
              root.env.world_size, " that include this rank");
  auto impl = std::make_unique<Impl>();
  impl->env = root.env;
  impl->opts = root.opts;
  impl->tcp = root.tcp;
  impl->kill_at = root.kill_at;
  impl->root = &root;
  impl->group_rank = static_cast<int>(me - ranks.begin());
  impl->group_size = static_cast<int>(ranks.size());
  impl->label = " (" + name + " group)";
  std::string key = "sub/" + name + "/";
  for (int r : ranks) key += std::to_string(r) + ",";
  impl->store = c10::make_intrusive<c10d::PrefixStore>(key, root.store);
  impl->backend = make_backend(impl->store, root.env, impl->group_rank, impl->group_size,
                               root.opts, "rank " + std::to_string(root.env.rank) + ": " + name +
                                              " group");
  return std::unique_ptr<ProcessGroup>(new ProcessGroup(std::move(impl)));
}

int ProcessGroup::rank() const { return impl_->group_rank; }
int ProcessGroup::size() const { return impl_->group_size; }
int ProcessGroup::global_rank() const { return impl_->env.rank; }
at::Device ProcessGroup::device() const { return impl_->opts.device; }

ProcessGroup::Pending ProcessGroup::all_reduce_async(const at::Tensor& t, const std::string& what) {
  impl_->check_tensor(t, what);
  impl_->count("all_reduce", t.numel() * t.element_size(), 2.0 * impl_->ring_factor());
  std::vector<at::Tensor> ts{t};
  Pending p = new_pending(what);
  p.work_->work = impl_->start(what, [&] { return impl_->backend->allreduce(ts); });
  return p;
}

void ProcessGroup::all_reduce(const at::Tensor& t, const std::string& what) {
  all_reduce_async(t, what).wait();
}

void ProcessGroup::broadcast(const at::Tensor& t, int root, const std::string& what) {
  impl_->check_tensor(t, what);
  impl_->count("broadcast", t.numel() * t.element_size(), 1.0);
  std::vector<at::Tensor> ts{t};
  c10d::BroadcastOptions bo;
  bo.rootRank = root;
  impl_->wait(impl_->start(what, [&] { return impl_->backend->broadcast(ts, bo); }), what);
}

ProcessGroup::Pending ProcessGroup::new_pending(const std::string& what) {
  Pending p;
  p.work_ = std::make_shared<Pending::Work>();
  p.work_->group = impl_.get();
  p.work_->what = what;
  return p;
}

ProcessGroup::Pending ProcessGroup::all_gather_into_async(const at::Tensor& out,
                                                          const at::Tensor& in,
                                                          const std::string& what) {
  impl_->check_tensor(in, what);
  impl_->check_tensor(out, what);
  FTUNE_CHECK(out.numel() == in.numel() * size(), "rank ", rank(), ": ", what, ": output has ",
              out.numel(), " elements, expected ", size(), " x ", in.numel());
  impl_->count("all_gather", out.numel() * out.element_size(), impl_->ring_factor());
  at::Tensor o = out, i = in;
  Pending p = new_pending(what);
  p.work_->work = impl_->start(what, [&] { return impl_->backend->_allgather_base(o, i); });
  return p;
}

void ProcessGroup::all_gather_into(const at::Tensor& out, const at::Tensor& in,
                                   const std::string& what) {
  all_gather_into_async(out, in, what).wait();
}

ProcessGroup::Pending ProcessGroup::reduce_scatter_async(const at::Tensor& out,
                                                         const at::Tensor& in,
                                                         const std::string& what) {
  impl_->check_tensor(in, what);
  impl_->check_tensor(out, what);
  FTUNE_CHECK(in.numel() == out.numel() * size(), "rank ", rank(), ": ", what, ": input has ",
              in.numel(), " elements, expected ", size(), " x ", out.numel());
  impl_->count("reduce_scatter", in.numel() * in.element_size(), impl_->ring_factor());
  at::Tensor o = out, i = in;
  Pending p = new_pending(what);
  p.work_->work = impl_->start(what, [&] { return impl_->backend->_reduce_scatter_base(o, i); });
  return p;
}

void ProcessGroup::reduce_scatter(const at::Tensor& out, const at::Tensor& in,
                                  const std::string& what) {
  reduce_scatter_async(out, in, what).wait();
}

ProcessGroup::Pending ProcessGroup::send_async(const at::Tensor& t, int dst,
                                               const std::string& what, int tag) {
  impl_->check_tensor(t, what);
  impl_->count("send", t.numel() * t.element_size(), 1.0);
  std::vector<at::Tensor> ts{t};
  Pending p = new_pending(what);
  p.work_->work = impl_->start(what, [&] { return impl_->backend->send(ts, dst, tag); });
  return p;
}

void ProcessGroup::send(const at::Tensor& t, int dst, const std::string& what, int tag) {
  send_async(t, dst, what, tag).wait();
}

void ProcessGroup::recv(const at::Tensor& t, int src, const std::string& what, int tag) {
  impl_->check_tensor(t, what);
  impl_->count("recv", t.numel() * t.element_size(), 0.0);
  std::vector<at::Tensor> ts{t};
  impl_->wait(impl_->start(what, [&] { return impl_->backend->recv(ts, src, tag); }), what);
}

void ProcessGroup::barrier(const std::string& what, std::optional<milliseconds> timeout) {
  c10d::BarrierOptions bo;
  bo.timeout = timeout.value_or(impl_->opts.timeout);
  if (impl_->opts.device.is_cuda()) bo.device_ids = {impl_->opts.device.index()};
  impl_->count("barrier", 0, 0.0);
  impl_->wait(impl_->start(what, [&] { return impl_->backend->barrier(bo); }), what, bo.timeout);
}

void ProcessGroup::mark_progress(int64_t step) {
  Impl& root = *impl_->root;
  root.step = step;
  root.store->set("progress/" + std::to_string(root.env.rank), bytes_of(std::to_string(step)));
}

void ProcessGroup::mark_failed(const std::string& message) {
  Impl& root = *impl_->root;
  root.failed = true;
  if (root.comm_failed) return;  // a knock-on failure: the cause lies with another rank
  try {
    root.store->set("failed/" + std::to_string(root.env.rank), bytes_of(first_line(message)));
  } catch (const std::exception&) {
    // The store host may be gone already; the launcher still names this rank.
  }
}

CommStats ProcessGroup::take_stats() {
  Impl& root = *impl_->root;
  std::lock_guard<std::mutex> lock(root.stats_mutex);
  CommStats out = std::move(root.stats);
  root.stats = CommStats{};
  return out;
}

}  // namespace ftune::parallel
