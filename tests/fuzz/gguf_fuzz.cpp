// libFuzzer target for the GGUF reader: any byte string must either parse (and then dequantize and
// expose raw bytes without faults) or throw ftune::Error. Any other exception, crash, sanitizer
// report, hang or huge allocation is a bug. Build: -DFTUNE_BUILD_FUZZERS=ON with clang (see
// tests/fuzz/CMakeLists.txt); run: gguf_fuzz -max_total_time=600 tests/fuzz/corpus/gguf tests/fuzz/seeds/gguf
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "io/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto f = ftune::io::GgufFile::from_bytes(std::vector<uint8_t>(data, data + size), "fuzz.gguf");
    (void)f.metadata().dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    for (const auto& t : f.tensors()) {
      at::Tensor raw = f.raw(t.name);
      if (raw.numel() > 0) (void)raw[raw.numel() - 1].item<uint8_t>();
      // The element count is bounded by the file size times the densest format's ratio (TQ1_0).
      if (ftune::io::ggml_type_traits(t.type)->can_dequantize) (void)f.dequantize(t.name);
    }
  } catch (const ftune::Error&) {
  }
  return 0;
}
