// safetensors reader/writer and HF model-dir weight I/O; see safetensors.h for the API.
// The reader validates the whole header before handing out any tensor, with the same rules as the
// reference Rust implementation (offsets contiguous from 0 and covering the data section exactly),
// so a file we accept is one Python's safetensors accepts too. Tensors alias a shared mapping.
#include "io/safetensors.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <regex>
#include <set>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "io/mapped_file.h"

namespace ftune::io {
namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

struct SafetensorsReader::Mapping : MappedFile {
  using MappedFile::MappedFile;
};

namespace {

// The Rust reference refuses headers above 100 MB; so do we, before parsing anything.
constexpr int64_t kMaxHeaderBytes = 100'000'000;

struct DtypeName {
  const char* name;
  at::ScalarType type;
};
constexpr DtypeName kDtypes[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16},
    {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
    {"U8", at::kByte},    {"BOOL", at::kBool},
};

bool dtype_from_name(const std::string& s, at::ScalarType* out) {
  for (const auto& d : kDtypes) {
    if (s == d.name) {
      *out = d.type;
      return true;
    }
  }
  return false;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Parses the header JSON, rejecting duplicate keys at any depth (nlohmann would silently keep one).
ordered_json parse_header(const std::string& where, const char* begin, const char* end) {
  std::vector<std::set<std::string>> keys;  // one key set per open object
  std::string dup;
  auto cb = [&](int /*depth*/, ordered_json::parse_event_t ev, ordered_json& parsed) {
    switch (ev) {
      case ordered_json::parse_event_t::object_start: keys.emplace_back(); break;
      case ordered_json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case ordered_json::parse_event_t::key:
        if (!keys.empty() && !keys.back().insert(parsed.get<std::string>()).second && dup.empty()) {
          dup = parsed.get<std::string>();
        }
        break;
      default: break;
    }
    return true;
  };
  ordered_json j;
  try {
    j = ordered_json::parse(begin, end, cb);
  } catch (const ordered_json::exception& e) {
    fail(where, ": header: invalid JSON: ", e.what());
  }
  if (!dup.empty()) fail(where, ": ", dup, ": duplicate name in header");
  return j;
}

// Reads a non-negative JSON integer that fits int64_t.
bool get_size(const ordered_json& v, int64_t* out) {
  if (v.is_number_unsigned()) {
    uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
    *out = static_cast<int64_t>(u);
    return true;
  }
  if (v.is_number_integer()) {
    int64_t i = v.get<int64_t>();
    if (i < 0) return false;
    *out = i;
    return true;
  }
  return false;
}

bool checked_mul(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }

}  // namespace

const char* safetensors_dtype_name(at::ScalarType t) {
  for (const auto& d : kDtypes) {
    if (d.type == t) return d.name;
  }
  return nullptr;
}

SafetensorsReader::SafetensorsReader(const fs::path& path) : path_(path) {
  const std::string where = path.string();
  map_ = std::make_shared<Mapping>(path);
  const int64_t file_size = map_->size();
  FTUNE_CHECK(file_size >= 8, where, ": header: file has ", file_size,
              " bytes, need at least 8 for the header length");
  uint64_t n = 0;
  std::memcpy(&n, map_->data(), 8);
  FTUNE_CHECK(n <= static_cast<uint64_t>(file_size - 8), where, ": header: length ", n,
              " exceeds the file size (", file_size, " bytes)");
  FTUNE_CHECK(static_cast<int64_t>(n) <= kMaxHeaderBytes, where, ": header: length ", n,
              " exceeds the 100 MB limit");
  data_start_ = 8 + static_cast<int64_t>(n);
  const int64_t data_size = file_size - data_start_;

  const char* hb = reinterpret_cast<const char*>(map_->data() + 8);
  ordered_json header = parse_header(where, hb, hb + n);
  FTUNE_CHECK(header.is_object(), where, ": header: expected a JSON object, got ", header.type_name());

  struct Item {
    std::string name;
    int64_t begin, end;
  };
  std::vector<Item> order;
  for (const auto& [name, v] : header.items()) {
    if (name == "__metadata__") {
      FTUNE_CHECK(v.is_object(), where, ": __metadata__: expected an object of strings, got ",
                  v.type_name());
      for (const auto& [k, s] : v.items()) {
        FTUNE_CHECK(s.is_string(), where, ": __metadata__.", k, ": expected a string, got ",
                    s.type_name());
        metadata_[k] = s.get<std::string>();
      }
      continue;
    }
    FTUNE_CHECK(v.is_object(), where, ": ", name,
                ": expected an object with dtype, shape and data_offsets, got ", v.type_name());
    SafetensorsEntry e;
    auto dt = v.find("dtype");
    FTUNE_CHECK(dt != v.end() && dt->is_string(), where, ": ", name, ": dtype: missing or not a string");
    if (!dtype_from_name(dt->get<std::string>(), &e.dtype)) {
      fail(where, ": ", name, ": dtype: unsupported dtype '", dt->get<std::string>(),
           "' (supported: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL)");
    }
    auto sh = v.find("shape");
    FTUNE_CHECK(sh != v.end() && sh->is_array(), where, ": ", name,
                ": shape: missing or not an array");
    int64_t numel = 1;
    for (const auto& d : *sh) {
      int64_t dim = 0;
      FTUNE_CHECK(get_size(d, &dim), where, ": ", name, ": shape: expected non-negative integers, got ",
                  d.dump());
      e.shape.push_back(dim);
      FTUNE_CHECK(checked_mul(numel, dim, &numel), where, ": ", name, ": shape: ", shape_str(e.shape),
                  " overflows");
    }
    auto off = v.find("data_offsets");
    FTUNE_CHECK(off != v.end() && off->is_array() && off->size() == 2 && get_size((*off)[0], &e.begin) &&
                    get_size((*off)[1], &e.end),
                where, ": ", name, ": data_offsets: expected [begin, end] of non-negative integers");
    FTUNE_CHECK(e.begin <= e.end, where, ": ", name, ": data_offsets: begin ", e.begin, " > end ", e.end);
    FTUNE_CHECK(e.end <= data_size, where, ": ", name, ": data_offsets: end ", e.end,
                " is beyond the data section (", data_size, " bytes)");
    int64_t nbytes = 0;
    FTUNE_CHECK(checked_mul(numel, static_cast<int64_t>(at::elementSize(e.dtype)), &nbytes), where, ": ",
                name, ": shape: ", shape_str(e.shape), " overflows");
    FTUNE_CHECK(nbytes == e.end - e.begin, where, ": ", name, ": data_offsets: [", e.begin, ", ", e.end,
                ") holds ", e.end - e.begin, " bytes but shape ", shape_str(e.shape), " of ",
                dt->get<std::string>(), " needs ", nbytes);
    order.push_back({name, e.begin, e.end});
    entries_.emplace(name, std::move(e));
  }

  // Data must be laid out back to back from offset 0 and cover the data section exactly.
  std::stable_sort(order.begin(), order.end(), [](const Item& a, const Item& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  int64_t pos = 0;
  const Item* prev = nullptr;
  for (const Item& it : order) {
    if (it.begin < pos) {
      fail(where, ": ", it.name, ": data_offsets: [", it.begin, ", ", it.end, ") overlaps ", prev->name,
           " [", prev->begin, ", ", prev->end, ")");
    }
    FTUNE_CHECK(it.begin == pos, where, ": ", it.name, ": data_offsets: begin ", it.begin,
                " leaves a gap after byte ", pos, " of the data section");
    pos = it.end;
    prev = &it;
    names_.push_back(it.name);
  }
  FTUNE_CHECK(pos == data_size, where, ": data_offsets: tensors cover ", pos, " bytes but the data section has ",
              data_size);
}

SafetensorsReader::~SafetensorsReader() = default;

const SafetensorsEntry& SafetensorsReader::entry(const std::string& name) const {
  auto it = entries_.find(name);
  FTUNE_CHECK(it != entries_.end(), path_.string(), ": ", name, ": no such tensor");
  return it->second;
}

at::Tensor SafetensorsReader::tensor(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  uint8_t* p = map_->mutable_data() + data_start_ + e.begin;
  auto opts = at::TensorOptions().dtype(e.dtype).device(at::kCPU);
  // Files from other writers may misalign data (odd header length); copy those rather than hand
  // kernels a misaligned pointer.
  if (reinterpret_cast<uintptr_t>(p) % at::elementSize(e.dtype) != 0) {
    at::Tensor t = at::empty(e.shape, opts);
    if (e.end > e.begin) std::memcpy(t.data_ptr(), p, static_cast<size_t>(e.end - e.begin));
    return t;
  }
  std::shared_ptr<Mapping> keep = map_;
  return at::from_blob(p, e.shape, [keep](void*) {}, opts);
}

namespace {

std::vector<TensorSpec> specs_of(const TensorList& tensors) {
  std::vector<TensorSpec> specs;
  specs.reserve(tensors.size());
  for (const auto& [name, t] : tensors) {
    // An undefined tensor keeps kFloat/[] here and is reported by name when produced.
    specs.push_back({name, t.defined() ? t.scalar_type() : at::kFloat,
                     t.defined() ? t.sizes().vec() : std::vector<int64_t>{}});
  }
  return specs;
}

// Bytes of a spec's data, or -1 when numel * element size overflows int64.
int64_t spec_bytes(const TensorSpec& s) {
  int64_t n = static_cast<int64_t>(at::elementSize(s.dtype));
  for (int64_t d : s.shape) {
    if (d < 0 || !checked_mul(n, d, &n)) return -1;
  }
  return n;
}

}  // namespace

void SafetensorsReader::read_into(const std::string& name, const at::Tensor& dst) const {
  const SafetensorsEntry& e = entry(name);
  FTUNE_CHECK(dst.sizes() == at::IntArrayRef(e.shape), path_.string(), ": ", name, ": shape ",
              shape_str(e.shape), " does not match the destination's ", dst.sizes());
  at::Tensor src = tensor(name);
  if (src.dim() == 0 || src.numel() == 0) {
    dst.copy_(src);
    return;
  }
  // Rows of dim 0 per chunk: ~16 MB of file data, so the mapping's resident share stays small.
  constexpr int64_t kChunkBytes = int64_t{16} << 20;
  const int64_t rows = src.size(0);
  const int64_t row_bytes = (e.end - e.begin) / rows;
  const int64_t step = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, row_bytes));
  for (int64_t r = 0; r < rows; r += step) {
    const int64_t n = std::min(step, rows - r);
    dst.narrow(0, r, n).copy_(src.narrow(0, r, n));
    map_->drop_pages(data_start_ + e.begin + r * row_bytes, n * row_bytes);
  }
  map_->drop_pages(data_start_ + e.begin, e.end - e.begin);  // pages that straddled two chunks
}

void save_safetensors(const fs::path& path, const TensorList& tensors,
                      const std::map<std::string, std::string>& metadata) {
  save_safetensors_streamed(path, specs_of(tensors), [&](size_t i) { return tensors[i].second; },
                            metadata);
}

SafetensorsStreamWriter::SafetensorsStreamWriter(const fs::path& path, std::vector<TensorSpec> specs,
                                                 const std::map<std::string, std::string>& metadata)
    : where_(path.string()), specs_(std::move(specs)) {
  ordered_json header = ordered_json::object();
  if (!metadata.empty()) {
    ordered_json m = ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = std::move(m);
  }
  int64_t offset = 0;
  offsets_.reserve(specs_.size());
  for (size_t i = 0; i < specs_.size(); ++i) {
    const TensorSpec& spec = specs_[i];
    const std::string& name = spec.name;
    FTUNE_CHECK(name != "__metadata__", where_, ": ", name, ": reserved name");
    FTUNE_CHECK(index_.emplace(name, i).second, where_, ": ", name, ": duplicate tensor name");
    const char* dt = safetensors_dtype_name(spec.dtype);
    FTUNE_CHECK(dt != nullptr, where_, ": ", name, ": unsupported dtype ", spec.dtype);
    const int64_t nbytes = spec_bytes(spec);
    FTUNE_CHECK(nbytes >= 0 && !__builtin_add_overflow(offset, nbytes, &offset), where_, ": ", name,
                ": shape ", shape_str(spec.shape), " is negative or overflows");
    header[name] = {{"dtype", dt}, {"shape", spec.shape}, {"data_offsets", {offset - nbytes, offset}}};
    offsets_.push_back(offset - nbytes);
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // align the data section as the Python library does
  const int64_t data_start = 8 + static_cast<int64_t>(h.size());
  for (int64_t& o : offsets_) o += data_start;
  written_.assign(specs_.size(), false);
  file_ = std::make_unique<AtomicFile>(path);
  const uint64_t n = h.size();
  file_->stream().write(reinterpret_cast<const char*>(&n), 8);
  file_->stream().write(h.data(), static_cast<std::streamsize>(h.size()));
  pos_ = data_start;
}

SafetensorsStreamWriter::~SafetensorsStreamWriter() = default;

void SafetensorsStreamWriter::write(const std::string& name, const at::Tensor& tensor) {
  auto it = index_.find(name);
  FTUNE_CHECK(file_ != nullptr, where_, ": ", name, ": written after finish()");
  FTUNE_CHECK(it != index_.end(), where_, ": ", name, ": not in the header");
  const size_t i = it->second;
  const TensorSpec& spec = specs_[i];
  FTUNE_CHECK(!written_[i], where_, ": ", name, ": written twice");
  FTUNE_CHECK(tensor.defined(), where_, ": ", name, ": undefined tensor");
  FTUNE_CHECK(tensor.layout() == at::kStrided, where_, ": ", name,
              ": only dense (strided) tensors can be saved");
  FTUNE_CHECK(tensor.scalar_type() == spec.dtype && tensor.sizes().vec() == spec.shape, where_, ": ",
              name, ": produced ", tensor.scalar_type(), " ", shape_str(tensor.sizes().vec()),
              ", announced ", spec.dtype, " ", shape_str(spec.shape));
  const at::Tensor t = tensor.to(at::kCPU).contiguous();
  std::ostream& os = file_->stream();
  if (offsets_[i] != pos_) os.seekp(offsets_[i]);
  os.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
  FTUNE_CHECK(os, where_, ": ", name, ": write failed: ", std::strerror(errno));
  pos_ = offsets_[i] + static_cast<int64_t>(t.nbytes());
  written_[i] = true;
}

void SafetensorsStreamWriter::finish() {
  FTUNE_CHECK(file_ != nullptr, where_, ": finished twice");
  for (size_t i = 0; i < specs_.size(); ++i) {
    FTUNE_CHECK(written_[i], where_, ": ", specs_[i].name, ": announced but never written");
  }
  file_->commit();
  file_.reset();
}

void save_safetensors_streamed(const fs::path& path, const std::vector<TensorSpec>& specs,
                               const TensorProducer& produce,
                               const std::map<std::string, std::string>& metadata) {
  SafetensorsStreamWriter w(path, specs, metadata);
  for (size_t i = 0; i < specs.size(); ++i) w.write(specs[i].name, produce(i));
  w.finish();
}

namespace {

const char* const kSingleFile = "model.safetensors";
const char* const kIndexFile = "model.safetensors.index.json";

bool is_shard_name(const std::string& s) {
  static const std::regex re(R"(model-\d{5}-of-\d{5}\.safetensors)");
  return std::regex_match(s, re);
}

bool is_file(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec);
}

}  // namespace

SafetensorsDir::SafetensorsDir(const fs::path& dir) {
  auto add = [&](const fs::path& file) -> const SafetensorsReader& {
    readers_.push_back(std::make_unique<SafetensorsReader>(file));
    const SafetensorsReader& r = *readers_.back();
    for (const std::string& name : r.names()) {
      FTUNE_CHECK(where_.emplace(name, &r).second, r.path().string(), ": ", name,
                  ": tensor also present in ", where_.at(name)->path().string());
      names_.push_back(name);
    }
    return r;
  };
  const fs::path index_path = dir / kIndexFile;
  // The index wins when both layouts exist: save_weights deletes the index last when switching to
  // a single file and writes it last when switching to shards, so it always names a complete set.
  if (is_file(index_path)) {
    const std::string where = index_path.string();
    json index;
    try {
      index = json::parse(read_file(index_path));
    } catch (const json::exception& e) {
      fail(where, ": invalid JSON: ", e.what());
    }
    FTUNE_CHECK(index.is_object(), where, ": expected a JSON object");
    auto wm = index.find("weight_map");
    FTUNE_CHECK(wm != index.end() && wm->is_object(), where, ": weight_map: missing or not an object");
    std::map<std::string, std::vector<std::string>> by_file;
    for (const auto& [name, file] : wm->items()) {
      FTUNE_CHECK(file.is_string(), where, ": weight_map.", name, ": expected a file name string");
      std::string f = file.get<std::string>();
      FTUNE_CHECK(!f.empty() && f.find('/') == std::string::npos && f.find('\\') == std::string::npos &&
                      f != "." && f != "..",
                  where, ": weight_map.", name, ": '", f, "' is not a plain file name in the model dir");
      by_file[f].push_back(name);
    }
    FTUNE_CHECK(!by_file.empty(), where, ": weight_map: empty");
    for (const auto& [file, names] : by_file) {
      const SafetensorsReader& r = add(dir / file);
      for (const std::string& name : names) {
        FTUNE_CHECK(r.contains(name), r.path().string(), ": ", name, ": listed in ", kIndexFile,
                    " but missing from the shard");
      }
    }
    return;
  }
  const fs::path single = dir / kSingleFile;
  FTUNE_CHECK(is_file(single), dir.string(), ": no ", kSingleFile, " or ", kIndexFile);
  add(single);
}

const SafetensorsReader& SafetensorsDir::reader(const std::string& name) const {
  auto it = where_.find(name);
  FTUNE_CHECK(it != where_.end(), "model weights: ", name, ": no such tensor");
  return *it->second;
}

std::map<std::string, at::Tensor> load_weights(const fs::path& dir) {
  SafetensorsDir files(dir);
  std::map<std::string, at::Tensor> out;
  for (const std::string& name : files.names()) out.emplace(name, files.reader(name).tensor(name));
  return out;
}

bool is_weights_file_name(const std::string& filename) {
  return filename == kSingleFile || filename == kIndexFile || is_shard_name(filename);
}

void save_weights(const fs::path& dir, const TensorList& tensors, int64_t max_shard_bytes) {
  save_weights_streamed(dir, specs_of(tensors), [&](size_t i) { return tensors[i].second; },
                        max_shard_bytes);
}

WeightsStreamWriter::WeightsStreamWriter(const fs::path& dir, const std::vector<TensorSpec>& specs,
                                         int64_t max_shard_bytes)
    : dir_(dir) {
  FTUNE_CHECK(max_shard_bytes > 0, dir.string(), ": max_shard_bytes: must be positive, got ",
              max_shard_bytes);
  // Greedy split in order: a new shard starts when the next tensor would overflow this one.
  std::vector<size_t> shard_begin = {0};  // index of each shard's first spec
  int64_t cur = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    const int64_t nb = spec_bytes(specs[i]);
    FTUNE_CHECK(nb >= 0 && !__builtin_add_overflow(total_bytes_, nb, &total_bytes_), dir.string(),
                ": ", specs[i].name, ": shape ", shape_str(specs[i].shape), " is negative or overflows");
    if (i > shard_begin.back() && cur + nb > max_shard_bytes) {
      shard_begin.push_back(i);
      cur = 0;
    }
    cur += nb;
  }
  shard_begin.push_back(specs.size());
  const int n = static_cast<int>(shard_begin.size()) - 1;
  FTUNE_CHECK(n <= 99999, dir.string(), ": max_shard_bytes: ", max_shard_bytes,
              " gives more than 99999 shards");
  std::error_code ec;
  fs::create_directories(dir, ec);
  const std::map<std::string, std::string> meta = {{"format", "pt"}};
  for (int s = 0; s < n; ++s) {
    char name[64];
    std::snprintf(name, sizeof(name), "model-%05d-of-%05d.safetensors", s + 1, n);
    files_.push_back(n == 1 ? kSingleFile : name);
    const std::vector<TensorSpec> part(specs.begin() + static_cast<int64_t>(shard_begin[s]),
                                       specs.begin() + static_cast<int64_t>(shard_begin[s + 1]));
    for (const TensorSpec& spec : part) shard_of_[spec.name] = static_cast<size_t>(s);
    shards_.push_back(std::make_unique<SafetensorsStreamWriter>(dir / files_.back(), part, meta));
  }
}

WeightsStreamWriter::~WeightsStreamWriter() = default;

void WeightsStreamWriter::write(const std::string& name, const at::Tensor& t) {
  auto it = shard_of_.find(name);
  FTUNE_CHECK(it != shard_of_.end(), dir_.string(), ": ", name, ": not among the announced weights");
  shards_[it->second]->write(name, t);
}

void WeightsStreamWriter::finish() {
  for (auto& shard : shards_) shard->finish();
  std::set<std::string> keep(files_.begin(), files_.end());
  if (files_.size() > 1) {
    json weight_map = json::object();
    for (const auto& [name, s] : shard_of_) weight_map[name] = files_[s];
    json index = {{"metadata", {{"total_size", total_bytes_}}}, {"weight_map", weight_map}};
    write_file_atomic(dir_ / kIndexFile, index.dump(2) + "\n");
    keep.insert(kIndexFile);
  }
  // Remove the other layout: the index goes first so a crash never leaves it naming deleted shards.
  std::error_code ec;
  if (!keep.count(kIndexFile)) fs::remove(dir_ / kIndexFile, ec);
  std::vector<fs::path> stale;
  for (fs::directory_iterator it(dir_, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string f = it->path().filename().string();
    if (!keep.count(f) && (f == kSingleFile || is_shard_name(f))) stale.push_back(it->path());
  }
  for (const fs::path& p : stale) fs::remove(p, ec);
}

void save_weights_streamed(const fs::path& dir, const std::vector<TensorSpec>& specs,
                           const TensorProducer& produce, int64_t max_shard_bytes) {
  WeightsStreamWriter w(dir, specs, max_shard_bytes);
  for (size_t i = 0; i < specs.size(); ++i) w.write(specs[i].name, produce(i));
  w.finish();
}

}  // namespace ftune::io
