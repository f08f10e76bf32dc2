// Measured memory: the bytes of live tensors and their peak, the measurement `ftune train` logs
// next to the estimator's prediction (issue #11). On CUDA the caching allocator's own statistics;
// on CPU a c10 allocator installed in front of LibTorch's default one that counts what it hands
// out and takes back (RSS would also count the binary, the libraries, mmaps and freed pages the
// C library keeps). Defines install_cpu_tracker, tensor_bytes and reset_tensor_peak.
#pragma once

#include <cstdint>

#include <c10/core/Device.h>

namespace ftune::memory {

// Puts the counting allocator in front of the CPU allocator (idempotent; call before the model is
// built: tensors allocated earlier are never counted, and their frees are ignored).
void install_cpu_tracker();
bool cpu_tracker_installed();

struct TensorBytes {
  int64_t live = 0;  // allocated now
  int64_t peak = 0;  // the most allocated at once since the last reset_tensor_peak
};
// CUDA: the caching allocator's allocated bytes (not its reserved segments); CPU: the tracker's
// counts (zero when it is not installed).
TensorBytes tensor_bytes(c10::Device device);
// Starts a new peak window at the current live bytes.
void reset_tensor_peak(c10::Device device);

}  // namespace ftune::memory
