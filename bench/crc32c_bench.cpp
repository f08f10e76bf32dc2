// Throughput of CRC-32C (core/crc32c.h), the checksum of every checkpoint file: the in-memory
// checksum of an N MiB buffer (hardware path where the CPU has it, and the portable table), and
// checksum_file on a file of that size just written (in the page cache, as right after a save).
// Prints one line per measurement in GB/s (best of 3). With --files, times checksum_file over the
// given files instead (a checkpoint's: what its save adds and its resume verifies).
//   crc32c_bench [MiB]   (default 1024)
//   crc32c_bench --files FILE...
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>
#include <unistd.h>

#include "core/crc32c.h"

namespace {

template <typename F>
double best_gbps(size_t bytes, F&& f) {
  double best = 1e30;
  for (int i = 0; i < 3; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return bytes / best / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  volatile uint32_t sink = 0;
  if (argc > 1 && std::string(argv[1]) == "--files") {
    size_t bytes = 0;
    for (int i = 2; i < argc; ++i) bytes += std::filesystem::file_size(argv[i]);
    const double gbps = best_gbps(bytes, [&] {
      for (int i = 2; i < argc; ++i) sink = ftune::checksum_file(argv[i]).crc32c;
    });
    std::printf("checksum_file     %d files, %.1f MB: %.3f s (%.2f GB/s)\n", argc - 2, bytes / 1e6,
                bytes / gbps / 1e9, gbps);
    return 0;
  }
  const size_t mib = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1024;
  const size_t n = mib << 20;
  std::vector<uint8_t> buf(n);
  for (size_t i = 0; i < n; ++i) buf[i] = static_cast<uint8_t>(i * 2654435761u >> 13);
  std::printf("crc32c (dispatch) %zu MiB: %.2f GB/s\n", mib,
              best_gbps(n, [&] { sink = ftune::crc32c(buf.data(), n); }));
  std::printf("crc32c (table)    %zu MiB: %.2f GB/s\n", mib,
              best_gbps(n, [&] { sink = ftune::crc32c_extend_portable(0, buf.data(), n); }));
  const auto path = std::filesystem::temp_directory_path() /
                    ("ftune_crc_bench_" + std::to_string(::getpid()));
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(buf.data()),
                                              static_cast<std::streamsize>(n));
  std::printf("checksum_file     %zu MiB: %.2f GB/s (page cache)\n", mib,
              best_gbps(n, [&] { sink = ftune::checksum_file(path).crc32c; }));
  std::filesystem::remove(path);
  return sink == 0xFFFFFFFFu ? 1 : 0;  // keeps `sink` live
}
