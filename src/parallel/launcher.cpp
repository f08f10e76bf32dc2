// The worker launcher; see launcher.h. One thread, one poll() loop over the workers' stdout and
// stderr pipes and a self-pipe that the SIGCHLD/SIGINT/SIGTERM handlers write to, so output,
// exits and signals are handled in the order they happen without races. Each worker runs in its
// own process group (signals reach its children too) and dies with the launcher
// (PR_SET_PDEATHSIG), so nothing outlives a launcher killed with SIGKILL.
#include "parallel/launcher.h"

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>

#include "core/error.h"

extern char** environ;

namespace ftune::parallel {
namespace {

using Clock = std::chrono::steady_clock;

// Longest partial line kept back waiting for its newline; longer ones go out in pieces.
constexpr size_t kMaxLine = 1 << 16;

int g_signal_pipe = -1;  // write end of the self-pipe, for the signal handler

void on_signal(int sig) {
  const int saved = errno;
  const auto byte = static_cast<unsigned char>(sig);
  [[maybe_unused]] const ssize_t n = write(g_signal_pipe, &byte, 1);
  errno = saved;
}

std::string signal_name(int sig) {
  switch (sig) {
    case SIGHUP: return "SIGHUP";
    case SIGINT: return "SIGINT";
    case SIGQUIT: return "SIGQUIT";
    case SIGILL: return "SIGILL";
    case SIGTRAP: return "SIGTRAP";
    case SIGABRT: return "SIGABRT";
    case SIGBUS: return "SIGBUS";
    case SIGFPE: return "SIGFPE";
    case SIGKILL: return "SIGKILL";
    case SIGUSR1: return "SIGUSR1";
    case SIGSEGV: return "SIGSEGV";
    case SIGUSR2: return "SIGUSR2";
    case SIGPIPE: return "SIGPIPE";
    case SIGALRM: return "SIGALRM";
    case SIGTERM: return "SIGTERM";
    case SIGXCPU: return "SIGXCPU";
    case SIGXFSZ: return "SIGXFSZ";
    default: return "SIG" + std::to_string(sig);
  }
}

void write_all(int fd, const std::string& s) {
  const char* p = s.data();
  size_t left = s.size();
  while (left > 0) {
    const ssize_t w = write(fd, p, left);
    if (w < 0) {
      if (errno == EINTR) continue;
      return;  // a closed stdout (e.g. `| head`) must not stop the supervision
    }
    p += w;
    left -= static_cast<size_t>(w);
  }
}

// The launcher's own lines go to its stderr unprefixed, each in one write.
void say(const std::string& line) { write_all(STDERR_FILENO, "launch: " + line + "\n"); }

// One worker pipe (stdout or stderr) and the partial line read from it so far.
struct Stream {
  int fd = -1;      // read end; -1 once closed
  int out_fd = -1;  // the launcher's fd the lines go to
  std::string buf;
};

struct Worker {
  int rank = 0;
  pid_t pid = -1;
  bool running = false;
  int status = 0;  // waitpid status once exited
  std::string prefix;
  Stream out, err;
};

// Writes every complete line of s.buf (and, with `all`, the rest as a line) with the prefix; one
// write() per line, so lines of different workers never interleave mid-line.
void emit_lines(Stream& s, const std::string& prefix, bool all) {
  size_t start = 0;
  for (size_t nl; (nl = s.buf.find('\n', start)) != std::string::npos; start = nl + 1) {
    write_all(s.out_fd, prefix + s.buf.substr(start, nl + 1 - start));
  }
  s.buf.erase(0, start);
  if (!s.buf.empty() && (all || s.buf.size() >= kMaxLine)) {
    write_all(s.out_fd, prefix + s.buf + "\n");
    s.buf.clear();
  }
}

enum class ReadResult { kData, kAgain, kEnd };

ReadResult pump(Stream& s, const std::string& prefix) {
  char tmp[1 << 16];
  const ssize_t n = read(s.fd, tmp, sizeof tmp);
  if (n > 0) {
    s.buf.append(tmp, static_cast<size_t>(n));
    emit_lines(s, prefix, false);
    return ReadResult::kData;
  }
  if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) {
    return ReadResult::kAgain;
  }
  close(s.fd);
  s.fd = -1;
  return ReadResult::kEnd;
}

// Signals a worker's whole process group (it and any children it started).
void signal_worker(const Worker& w, int sig) {
  if (kill(-w.pid, sig) != 0) kill(w.pid, sig);
}

std::string describe_status(int status) {
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    return "was killed by signal " + std::to_string(sig) + " (" + signal_name(sig) + ")";
  }
  return "exited with status " + std::to_string(WEXITSTATUS(status));
}

int exit_code_of(int status) {
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

bool has_env(const std::vector<std::string>& env, const std::string& key) {
  return std::any_of(env.begin(), env.end(),
                     [&](const std::string& e) { return e.rfind(key + "=", 0) == 0; });
}

std::vector<char*> c_strings(std::vector<std::string>& v) {
  std::vector<char*> out;
  for (auto& s : v) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

// Signal dispositions the launcher changes while it runs; restored on every exit path.
class SignalScope {
 public:
  SignalScope() {
    if (pipe2(pipe_, O_CLOEXEC | O_NONBLOCK) != 0) fail("launch: pipe: ", std::strerror(errno));
    g_signal_pipe = pipe_[1];
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    for (int i = 0; i < 3; ++i) sigaction(kHandled[i], &sa, &old_[i]);
    struct sigaction ign {};
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    sigaction(SIGPIPE, &ign, &old_[3]);  // a closed stdout must not kill the supervisor
  }
  ~SignalScope() {
    for (int i = 0; i < 3; ++i) sigaction(kHandled[i], &old_[i], nullptr);
    sigaction(SIGPIPE, &old_[3], nullptr);
    g_signal_pipe = -1;
    close(pipe_[0]);
    close(pipe_[1]);
  }
  SignalScope(const SignalScope&) = delete;
  SignalScope& operator=(const SignalScope&) = delete;
  int read_fd() const { return pipe_[0]; }

  static constexpr int kHandled[3] = {SIGCHLD, SIGINT, SIGTERM};

 private:
  int pipe_[2] = {-1, -1};
  struct sigaction old_[4] {};
};

// In the child between fork and exec: only async-signal-safe calls.
[[noreturn]] void exec_worker(pid_t parent, const sigset_t& old_mask, int out_fd, int err_fd,
                              const char* program, char* const* argv, char* const* envp) {
  // Die with the launcher, even when it is SIGKILLed. If it died before prctl took effect, we
  // are already orphaned and must not start.
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != parent) _exit(1);
  setpgid(0, 0);
  for (int sig : {SIGCHLD, SIGINT, SIGTERM, SIGPIPE}) signal(sig, SIG_DFL);
  sigprocmask(SIG_SETMASK, &old_mask, nullptr);
  const int null_fd = open("/dev/null", O_RDONLY);
  if (null_fd >= 0) dup2(null_fd, STDIN_FILENO);
  dup2(out_fd, STDOUT_FILENO);
  dup2(err_fd, STDERR_FILENO);
  execve(program, argv, envp);
  const char* why = std::strerror(errno);
  const char* parts[] = {"launch: cannot execute ", program, ": ", why, "\n"};
  for (const char* p : parts) [[maybe_unused]] ssize_t n = write(STDERR_FILENO, p, strlen(p));
  _exit(127);
}

}  // namespace

void validate_launch_options(const LaunchOptions& o) {
  FTUNE_CHECK(o.nproc >= 1, "launch: --nproc: expected an integer >= 1, got ", o.nproc);
  FTUNE_CHECK(o.nnodes >= 1, "launch: --nnodes: expected an integer >= 1, got ", o.nnodes);
  FTUNE_CHECK(o.node_rank >= 0 && o.node_rank < o.nnodes,
              "launch: --node-rank: expected an integer in [0, --nnodes) = [0, ", o.nnodes,
              "), got ", o.node_rank);
  FTUNE_CHECK(static_cast<int64_t>(o.nproc) * o.nnodes <= (1 << 20),
              "launch: --nproc, --nnodes: expected at most 1048576 workers in all, got ",
              static_cast<int64_t>(o.nproc) * o.nnodes);
  FTUNE_CHECK(!o.master_addr.empty(),
              "launch: --master-addr: expected a host name or IP address, got \"\"");
  FTUNE_CHECK(o.master_port >= 0 && o.master_port <= 65535,
              "launch: --master-port: expected an integer in 0..65535, got ", o.master_port);
  FTUNE_CHECK(o.master_port != 0 || o.nnodes == 1,
              "launch: --master-port: 0 (pick a free port) works only with --nnodes 1; with ",
              o.nnodes, " nodes the others could not learn the port, so give one");
  FTUNE_CHECK(o.grace_s >= 0 && o.grace_s <= 86400,  // false for nan
              "launch: --grace-s: expected a number of seconds in 0..86400, got ", o.grace_s);
}

std::vector<std::string> worker_env(const LaunchOptions& o, int local_rank,
                                    const std::vector<std::string>& parent) {
  const std::vector<std::pair<std::string, std::string>> set = {
      {"RANK", std::to_string(o.node_rank * o.nproc + local_rank)},
      {"WORLD_SIZE", std::to_string(o.nnodes * o.nproc)},
      {"LOCAL_RANK", std::to_string(local_rank)},
      {"LOCAL_WORLD_SIZE", std::to_string(o.nproc)},
      {"GROUP_RANK", std::to_string(o.node_rank)},
      {"GROUP_WORLD_SIZE", std::to_string(o.nnodes)},
      {"MASTER_ADDR", o.master_addr},
      {"MASTER_PORT", std::to_string(o.master_port)},
  };
  std::vector<std::string> env;
  for (const std::string& e : parent) {
    const std::string key = e.substr(0, e.find('='));
    const bool replaced = std::any_of(set.begin(), set.end(),
                                      [&](const auto& kv) { return kv.first == key; });
    if (!replaced && key != "TORCHELASTIC_USE_AGENT_STORE") env.push_back(e);
  }
  for (const auto& [k, v] : set) env.push_back(k + "=" + v);
  if (!has_env(parent, "OMP_NUM_THREADS")) env.push_back("OMP_NUM_THREADS=1");
  return env;
}

int pick_free_port(const std::string& addr) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const int rc = getaddrinfo(addr.c_str(), "0", &hints, &res);
  FTUNE_CHECK(rc == 0, "launch: --master-addr: cannot resolve \"", addr, "\" (", gai_strerror(rc),
              ")");
  std::string why = "no address";
  int port = -1;
  for (addrinfo* a = res; a != nullptr && port < 0; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      why = std::strerror(errno);
      continue;
    }
    sockaddr_storage bound{};
    socklen_t len = sizeof bound;
    if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 &&
        getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len) == 0) {
      port = ntohs(bound.ss_family == AF_INET6
                       ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                       : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    } else {
      why = std::strerror(errno);
    }
    close(fd);
  }
  freeaddrinfo(res);
  FTUNE_CHECK(port > 0, "launch: --master-port 0: cannot bind a port on --master-addr ", addr,
              " (", why, ")");
  return port;
}

std::string find_on_path(const std::string& name, const std::string& path) {
  auto runnable = [](const std::string& p) {
    struct stat st {};
    return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode) && access(p.c_str(), X_OK) == 0;
  };
  if (name.empty()) return "";
  if (name.find('/') != std::string::npos) return runnable(name) ? name : "";
  for (size_t start = 0;;) {  // every ':'-separated entry, empty ones (= ".") included
    const size_t end = std::min(path.find(':', start), path.size());
    const std::string dir = path.substr(start, end - start);
    const std::string p = (dir.empty() ? "." : dir) + "/" + name;
    if (runnable(p)) return p;
    if (end == path.size()) return "";
    start = end + 1;
  }
}

int launch(const LaunchOptions& opts, const std::vector<std::string>& command) {
  validate_launch_options(opts);
  FTUNE_CHECK(!command.empty() && !command[0].empty(),
              "launch: expected the worker command after -- (e.g. ftune launch --nproc 2 -- "
              "train --config FILE)");
  LaunchOptions o = opts;

  // What each worker runs. /proc/self/exe in the child is this very binary, even if the file was
  // replaced since we started; argv[0] names it as the user sees it.
  std::string program;
  std::vector<std::string> args;
  if (o.exec) {
    const char* path = std::getenv("PATH");
    program = find_on_path(command[0], path != nullptr ? path : "/usr/bin:/bin");
    FTUNE_CHECK(!program.empty(), "launch: --exec: ", command[0],
                ": not found (expected an executable file, or a program on PATH)");
    args = command;
  } else {
    program = "/proc/self/exe";
    std::error_code ec;
    const auto self = std::filesystem::read_symlink(program, ec);
    args.push_back(ec ? std::string("ftune") : self.string());
    args.insert(args.end(), command.begin(), command.end());
  }

  if (o.master_port == 0) {
    o.master_port = pick_free_port(o.master_addr);
    say("--master-port 0: picked free port " + std::to_string(o.master_port) + " on " +
        o.master_addr);
  }
  std::vector<std::string> parent_env;
  for (char** e = environ; *e != nullptr; ++e) parent_env.emplace_back(*e);
  if (!has_env(parent_env, "OMP_NUM_THREADS")) {
    say("OMP_NUM_THREADS is not set; setting it to 1 for each worker so " +
        std::to_string(o.nproc) + " workers do not oversubscribe the cores (set it to tune)");
  }

  std::vector<Worker> workers(static_cast<size_t>(o.nproc));
  std::vector<std::vector<std::string>> envs;
  for (int i = 0; i < o.nproc; ++i) {
    workers[i].rank = o.node_rank * o.nproc + i;
    workers[i].prefix = "[rank " + std::to_string(workers[i].rank) + "] ";
    envs.push_back(worker_env(o, i, parent_env));
  }
  std::vector<char*> argv = c_strings(args);

  SignalScope signals;
  std::fflush(nullptr);  // our own buffered output comes before the workers'

  // Block the handled signals while forking so a child never runs our handler before it resets
  // it; pending ones are delivered once the workers are up.
  sigset_t block, old_mask;
  sigemptyset(&block);
  for (int sig : SignalScope::kHandled) sigaddset(&block, sig);
  sigprocmask(SIG_BLOCK, &block, &old_mask);
  const pid_t self = getpid();
  std::string start_error;
  for (Worker& w : workers) {
    int out[2], err[2];
    if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0) {
      start_error = std::string("pipe: ") + std::strerror(errno);
      break;
    }
    std::vector<char*> envp = c_strings(envs[&w - workers.data()]);
    const pid_t pid = fork();
    if (pid == 0) exec_worker(self, old_mask, out[1], err[1], program.c_str(), argv.data(),
                              envp.data());
    close(out[1]);
    close(err[1]);
    if (pid < 0) {
      start_error = std::string("fork: ") + std::strerror(errno);
      close(out[0]);
      close(err[0]);
      break;
    }
    setpgid(pid, pid);  // also in the child: whichever runs first, the group exists before use
    w.pid = pid;
    w.running = true;
    w.out = {out[0], STDOUT_FILENO, ""};
    w.err = {err[0], STDERR_FILENO, ""};
    fcntl(out[0], F_SETFL, O_NONBLOCK);
    fcntl(err[0], F_SETFL, O_NONBLOCK);
    say("rank " + std::to_string(w.rank) + " pid " + std::to_string(pid));
  }
  sigprocmask(SIG_SETMASK, &old_mask, nullptr);

  int live = 0;
  for (const Worker& w : workers) live += w.running ? 1 : 0;
  const Worker* failed = nullptr;  // the first worker that failed, if any
  int others_stopped = 0;          // workers still running when it failed
  int stop_signal = 0;             // SIGINT/SIGTERM the launcher received, if any
  bool stopping = false, killed = false;
  Clock::time_point kill_at;
  auto stop_all = [&](int sig) {
    for (const Worker& w : workers) {
      if (w.running) signal_worker(w, sig);
    }
  };
  auto begin_stop = [&](int sig) {
    stopping = true;
    stop_all(sig);
    kill_at = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                 std::chrono::duration<double>(o.grace_s));
  };
  if (!start_error.empty()) {
    stop_all(SIGKILL);
    for (Worker& w : workers) {
      if (w.running) waitpid(w.pid, &w.status, 0);
      if (w.out.fd >= 0) close(w.out.fd);
      if (w.err.fd >= 0) close(w.err.fd);
    }
    fail("launch: cannot start worker processes (", start_error, ")");
  }

  while (live > 0) {
    std::vector<pollfd> fds = {{signals.read_fd(), POLLIN, 0}};
    std::vector<std::pair<Stream*, const Worker*>> streams;  // fds[i + 1] reads streams[i]
    for (Worker& w : workers) {
      for (Stream* s : {&w.out, &w.err}) {
        if (s->fd >= 0) {
          fds.push_back({s->fd, POLLIN, 0});
          streams.emplace_back(s, &w);
        }
      }
    }
    int timeout_ms = -1;
    if (stopping && !killed) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(kill_at - Clock::now());
      timeout_ms = static_cast<int>(std::max<int64_t>(0, left.count()));
    }
    if (poll(fds.data(), fds.size(), timeout_ms) < 0 && errno != EINTR) {
      fail("launch: poll: ", std::strerror(errno));
    }

    for (size_t i = 1; i < fds.size(); ++i) {
      if (fds[i].revents != 0) pump(*streams[i - 1].first, streams[i - 1].second->prefix);
    }

    unsigned char sigs[64];
    for (ssize_t n; (n = read(signals.read_fd(), sigs, sizeof sigs)) > 0;) {
      for (ssize_t i = 0; i < n; ++i) {
        const int sig = sigs[i];
        if (sig == SIGCHLD) continue;  // exits are reaped below, every round
        if (!stopping) {
          stop_signal = sig;
          say("got " + signal_name(sig) + "; forwarding it to the " + std::to_string(live) +
              " running worker(s)");
          begin_stop(sig);
        } else if (!killed) {
          say("got " + signal_name(sig) + " while stopping the workers; sending SIGKILL");
          stop_all(SIGKILL);
          killed = true;
        }
      }
    }

    // Reap every exit first, so "stopped the other N" counts only workers still running.
    const Worker* failed_now = nullptr;
    for (Worker& w : workers) {
      if (!w.running || waitpid(w.pid, &w.status, WNOHANG) != w.pid) continue;
      w.running = false;
      --live;
      const bool ok = WIFEXITED(w.status) && WEXITSTATUS(w.status) == 0;
      if (!ok && failed_now == nullptr) failed_now = &w;
    }
    if (failed_now != nullptr && !stopping) {
      failed = failed_now;
      others_stopped = live;
      begin_stop(SIGTERM);
    }

    if (stopping && !killed && live > 0 && Clock::now() >= kill_at) {
      for (const Worker& w : workers) {
        if (!w.running) continue;
        std::ostringstream msg;
        msg << "rank " << w.rank << " (pid " << w.pid << ") still running " << o.grace_s
            << " s after the stop signal; sending SIGKILL";
        say(msg.str());
      }
      stop_all(SIGKILL);
      killed = true;
    }
  }

  // Every worker has exited: print what they left in the pipes (their own children may still
  // hold the write ends, so read only what is there) and any last partial line.
  for (Worker& w : workers) {
    for (Stream* s : {&w.out, &w.err}) {
      while (s->fd >= 0 && pump(*s, w.prefix) == ReadResult::kData) {
      }
      emit_lines(*s, w.prefix, true);
      if (s->fd >= 0) close(s->fd);
      s->fd = -1;
    }
  }
  if (stopping) {
    // Children the workers left behind in their process groups go too.
    for (const Worker& w : workers) kill(-w.pid, SIGKILL);
  }

  if (stop_signal != 0) return 128 + stop_signal;
  if (failed != nullptr) {
    std::string line = "ftune: error: launch: rank " + std::to_string(failed->rank) + " (pid " +
                       std::to_string(failed->pid) + ") " + describe_status(failed->status);
    if (others_stopped > 0) {
      line += "; stopped the other " + std::to_string(others_stopped) + " worker(s)";
    }
    write_all(STDERR_FILENO, line + "\n");
    return exit_code_of(failed->status);
  }
  return 0;
}

}  // namespace ftune::parallel
