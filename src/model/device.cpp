// Strict device-name parsing; see device.h.
#include "model/device.h"

#include <charconv>

#include "core/error.h"

namespace ftune::model {

at::Device parse_device(const std::string& s, const std::string& origin) {
  if (s == "cpu") return at::kCPU;
  int index = 0;
  bool ok = s == "cuda";
  if (!ok && s.rfind("cuda:", 0) == 0 && s.size() > 5) {
    const char* first = s.data() + 5;
    const char* last = s.data() + s.size();
    // A leading digit rules out signs and spaces; consuming everything rules out "1x".
    auto [end, ec] = std::from_chars(first, last, index);
    ok = first[0] >= '0' && first[0] <= '9' && ec == std::errc() && end == last;
  }
  FTUNE_CHECK(ok, origin, ": expected cpu, cuda or cuda:N, got \"", s, "\"");
  FTUNE_CHECK(at::hasCUDA(), origin, ": ", s, ": no CUDA device available to this build/machine");
  const auto count = static_cast<int64_t>(at::getNumGPUs());
  FTUNE_CHECK(index < count, origin, ": ", s, ": no such CUDA device (this machine has ", count,
              ")");
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index));
}

}  // namespace ftune::model
