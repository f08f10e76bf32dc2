// Test driver exposing ftune's GGUF reader to tests/python/test_gguf_io.py, which checks it against
// the Python `gguf` package. Errors print one line and exit 1, like `ftune`.
//   info <file>               JSON: version, alignment, data_offset, metadata, types, tensors
//   dequant <file> [names]    float32 bytes of each tensor (all, in file order, by default) to stdout
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/gguf.h"

namespace {
using ftune::io::GgufFile;
using ftune::io::GgufValueType;

int info(const std::string& path) {
  GgufFile f(path);
  nlohmann::json types = nlohmann::json::object();
  for (const auto& [key, value] : f.metadata().items()) {
    auto t = f.metadata_type(key);
    types[key] = {static_cast<uint32_t>(t),
                  t == GgufValueType::ARRAY ? static_cast<uint32_t>(f.metadata_array_type(key)) : 0u};
  }
  nlohmann::json tensors = nlohmann::json::array();
  for (const auto& t : f.tensors()) {
    tensors.push_back({{"name", t.name}, {"ne", t.ne}, {"type", t.type}, {"offset", t.offset},
                       {"n_bytes", t.n_bytes}, {"shape", t.shape()}});
  }
  nlohmann::json out = {{"version", f.version()}, {"alignment", f.alignment()},
                        {"data_offset", f.data_offset()}, {"metadata", f.metadata()},
                        {"types", types}, {"tensors", tensors}};
  std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  return 0;
}

int dequant(const std::string& path, std::vector<std::string> names) {
  GgufFile f(path);
  if (names.empty()) {
    for (const auto& t : f.tensors()) names.push_back(t.name);
  }
  for (const std::string& name : names) {
    at::Tensor t = f.dequantize(name);
    std::fwrite(t.data_ptr(), 1, t.nbytes(), stdout);
  }
  std::fflush(stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string cmd = argc > 1 ? argv[1] : "";
    if (cmd == "info" && argc == 3) return info(argv[2]);
    if (cmd == "dequant" && argc >= 3) return dequant(argv[2], std::vector<std::string>(argv + 3, argv + argc));
    std::fprintf(stderr, "usage: gguf_tool info FILE | dequant FILE [NAME...]\n");
    return 2;
  } catch (const ftune::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
