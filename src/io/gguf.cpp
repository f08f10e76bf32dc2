// GGUF parser; see gguf.h. Every read goes through a bounds-checked cursor and every count or
// length is checked against the bytes left before anything is allocated, so truncated or hostile
// files end in one ftune::Error line ("<file>: <field>: <problem>"), never a crash or a huge
// allocation. Nested metadata arrays are limited to kMaxArrayDepth levels to bound recursion.
#include "io/gguf.h"

#include <algorithm>
#include <bit>
#include <cstdio>
#include <cstring>
#include <limits>

#include "core/error.h"
#include "io/mapped_file.h"

namespace ftune::io {
namespace {

static_assert(std::endian::native == std::endian::little, "GGUF reader assumes a little-endian host");

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr int kMaxDims = 4;              // GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 16;
constexpr size_t kMaxNameBytes = 64;     // GGML_MAX_NAME, including the terminating NUL
constexpr int64_t kDefaultAlignment = 32;

// Smallest encoding of one value of a metadata type, used to bound counts by the bytes left.
int64_t min_value_size(uint32_t t) {
  switch (static_cast<GgufValueType>(t)) {
    case GgufValueType::U8: case GgufValueType::I8: case GgufValueType::BOOL: return 1;
    case GgufValueType::U16: case GgufValueType::I16: return 2;
    case GgufValueType::U32: case GgufValueType::I32: case GgufValueType::F32: return 4;
    case GgufValueType::U64: case GgufValueType::I64: case GgufValueType::F64: return 8;
    case GgufValueType::STRING: return 8;
    case GgufValueType::ARRAY: return 12;
  }
  return 0;  // unknown type
}

const char* value_type_name(uint32_t t) {
  static const char* const names[] = {"u8", "i8",  "u16",    "i16",   "u32", "i32", "f32",
                                      "bool", "string", "array", "u64", "i64", "f64"};
  return t < 13 ? names[t] : "unknown";
}

class Cursor {
 public:
  Cursor(const uint8_t* data, int64_t size, const std::string& origin)
      : data_(data), size_(size), origin_(origin) {}

  int64_t pos() const { return pos_; }
  int64_t left() const { return size_ - pos_; }
  // Field named in errors ("header", "metadata 'llama.block_count'", "tensor 'x'").
  void set_field(std::string f) { field_ = std::move(f); }
  const std::string& field() const { return field_; }

  void need(int64_t n, const char* what) const {
    if (n > left()) {
      fail(origin_, ": ", field_, ": truncated: ", what, " needs ", n, " bytes at offset ", pos_,
           " but the file has ", size_, " bytes");
    }
  }
  template <typename T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string read_string(const char* what) {
    const uint64_t n = read<uint64_t>(what);
    if (n > static_cast<uint64_t>(left())) {
      fail(origin_, ": ", field_, ": ", what, " length ", n, " at offset ", pos_ - 8,
           " exceeds the remaining ", left(), " bytes of the file");
    }
    std::string s(reinterpret_cast<const char*>(data_ + pos_), n);
    pos_ += static_cast<int64_t>(n);
    return s;
  }
  // Reads a u64 count of items that take at least `min_size` bytes each; checks they can fit.
  int64_t read_count(const char* what, int64_t min_size) {
    const uint64_t n = read<uint64_t>(what);
    if (min_size > 0 && n > static_cast<uint64_t>(left() / min_size)) {
      fail(origin_, ": ", field_, ": ", what, " ", n, " is impossible: ", n, " items of at least ",
           min_size, " bytes exceed the remaining ", left(), " bytes of the file");
    }
    return static_cast<int64_t>(n);
  }
  [[noreturn]] void error(const std::string& msg) const { fail(origin_, ": ", field_, ": ", msg); }

 private:
  const uint8_t* data_;
  int64_t size_;
  int64_t pos_ = 0;
  const std::string& origin_;
  std::string field_ = "header";
};

nlohmann::json read_value(Cursor& c, uint32_t type, int depth, uint32_t* elem_type) {
  using nlohmann::json;
  switch (static_cast<GgufValueType>(type)) {
    case GgufValueType::U8: return json(static_cast<uint64_t>(c.read<uint8_t>("u8 value")));
    case GgufValueType::I8: return json(static_cast<int64_t>(c.read<int8_t>("i8 value")));
    case GgufValueType::U16: return json(static_cast<uint64_t>(c.read<uint16_t>("u16 value")));
    case GgufValueType::I16: return json(static_cast<int64_t>(c.read<int16_t>("i16 value")));
    case GgufValueType::U32: return json(static_cast<uint64_t>(c.read<uint32_t>("u32 value")));
    case GgufValueType::I32: return json(static_cast<int64_t>(c.read<int32_t>("i32 value")));
    case GgufValueType::F32: return json(static_cast<double>(c.read<float>("f32 value")));
    case GgufValueType::BOOL: return json(c.read<uint8_t>("bool value") != 0);
    case GgufValueType::STRING: return json(c.read_string("string"));
    case GgufValueType::U64: return json(c.read<uint64_t>("u64 value"));
    case GgufValueType::I64: return json(c.read<int64_t>("i64 value"));
    case GgufValueType::F64: return json(c.read<double>("f64 value"));
    case GgufValueType::ARRAY: {
      if (depth >= kMaxArrayDepth) c.error("arrays nested deeper than " + std::to_string(kMaxArrayDepth));
      const uint32_t et = c.read<uint32_t>("array element type");
      if (min_value_size(et) == 0) c.error("unknown array element type " + std::to_string(et));
      if (elem_type) *elem_type = et;
      const int64_t n = c.read_count("array length", min_value_size(et));
      json arr = json::array();
      auto& vec = arr.get_ref<json::array_t&>();
      vec.reserve(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) vec.push_back(read_value(c, et, depth + 1, nullptr));
      return arr;
    }
  }
  c.error("unknown value type " + std::to_string(type));
}

bool checked_mul(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }

}  // namespace

std::string gguf_printable(std::string_view s) {
  constexpr size_t kMax = 100;
  const std::string q = nlohmann::json(std::string(s.substr(0, kMax)))
                            .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return q.substr(1, q.size() - 2) + (s.size() > kMax ? "..." : "");
}

int64_t GgufTensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;  // validated not to overflow when parsed
  return n;
}

std::vector<int64_t> GgufTensorInfo::shape() const { return std::vector<int64_t>(ne.rbegin(), ne.rend()); }

GgufFile::GgufFile(const std::filesystem::path& path)
    : GgufFile(std::make_shared<MappedFile>(path), path.string()) {}

GgufFile GgufFile::from_bytes(std::vector<uint8_t> bytes, const std::string& origin) {
  return GgufFile(std::make_shared<MappedFile>(std::move(bytes)), origin);
}

GgufFile::GgufFile(std::shared_ptr<MappedFile> map, std::string origin)
    : map_(std::move(map)), origin_(std::move(origin)) {
  parse();
}

GgufFile::GgufFile(GgufFile&&) noexcept = default;
GgufFile& GgufFile::operator=(GgufFile&&) noexcept = default;
GgufFile::~GgufFile() = default;

void GgufFile::parse() {
  Cursor c(map_->data(), map_->size(), origin_);
  const uint32_t magic = c.read<uint32_t>("magic");
  if (magic != kMagic) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "bad magic 0x%08x (expected \"GGUF\")", magic);
    c.error(buf);
  }
  version_ = c.read<uint32_t>("version");
  if (version_ != 2 && version_ != 3) {
    std::string msg = "unsupported version " + std::to_string(version_) + " (supported: 2, 3)";
    if (version_ > 0xffff && (version_ & 0xffff) == 0) msg += "; big-endian files are not supported";
    c.error(msg);
  }
  // A tensor info takes at least 8 (name length) + 4 (n_dims) + 8 (ne[0]) + 4 (type) + 8 (offset).
  const int64_t n_tensors = c.read_count("tensor count", 32);
  // A key/value takes at least 8 (key length) + 4 (type) + 1 (smallest value).
  const int64_t n_kv = c.read_count("metadata count", 13);

  metadata_ = nlohmann::json::object();
  for (int64_t i = 0; i < n_kv; ++i) {
    c.set_field("metadata #" + std::to_string(i));
    std::string key = c.read_string("key");
    c.set_field("metadata '" + gguf_printable(key) + "'");
    if (metadata_.contains(key)) c.error("duplicate key");
    const uint32_t type = c.read<uint32_t>("value type");
    if (min_value_size(type) == 0) c.error("unknown value type " + std::to_string(type));
    uint32_t elem = type;
    nlohmann::json v = read_value(c, type, 0, &elem);
    if (key == "general.alignment") {
      if (type != static_cast<uint32_t>(GgufValueType::U32)) {
        c.error(std::string("expected a u32, got ") + value_type_name(type));
      }
      const uint64_t a = v.get<uint64_t>();
      if (a == 0 || (a & (a - 1)) != 0) c.error("alignment " + std::to_string(a) + " is not a power of two");
      alignment_ = static_cast<int64_t>(a);
    }
    types_[key] = {static_cast<GgufValueType>(type), static_cast<GgufValueType>(elem)};
    metadata_[key] = std::move(v);
  }

  tensors_.reserve(static_cast<size_t>(n_tensors));
  for (int64_t i = 0; i < n_tensors; ++i) {
    c.set_field("tensor #" + std::to_string(i));
    GgufTensorInfo t;
    t.name = c.read_string("name");
    if (t.name.size() >= kMaxNameBytes) {
      c.error("name of " + std::to_string(t.name.size()) + " bytes is too long (llama.cpp's limit is " +
              std::to_string(kMaxNameBytes - 1) + ")");
    }
    c.set_field("tensor '" + gguf_printable(t.name) + "'");
    if (index_.count(t.name)) c.error("duplicate tensor name");
    const uint32_t n_dims = c.read<uint32_t>("n_dims");
    if (n_dims < 1 || n_dims > kMaxDims) {
      c.error("n_dims " + std::to_string(n_dims) + " is out of range 1.." + std::to_string(kMaxDims));
    }
    // The product is also bounded with zero dims counted as 1: ATen computes strides that way,
    // and a shape like [0, 2^40, 2^40] must fail here rather than inside at::empty.
    int64_t numel = 1, span = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t ne = c.read<uint64_t>("ne");
      if (ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          !checked_mul(span, std::max<int64_t>(static_cast<int64_t>(ne), 1), &span)) {
        c.error("dimension ne[" + std::to_string(d) + "] = " + std::to_string(ne) + " overflows");
      }
      numel *= static_cast<int64_t>(ne);
      t.ne.push_back(static_cast<int64_t>(ne));
    }
    t.type = c.read<uint32_t>("type");
    const GgmlTypeTraits* tr = ggml_type_traits(t.type);
    if (tr == nullptr) c.error("unknown ggml type " + std::to_string(t.type));
    if (t.ne[0] % tr->block_size != 0) {
      c.error("row length ne[0] = " + std::to_string(t.ne[0]) + " is not a multiple of the " + tr->name +
              " block size " + std::to_string(tr->block_size));
    }
    if (!checked_mul(numel / tr->block_size, tr->type_size, &t.n_bytes)) c.error("byte size overflows");
    const uint64_t off = c.read<uint64_t>("offset");
    if (off > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      c.error("offset " + std::to_string(off) + " is out of range");
    }
    t.offset = static_cast<int64_t>(off);
    index_.emplace(t.name, tensors_.size());
    tensors_.push_back(std::move(t));
  }

  // The data section starts at the next multiple of the alignment after the tensor infos.
  data_offset_ = (c.pos() + alignment_ - 1) / alignment_ * alignment_;
  check_tensor_data();
}

// Every tensor's bytes must lie inside the file, start at a multiple of general.alignment (as
// llama.cpp and gguf-py write them; a shifted offset reads the neighbour's bytes as weights), and
// not share a byte with another tensor's.
void GgufFile::check_tensor_data() const {
  const int64_t file_size = map_->size();
  const int64_t avail = file_size - data_offset_;  // may be negative when the file is cut short
  for (const GgufTensorInfo& t : tensors_) {
    if (t.offset > avail || t.n_bytes > avail - t.offset) {
      fail(origin_, ": tensor '", gguf_printable(t.name), "': data [", t.offset, ", +", t.n_bytes,
           ") lies outside the file (data section starts at ", data_offset_, ", file has ", file_size,
           " bytes)");
    }
    if (t.offset % alignment_ != 0) {
      fail(origin_, ": tensor '", gguf_printable(t.name), "': offset ", t.offset,
           " is not a multiple of general.alignment ",
           alignment_);
    }
  }
  std::vector<const GgufTensorInfo*> by_offset;
  for (const GgufTensorInfo& t : tensors_) {
    if (t.n_bytes > 0) by_offset.push_back(&t);  // an empty tensor occupies no byte
  }
  std::stable_sort(by_offset.begin(), by_offset.end(),
                   [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const GgufTensorInfo& prev = *by_offset[i - 1];
    const GgufTensorInfo& t = *by_offset[i];
    if (t.offset < prev.offset + prev.n_bytes) {
      fail(origin_, ": tensor '", gguf_printable(t.name), "': offset ", t.offset, " overlaps tensor '",
           gguf_printable(prev.name),
           "' (data [", prev.offset, ", ", prev.offset + prev.n_bytes, "))");
    }
  }
}

GgufValueType GgufFile::metadata_type(const std::string& key) const {
  auto it = types_.find(key);
  FTUNE_CHECK(it != types_.end(), origin_, ": metadata '", gguf_printable(key), "': no such key");
  return it->second.first;
}

GgufValueType GgufFile::metadata_array_type(const std::string& key) const {
  auto it = types_.find(key);
  FTUNE_CHECK(it != types_.end(), origin_, ": metadata '", gguf_printable(key), "': no such key");
  FTUNE_CHECK(it->second.first == GgufValueType::ARRAY, origin_, ": metadata '", gguf_printable(key),
              "': not an array");
  return it->second.second;
}

const GgufTensorInfo& GgufFile::tensor_info(const std::string& name) const {
  auto it = index_.find(name);
  FTUNE_CHECK(it != index_.end(), origin_, ": tensor '", gguf_printable(name), "': no such tensor");
  return tensors_[it->second];
}

at::Tensor GgufFile::raw(const std::string& name) const {
  const GgufTensorInfo& t = tensor_info(name);
  std::shared_ptr<MappedFile> keep = map_;
  return at::from_blob(map_->mutable_data() + data_offset_ + t.offset, {t.n_bytes}, [keep](void*) {},
                       at::TensorOptions().dtype(at::kByte));
}

at::Tensor GgufFile::dequantize(const std::string& name) const {
  const GgufTensorInfo& t = tensor_info(name);
  const GgmlTypeTraits* tr = ggml_type_traits(t.type);
  FTUNE_CHECK(tr->can_dequantize, origin_, ": tensor '", gguf_printable(name), "': dequantizing ggml type ",
              tr->name, " (",
              t.type, ") is not supported");
  at::Tensor out = at::empty(t.shape(), at::TensorOptions().dtype(at::kFloat));
  ggml_dequantize(t.type, map_->data() + data_offset_ + t.offset, t.numel(), out.data_ptr<float>());
  return out;
}

}  // namespace ftune::io
