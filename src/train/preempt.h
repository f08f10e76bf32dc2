// Preemption: SIGTERM (what SLURM, Kubernetes and cloud schedulers send before they take the
// machine back, and what `ftune launch`/torchrun forward to their workers) or SIGINT (Ctrl-C)
// during `ftune train`. The first one only sets a flag: the loop finishes the optimizer step it
// is in, agrees with the other ranks that someone was signalled, writes a checkpoint and returns,
// and the process exits 128 + the signal (143, 130). A second signal exits at once with that code:
// checkpoint writes are temp-and-rename, so the last complete checkpoint stays loadable.
// Defines StopSignals.
#pragma once

namespace ftune::train {

// Installs the handlers for SIGTERM and SIGINT while it lives (the previous ones come back after).
class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;
  // The first signal received (SIGTERM or SIGINT), or 0.
  static int received();
};

}  // namespace ftune::train
