// CRC-32C: RFC 3720 (iSCSI) B.4's test vectors and the usual check value, the hardware path
// (SSE4.2, when the CPU has it; three interleaved streams on long inputs) against the portable
// table on random data at every alignment and length up to 100 bytes, split anywhere, and on
// lengths around its block size, and checksum_file against the in-memory CRC of a file
// larger than its read chunk.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "core/crc32c.h"
#include "core/error.h"

namespace fs = std::filesystem;
using namespace ftune;

TEST(Crc32c, KnownVectors) {
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(crc32c("", 0), 0u);
  std::vector<uint8_t> zeros(32, 0), ones(32, 0xFF), inc(32), dec(32);
  for (int i = 0; i < 32; ++i) inc[i] = static_cast<uint8_t>(i), dec[i] = static_cast<uint8_t>(31 - i);
  EXPECT_EQ(crc32c(zeros.data(), 32), 0x8A9136AAu);
  EXPECT_EQ(crc32c(ones.data(), 32), 0x62A8AB43u);
  EXPECT_EQ(crc32c(inc.data(), 32), 0x46DD794Eu);
  EXPECT_EQ(crc32c(dec.data(), 32), 0x113FDB5Cu);
  for (auto* f : {&crc32c_extend_portable}) EXPECT_EQ(f(0, "123456789", 9), 0xE3069283u);
}

TEST(Crc32c, HardwareMatchesTableAtAnyAlignmentAndSplit) {
  std::mt19937 rng(1);
  std::vector<uint8_t> buf(200);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  for (size_t off = 0; off < 8; ++off) {
    for (size_t n = 0; n <= 100; ++n) {
      const uint8_t* p = buf.data() + off;
      const uint32_t want = crc32c_extend_portable(0, p, n);
      ASSERT_EQ(crc32c(p, n), want) << off << " " << n;
      for (size_t cut = 0; cut <= n; cut += 7) {
        ASSERT_EQ(crc32c_extend(crc32c(p, cut), p + cut, n - cut), want) << off << " " << n;
      }
    }
  }
  // Lengths that take the three-stream blocks (3 x 8 KiB), with a tail, at odd alignments.
  std::vector<uint8_t> big(100000);
  for (auto& b : big) b = static_cast<uint8_t>(rng());
  for (size_t off : {0, 1, 5}) {
    for (size_t n : {24575, 24576, 24577, 49152 + 13, 99990}) {
      const uint32_t want = crc32c_extend_portable(0, big.data() + off, n);
      EXPECT_EQ(crc32c(big.data() + off, n), want) << off << " " << n;
      EXPECT_EQ(crc32c_extend(crc32c(big.data() + off, 1000), big.data() + off + 1000, n - 1000),
                want) << off << " " << n;
    }
  }
}

TEST(Crc32c, File) {
  const fs::path p = fs::temp_directory_path() / ("ftune_crc_test_" + std::to_string(::getpid()));
  std::vector<char> data((size_t{9} << 20) + 3);  // beyond two 4 MiB read chunks
  std::mt19937 rng(2);
  for (auto& c : data) c = static_cast<char>(rng());
  std::ofstream(p, std::ios::binary).write(data.data(), static_cast<std::streamsize>(data.size()));
  const FileChecksum c = checksum_file(p);
  EXPECT_EQ(c.size, static_cast<int64_t>(data.size()));
  EXPECT_EQ(c.crc32c, crc32c_extend_portable(0, data.data(), data.size()));
  fs::remove(p);
  try {
    checksum_file(p);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), p.string() + ": cannot read: No such file or directory");
  }
}
