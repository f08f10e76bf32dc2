// SIGTERM/SIGINT handling for `ftune train`; see preempt.h.
#include "train/preempt.h"

#include <unistd.h>

#include <atomic>
#include <csignal>

namespace ftune::train {
namespace {

std::atomic<int> g_signal{0};
struct sigaction g_old_term, g_old_int;

void on_signal(int sig) {
  int expected = 0;
  if (!g_signal.compare_exchange_strong(expected, sig)) _exit(128 + sig);  // the second one
  static const char msg[] =
      "\nftune: stop signal received: finishing this step and writing a checkpoint (a second "
      "signal exits at once)\n";
  (void)!write(STDERR_FILENO, msg, sizeof(msg) - 1);
}

}  // namespace

StopSignals::StopSignals() {
  g_signal = 0;
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // a blocking read or collective resumes after the handler
  sigaction(SIGTERM, &sa, &g_old_term);
  sigaction(SIGINT, &sa, &g_old_int);
}

StopSignals::~StopSignals() {
  sigaction(SIGTERM, &g_old_term, nullptr);
  sigaction(SIGINT, &g_old_int, nullptr);
}

int StopSignals::received() { return g_signal.load(); }

}  // namespace ftune::train
