// CRC-32C (Castagnoli): the per-file checksum of checkpoint manifests. The same polynomial as
// ext4, iSCSI, leveldb and Google Cloud Storage (`gsutil hash -c` prints it, base64), so a user can
// check a file with common tools. x86-64 uses the SSE4.2 crc32 instruction (chosen at run time),
// three streams interleaved (~8 bytes per cycle); other CPUs a slicing-by-8 table (~1 GB/s). Fast
// enough that checksumming stays small next to writing or reading a multi-GB checkpoint.
// Defines crc32c_extend, crc32c, crc32c_extend_portable, FileChecksum, checksum_file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>

namespace ftune {

// The CRC-32C of `crc`'s data followed by data[0, n): crc32c_extend(crc32c(a), b) == crc32c(ab).
uint32_t crc32c_extend(uint32_t crc, const void* data, size_t n);
inline uint32_t crc32c(const void* data, size_t n) { return crc32c_extend(0, data, n); }
// The table path whatever the CPU: tests check the hardware path against it.
uint32_t crc32c_extend_portable(uint32_t crc, const void* data, size_t n);

struct FileChecksum {
  int64_t size = 0;
  uint32_t crc32c = 0;
};
// Reads `path` once, in large chunks. Throws ftune::Error "<path>: cannot read: <reason>".
FileChecksum checksum_file(const std::filesystem::path& path);

}  // namespace ftune
