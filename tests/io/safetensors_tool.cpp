// Test driver exposing ftune's safetensors I/O to tests/python/test_safetensors_io.py, which checks
// it against Python's safetensors and transformers. Errors print one line and exit 1, like `ftune`.
//   dump <file> <out_dir>      listing.json (names in file order, dtype, shape, metadata) + <i>.bin
//   copy <in> <out>            read with SafetensorsReader, write with save_safetensors
//   reshard <in_dir> <out_dir> <max_shard_bytes>   load_weights, then save_weights (names sorted)
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "io/safetensors.h"

namespace {
namespace fs = std::filesystem;
using ftune::io::SafetensorsReader;

int dump(const fs::path& file, const fs::path& out_dir) {
  SafetensorsReader r(file);
  nlohmann::json listing = {{"names", r.names()}, {"metadata", r.metadata()}, {"tensors", nlohmann::json::array()}};
  fs::create_directories(out_dir);
  for (size_t i = 0; i < r.names().size(); ++i) {
    const std::string& name = r.names()[i];
    at::Tensor t = r.tensor(name);
    listing["tensors"].push_back({{"name", name}, {"dtype", ftune::io::safetensors_dtype_name(t.scalar_type())}, {"shape", t.sizes().vec()}});
    std::ofstream os(out_dir / (std::to_string(i) + ".bin"), std::ios::binary);
    os.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
  }
  ftune::write_file_atomic(out_dir / "listing.json", listing.dump(2));
  return 0;
}

int copy(const fs::path& in, const fs::path& out) {
  SafetensorsReader r(in);
  ftune::io::TensorList list;
  for (const std::string& name : r.names()) list.emplace_back(name, r.tensor(name));
  ftune::io::save_safetensors(out, list, r.metadata());
  return 0;
}

int reshard(const fs::path& in_dir, const fs::path& out_dir, int64_t max_bytes) {
  auto weights = ftune::io::load_weights(in_dir);
  ftune::io::TensorList list(weights.begin(), weights.end());
  ftune::io::save_weights(out_dir, list, max_bytes);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string cmd = argc > 1 ? argv[1] : "";
    if (cmd == "dump" && argc == 4) return dump(argv[2], argv[3]);
    if (cmd == "copy" && argc == 4) return copy(argv[2], argv[3]);
    if (cmd == "reshard" && argc == 5) return reshard(argv[2], argv[3], std::stoll(argv[4]));
    std::fprintf(stderr, "usage: safetensors_tool dump FILE OUT_DIR | copy IN OUT | reshard IN_DIR OUT_DIR MAX_BYTES\n");
    return 2;
  } catch (const ftune::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
