// safetensors reader (mmap, zero-copy) and writer, plus HF model-dir weight I/O (single file or
// sharded with model.safetensors.index.json). Format: ../shared/REFERENCE.md §1.
// Trade-off: tensors returned by the reader alias the read-only mapping (no copy, instant load of
// multi-GB checkpoints); callers that mutate must clone. The mapping lives as long as any tensor.
// read_into copies a tensor into a destination chunk by chunk and drops each chunk's mapped pages,
// so loading a model never holds more of the file in memory than one chunk.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace ftune {
class AtomicFile;
}

namespace ftune::io {

// Ordered list of named tensors, as written to disk.
using TensorList = std::vector<std::pair<std::string, at::Tensor>>;

struct SafetensorsEntry {
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  int64_t begin = 0;  // byte offsets relative to the end of the header
  int64_t end = 0;
};

class SafetensorsReader {
 public:
  // Maps the file and validates the whole header (length, JSON, dtypes, shapes, offsets in range,
  // not overlapping, no duplicates). Throws ftune::Error "<path>: <field>: <problem>".
  explicit SafetensorsReader(const std::filesystem::path& path);
  ~SafetensorsReader();
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  const std::vector<std::string>& names() const { return names_; }  // file (offset) order
  bool contains(const std::string& name) const { return entries_.count(name) > 0; }
  const SafetensorsEntry& entry(const std::string& name) const;
  // CPU tensor viewing the mapping; keeps the mapping alive. Throws for an unknown name.
  at::Tensor tensor(const std::string& name) const;
  // Copies tensor `name` into `dst` (same shape, any float dtype and device; conversion per chunk)
  // in chunks of about 16 MB of file data, dropping each chunk's mapped pages once copied. Use it
  // for tensors no live tensor() alias was written through (see MappedFile::drop_pages).
  void read_into(const std::string& name, const at::Tensor& dst) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  struct Mapping;
  std::filesystem::path path_;
  std::shared_ptr<Mapping> map_;
  std::map<std::string, SafetensorsEntry> entries_;
  std::vector<std::string> names_;
  std::map<std::string, std::string> metadata_;
  int64_t data_start_ = 0;
};

// The safetensors name of a dtype ("F32", "BF16", "I32", ...), or nullptr if it has none.
const char* safetensors_dtype_name(at::ScalarType t);

// The weight files of an HF model dir, opened: model.safetensors, or the shards listed in
// model.safetensors.index.json. Every header is validated and every name found exactly once (a
// tensor in two shards, or listed in the index but missing from its shard, is an error); no tensor
// data is read until tensor() or read_into().
class SafetensorsDir {
 public:
  explicit SafetensorsDir(const std::filesystem::path& dir);
  const std::vector<std::string>& names() const { return names_; }  // shard by shard, file order
  bool contains(const std::string& name) const { return where_.count(name) > 0; }
  const SafetensorsReader& reader(const std::string& name) const;  // the file holding `name`

 private:
  std::vector<std::unique_ptr<SafetensorsReader>> readers_;
  std::map<std::string, const SafetensorsReader*> where_;
  std::vector<std::string> names_;
};

// Writes tensors (any device/layout; made contiguous CPU) atomically: temp file, then rename.
void save_safetensors(const std::filesystem::path& path, const TensorList& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// A tensor announced to a streaming writer before its data exists.
struct TensorSpec {
  std::string name;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> shape;
};

// A safetensors file written tensor by tensor, for data that is never all in memory at once (a
// sharded model gathered one unit at a time): the header comes from `specs`, known up front, so
// each tensor's place in the file is fixed before its data exists. write() puts a tensor's bytes
// there, in any order (in spec order the file is written front to back); finish() checks that
// every tensor was written and renames the temp file over `path`. Destroyed unfinished (an error
// on the way), it removes the temp file and leaves `path` untouched. The bytes are those
// save_safetensors writes for the same tensors in spec order.
class SafetensorsStreamWriter {
 public:
  // Throws "<path>: <name>: ..." for a duplicate or reserved name, an unsupported dtype or a
  // negative or overflowing shape.
  SafetensorsStreamWriter(const std::filesystem::path& path, std::vector<TensorSpec> specs,
                          const std::map<std::string, std::string>& metadata = {});
  ~SafetensorsStreamWriter();
  SafetensorsStreamWriter(const SafetensorsStreamWriter&) = delete;
  SafetensorsStreamWriter& operator=(const SafetensorsStreamWriter&) = delete;

  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  // `t` (any device, any strides) must have its spec's dtype and shape; each name once. Only
  // `t` is copied (to a contiguous CPU tensor, when it is not one), and dropped on return.
  void write(const std::string& name, const at::Tensor& t);
  void finish();

 private:
  std::string where_;
  std::vector<TensorSpec> specs_;
  std::map<std::string, size_t> index_;
  std::vector<int64_t> offsets_;  // of each tensor's first byte, from the start of the file
  std::vector<bool> written_;
  int64_t pos_ = 0;  // where the stream is
  std::unique_ptr<AtomicFile> file_;
};

// The weight files of an HF model dir (save_weights' layout: one model.safetensors, or shards of
// at most max_shard_bytes plus the index) written tensor by tensor, as SafetensorsStreamWriter:
// every file's temp is open until finish(), which renames the shards into place, writes the
// index and removes stale weight files of the other layout.
class WeightsStreamWriter {
 public:
  WeightsStreamWriter(const std::filesystem::path& dir, const std::vector<TensorSpec>& specs,
                      int64_t max_shard_bytes = int64_t{5} << 30);
  ~WeightsStreamWriter();
  bool contains(const std::string& name) const { return shard_of_.count(name) > 0; }
  void write(const std::string& name, const at::Tensor& t);
  void finish();

 private:
  std::filesystem::path dir_;
  std::vector<std::unique_ptr<SafetensorsStreamWriter>> shards_;
  std::vector<std::string> files_;
  std::map<std::string, size_t> shard_of_;
  int64_t total_bytes_ = 0;
};

// Returns tensor `index` of the spec list (dtype and shape as announced; any device or layout).
// The streaming wrappers below call it once per tensor, in order, and drop the result before the
// next call, so only one produced tensor is alive at a time.
using TensorProducer = std::function<at::Tensor(size_t index)>;

// save_safetensors without holding every tensor: SafetensorsStreamWriter fed in spec order.
void save_safetensors_streamed(const std::filesystem::path& path, const std::vector<TensorSpec>& specs,
                               const TensorProducer& produce,
                               const std::map<std::string, std::string>& metadata = {});

// Loads every tensor of an HF model dir: model.safetensors, or the shards listed in
// model.safetensors.index.json. Tensors alias the mappings (see SafetensorsReader::tensor).
std::map<std::string, at::Tensor> load_weights(const std::filesystem::path& dir);

// Writes weights into an HF model dir: one model.safetensors when the total fits in
// max_shard_bytes, else model-0000i-of-0000n.safetensors plus model.safetensors.index.json.
// Removes stale weight files of the other layout. metadata {"format": "pt"} is always added.
void save_weights(const std::filesystem::path& dir, const TensorList& tensors,
                  int64_t max_shard_bytes = int64_t{5} << 30);
// True for the file names save_weights writes or removes in a model dir: model.safetensors,
// model.safetensors.index.json and model-NNNNN-of-NNNNN.safetensors.
bool is_weights_file_name(const std::string& filename);
// save_weights streamed tensor by tensor (WeightsStreamWriter fed in spec order): same files, same
// sharding, peak memory one produced tensor.
void save_weights_streamed(const std::filesystem::path& dir, const std::vector<TensorSpec>& specs,
                           const TensorProducer& produce, int64_t max_shard_bytes = int64_t{5} << 30);

}  // namespace ftune::io
