// libFuzzer target for the safetensors reader: any byte string must either load (every tensor then
// readable) or throw ftune::Error. The reader maps a path, so each input goes into an in-memory
// file (memfd) opened through /proc/self/fd. Run: safetensors_fuzz tests/fuzz/corpus/st tests/fuzz/seeds/safetensors
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <string>

#include "core/error.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int fd = memfd_create("safetensors_fuzz", 0);
  if (fd < 0 || ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != static_cast<ssize_t>(size)) return 0;
  try {
    ftune::io::SafetensorsReader r("/proc/self/fd/" + std::to_string(fd));
    for (const std::string& name : r.names()) {
      at::Tensor t = r.tensor(name);
      if (t.numel() > 0) (void)t.reshape({-1})[t.numel() - 1].item();
    }
  } catch (const ftune::Error&) {
  }
  return 0;
}
