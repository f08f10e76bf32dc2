// GGUF (llama.cpp) reader: metadata, tensor infos and dequantization to float32. Format:
// ../shared/REFERENCE.md §4. Versions 2 and 3, little-endian. The file is mmap'ed; raw() aliases it.
// Trade-off: the whole header is parsed and validated up front (every count and length bounded by
// the bytes left, so hostile files cannot trigger huge allocations), and metadata is kept as
// nlohmann::json for easy lookup; dequantize() reproduces gguf-py's numpy arithmetic bit for bit
// (one float32 rounding per operation, no fused multiply-add).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace ftune::io {

class MappedFile;

// ggml tensor types, numbered as in ggml.h / gguf-py GGMLQuantizationType.
enum class GgmlType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
  IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22,
  IQ4_XS = 23, I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, IQ1_M = 29, BF16 = 30,
  TQ1_0 = 34, TQ2_0 = 35,
};

// GGUF metadata value types (gguf_type).
enum class GgufValueType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7, STRING = 8, ARRAY = 9,
  U64 = 10, I64 = 11, F64 = 12,
};

struct GgmlTypeTraits {
  const char* name;      // "Q4_1"
  int64_t block_size;    // elements per block
  int64_t type_size;     // bytes per block
  bool can_dequantize;   // ggml_dequantize() supports it
};
// Traits of a known ggml type, or nullptr for an unknown type number.
const GgmlTypeTraits* ggml_type_traits(uint32_t type);

// Dequantizes `n` elements (a multiple of the block size) of `type` from `src` into `dst`.
// Throws ftune::Error for types without dequantization support.
void ggml_dequantize(uint32_t type, const uint8_t* src, int64_t n, float* dst);

// `s` (a key, tensor name or string value from a GGUF file) made safe for a one-line error: control
// characters escaped, invalid UTF-8 replaced, cut to 100 bytes.
std::string gguf_printable(std::string_view s);

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // ggml order: ne[0] varies fastest (row length)
  uint32_t type = 0;        // a GgmlType value
  int64_t offset = 0;       // bytes from the start of the data section
  int64_t n_bytes = 0;
  int64_t numel() const;
  std::vector<int64_t> shape() const;  // PyTorch order: ne reversed
};

class GgufFile {
 public:
  // Maps and parses `path`. Throws ftune::Error "<path>: <field>: <problem>" for bad input.
  explicit GgufFile(const std::filesystem::path& path);
  // Parses an in-memory copy; `origin` names it in errors.
  static GgufFile from_bytes(std::vector<uint8_t> bytes, const std::string& origin = "<memory>");

  GgufFile(GgufFile&&) noexcept;
  GgufFile& operator=(GgufFile&&) noexcept;
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;
  ~GgufFile();

  uint32_t version() const { return version_; }
  int64_t alignment() const { return alignment_; }
  int64_t data_offset() const { return data_offset_; }  // absolute file offset of the data section
  const std::string& origin() const { return origin_; }

  // Key -> value. Integers keep their signedness, f32/f64 become doubles, bool a JSON bool, string a
  // JSON string (raw bytes, not re-validated as UTF-8), array a JSON array (nested arrays allowed).
  const nlohmann::json& metadata() const { return metadata_; }
  // The stored GGUF type of a key (the element type for arrays is in metadata_array_type()).
  GgufValueType metadata_type(const std::string& key) const;
  GgufValueType metadata_array_type(const std::string& key) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }  // file order
  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  const GgufTensorInfo& tensor_info(const std::string& name) const;

  // The tensor's bytes as uint8 [n_bytes], aliasing the mapping (keeps it alive).
  at::Tensor raw(const std::string& name) const;
  // A new float32 tensor with shape() = reversed ne. Throws for types it cannot dequantize.
  at::Tensor dequantize(const std::string& name) const;

 private:
  GgufFile(std::shared_ptr<MappedFile> map, std::string origin);
  void parse();
  void check_tensor_data() const;

  std::shared_ptr<MappedFile> map_;
  std::string origin_;
  uint32_t version_ = 0;
  int64_t alignment_ = 32;
  int64_t data_offset_ = 0;
  nlohmann::json metadata_;
  std::map<std::string, std::pair<GgufValueType, GgufValueType>> types_;  // key -> (type, array elem)
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> index_;
};

}  // namespace ftune::io
