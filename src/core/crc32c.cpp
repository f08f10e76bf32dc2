// CRC-32C in hardware (SSE4.2) or by table; see crc32c.h.
#include "core/crc32c.h"

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <memory>
#include <vector>

#include "core/error.h"

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace ftune {
namespace {

constexpr uint32_t kPoly = 0x82F63B78;  // Castagnoli, bit-reflected

// kTable[k][b]: the CRC of byte b followed by k zero bytes; slicing-by-8 folds 8 bytes per step.
using Tables = std::array<std::array<uint32_t, 256>, 8>;
constexpr Tables make_tables() {
  Tables t{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t c = b;
    for (int i = 0; i < 8; ++i) c = (c >> 1) ^ ((c & 1) ? kPoly : 0);
    t[0][b] = c;
  }
  for (int k = 1; k < 8; ++k) {
    for (uint32_t b = 0; b < 256; ++b) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFF];
  }
  return t;
}
constexpr Tables kTable = make_tables();

// On the inverted register (pre- and post-conditioning are done by the caller).
uint32_t crc_table(uint32_t c, const uint8_t* p, size_t n) {
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);  // little-endian (x86-64, aarch64)
    w ^= c;
    c = kTable[7][w & 0xFF] ^ kTable[6][(w >> 8) & 0xFF] ^ kTable[5][(w >> 16) & 0xFF] ^
        kTable[4][(w >> 24) & 0xFF] ^ kTable[3][(w >> 32) & 0xFF] ^ kTable[2][(w >> 40) & 0xFF] ^
        kTable[1][(w >> 48) & 0xFF] ^ kTable[0][w >> 56];
  }
  for (; n > 0; --n, ++p) c = (c >> 8) ^ kTable[0][(c ^ *p) & 0xFF];
  return c;
}

#if defined(__x86_64__)
// The crc32 instruction has a latency of 3 cycles and a throughput of 1: three independent
// streams over consecutive kStride-byte parts of a block run three times as fast as one. The
// streams' registers are then combined: for raw registers (no inversion),
// crc(A || B) = shift(crc(A), |B|) ^ crc_from_zero(B), and shifting by kStride zero bytes is
// linear, so it is four table lookups (kShift, built once from the 32 single-bit registers).
constexpr size_t kStride = 8192;

__attribute__((target("sse4.2"))) uint64_t crc_words(uint64_t c, const uint8_t* p, size_t words) {
  for (size_t i = 0; i < words; ++i, p += 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c = _mm_crc32_u64(c, w);
  }
  return c;
}

struct ShiftTable {
  std::array<std::array<uint32_t, 256>, 4> t{};
  ShiftTable() {
    const std::vector<uint8_t> zeros(kStride, 0);
    uint32_t column[32];
    for (int bit = 0; bit < 32; ++bit) {
      column[bit] = static_cast<uint32_t>(crc_words(uint32_t{1} << bit, zeros.data(), kStride / 8));
    }
    for (int k = 0; k < 4; ++k) {
      for (uint32_t b = 0; b < 256; ++b) {
        for (int bit = 0; bit < 8; ++bit) {
          if (b >> bit & 1) t[k][b] ^= column[8 * k + bit];
        }
      }
    }
  }
  uint32_t shift(uint32_t c) const {
    return t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF] ^ t[3][c >> 24];
  }
};

__attribute__((target("sse4.2"))) uint32_t crc_sse42(uint32_t c, const uint8_t* p, size_t n) {
  static const ShiftTable kShift;
  for (; n >= 3 * kStride; n -= 3 * kStride, p += 3 * kStride) {
    uint64_t c0 = c, c1 = 0, c2 = 0;
    for (size_t i = 0; i < kStride; i += 8) {
      uint64_t w0, w1, w2;
      std::memcpy(&w0, p + i, 8);
      std::memcpy(&w1, p + kStride + i, 8);
      std::memcpy(&w2, p + 2 * kStride + i, 8);
      c0 = _mm_crc32_u64(c0, w0);
      c1 = _mm_crc32_u64(c1, w1);
      c2 = _mm_crc32_u64(c2, w2);
    }
    c = kShift.shift(kShift.shift(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1)) ^
        static_cast<uint32_t>(c2);
  }
  c = static_cast<uint32_t>(crc_words(c, p, n / 8));
  for (p += n / 8 * 8, n %= 8; n > 0; --n, ++p) c = _mm_crc32_u8(c, *p);
  return c;
}
const bool kHaveSse42 = __builtin_cpu_supports("sse4.2");
#endif

}  // namespace

uint32_t crc32c_extend(uint32_t crc, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
#if defined(__x86_64__)
  if (kHaveSse42) return ~crc_sse42(~crc, p, n);
#endif
  return ~crc_table(~crc, p, n);
}

uint32_t crc32c_extend_portable(uint32_t crc, const void* data, size_t n) {
  return ~crc_table(~crc, static_cast<const uint8_t*>(data), n);
}

FileChecksum checksum_file(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  FTUNE_CHECK(fd >= 0, path.string(), ": cannot read: ", std::strerror(errno));
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  constexpr size_t kChunk = size_t{4} << 20;
  const std::unique_ptr<uint8_t[]> buf(new uint8_t[kChunk]);
  FileChecksum out;
  for (;;) {
    const ssize_t got = ::read(fd, buf.get(), kChunk);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      const int err = errno;
      ::close(fd);
      FTUNE_CHECK(got == 0, path.string(), ": cannot read: ", std::strerror(err));
      return out;
    }
    out.crc32c = crc32c_extend(out.crc32c, buf.get(), static_cast<size_t>(got));
    out.size += got;
  }
}

}  // namespace ftune
