// Read-only view of a whole file (mmap) or of an owned byte buffer, shared by the safetensors and
// GGUF readers. Tensors handed out by those readers alias this memory and hold a shared_ptr to it.
// Trade-off: the mapping is MAP_PRIVATE and writable (copy-on-write), so a caller that forgets to
// clone and writes in place changes only its private pages instead of crashing on a read-only
// page; if the kernel refuses a writable private mapping we fall back to read-only.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace ftune::io {

class MappedFile {
 public:
  // Maps `path`; throws ftune::Error "<path>: cannot open: <reason>" when it cannot.
  explicit MappedFile(const std::filesystem::path& path);
  // Owns `bytes` (used to parse in-memory buffers, e.g. by the fuzzers).
  explicit MappedFile(std::vector<uint8_t> bytes);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  uint8_t* mutable_data() const { return data_; }  // for at::from_blob; see the trade-off above
  int64_t size() const { return size_; }
  // Drops the whole pages inside [offset, offset + length) from this process (madvise
  // MADV_DONTNEED): a later read faults them back in from the file. Only for ranges that no live
  // tensor was written through (a private copy-on-write page would revert to the file's bytes).
  // No-op for an owned buffer.
  void drop_pages(int64_t offset, int64_t length) const;

 private:
  uint8_t* data_ = nullptr;
  int64_t size_ = 0;
  bool mapped_ = false;
  std::vector<uint8_t> owned_;
};

}  // namespace ftune::io
