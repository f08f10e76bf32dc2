// YAML -> option struct reading with file/line/key errors; see yaml_reader.h.
#include "config/yaml_reader.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>
#include <string_view>

#include "core/error.h"
#include "core/fs.h"

namespace ftune::config {
namespace {

std::string describe(const YAML::Node& n) {
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a mapping";
  if (n.IsNull()) return "null";
  return "\"" + n.Scalar() + "\"";
}

std::string mark_of(const std::string& file, const YAML::Node& n) {
  const YAML::Mark m = n.Mark();
  if (m.is_null() || m.line < 0) return file;
  return file + ":" + std::to_string(m.line + 1);
}

// Offset of the first byte of `s` that starts no well-formed UTF-8 sequence (RFC 3629: no
// overlong forms, surrogates or code points above U+10FFFF) or a noncharacter (U+FDD0-U+FDEF,
// U+xFFFE, U+xFFFF), else npos. yaml-cpp reads such bytes as they are but writes U+FFFD for them,
// so a path read from a config would come back changed in the resolved config.yaml that resume
// compares against.
size_t bad_utf8_offset(std::string_view s) {
  static constexpr char32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};  // per sequence length
  size_t i = 0;
  while (i < s.size()) {
    const auto b = static_cast<unsigned char>(s[i]);
    const size_t len = b < 0x80 ? 1 : (b & 0xE0) == 0xC0 ? 2 : (b & 0xF0) == 0xE0 ? 3
                     : (b & 0xF8) == 0xF0 ? 4 : 0;
    if (len == 0 || i + len > s.size()) return i;
    char32_t cp = len == 1 ? b : b & (0x7F >> len);
    for (size_t k = 1; k < len; ++k) {
      const auto c = static_cast<unsigned char>(s[i + k]);
      if ((c & 0xC0) != 0x80) return i;
      cp = cp << 6 | (c & 0x3F);
    }
    if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF) ||
        (cp >= 0xFDD0 && cp <= 0xFDEF) || (cp & 0xFFFE) == 0xFFFE) {
      return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

}  // namespace

// Rejects a key given twice in one mapping (yaml-cpp keeps both and lookups see the first, while
// PyYAML keeps the last: either way one of them would be silently ignored).
void check_unique_keys(const YAML::Node& map, const std::string& origin, const std::string& prefix) {
  std::map<std::string, int> first_line;
  for (auto it = map.begin(); it != map.end(); ++it) {
    if (!it->first.IsScalar()) continue;
    const std::string key = it->first.Scalar();
    const int line = it->first.Mark().line + 1;
    auto [seen, fresh] = first_line.emplace(key, line);
    const bool section = prefix.empty() && it->second.IsMap();
    FTUNE_CHECK(fresh, origin, ":", line, ": ", prefix, key, ": duplicate ",
                section ? "section" : "key", " (first at line ", seen->second, ")");
    if (it->second.IsMap()) check_unique_keys(it->second, origin, prefix + key + ".");
  }
}

YAML::Node parse_yaml_text(const std::string& text, const std::string& origin) {
  if (const size_t bad = bad_utf8_offset(text); bad != std::string_view::npos) {
    const auto line = 1 + std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(bad),
                                     '\n');
    fail(origin, ":", line, ": invalid UTF-8 or a Unicode noncharacter (byte ", bad,
         "); config files are UTF-8 text");
  }
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    fail(origin, ":", e.mark.line + 1, ":", e.mark.column + 1, ": malformed YAML: ", e.msg);
  }
  if (root.IsNull()) return YAML::Node(YAML::NodeType::Map);  // an empty file: all defaults
  FTUNE_CHECK(root.IsMap(), origin, ": expected a mapping of sections (model, data, ...), got ",
              describe(root));
  check_unique_keys(root, origin, "");
  return root;
}

YAML::Node load_yaml_file(const std::filesystem::path& path) {
  return parse_yaml_text(read_file(path), path.string());
}

void apply_override(YAML::Node& root, const std::string& assignment, Origins& origins) {
  const std::string origin = "--set " + assignment;
  const auto eq = assignment.find('=');
  FTUNE_CHECK(eq != std::string::npos, origin, ": expected section.key=value");
  const std::string path = assignment.substr(0, eq), value = assignment.substr(eq + 1);
  const auto dot = path.find('.');
  FTUNE_CHECK(dot != std::string::npos && dot > 0 && dot + 1 < path.size() &&
                  path.find('.', dot + 1) == std::string::npos,
              origin, ": expected section.key=value (one dot in the key, e.g. training.lr=1e-4)");
  const std::string section = path.substr(0, dot), key = path.substr(dot + 1);
  FTUNE_CHECK(bad_utf8_offset(value) == std::string_view::npos, origin, ": ", path,
              ": invalid UTF-8 or a Unicode noncharacter in the value");
  YAML::Node parsed;
  try {
    parsed = YAML::Load(value);
  } catch (const YAML::Exception& e) {
    fail(origin, ": ", path, ": malformed value: ", e.msg);
  }
  if (parsed.IsNull()) parsed = YAML::Node(value);  // "key=" sets an empty string
  bool list_of_scalars = parsed.IsSequence();
  for (const auto& item : parsed) list_of_scalars = list_of_scalars && item.IsScalar();
  FTUNE_CHECK(parsed.IsScalar() || list_of_scalars, origin, ": ", path,
              ": expected a single value or a list of values, got ", describe(parsed));
  YAML::Node sec = root[section];
  FTUNE_CHECK(!sec.IsDefined() || sec.IsNull() || sec.IsMap(), origin, ": ", section,
              ": the config file's section is not a mapping");
  if (!sec.IsMap()) {
    root[section] = YAML::Node(YAML::NodeType::Map);
    sec = root[section];
  }
  sec[key] = parsed;
  origins[path] = origin;
}

std::string format_double(double v) {
  if (std::isnan(v)) return ".nan";
  if (std::isinf(v)) return v > 0 ? ".inf" : "-.inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), v);
  std::string s(buf, res.ptr);
  // Keep it a float on re-read ("3" would read back fine too, but "3.0" says what it is).
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

SectionReader::SectionReader(const YAML::Node& node, std::string section, std::string file,
                             Origins& origins)
    : node_(node), section_(std::move(section)), file_(std::move(file)), origins_(origins) {
  if (node_.IsDefined() && !node_.IsNull()) {
    FTUNE_CHECK(node_.IsMap(), mark_of(file_, node_), ": ", section_,
                ": expected a mapping of keys, got ", describe(node_));
  }
}

std::string SectionReader::where(const std::string& key, const YAML::Node& n) const {
  auto it = origins_.find(section_ + "." + key);
  if (it != origins_.end() && it->second.rfind("--set", 0) == 0) return it->second;
  return mark_of(file_, n);
}

void SectionReader::type_error(const char* key, const YAML::Node& n, const char* expected) const {
  fail(where(key, n), ": ", section_, ".", key, ": expected ", expected, ", got ", describe(n));
}

std::optional<YAML::Node> SectionReader::scalar(const char* key) {
  known_.insert(key);
  if (!node_.IsDefined() || !node_.IsMap()) return std::nullopt;
  const YAML::Node& section = node_;  // const lookup: never inserts the key
  YAML::Node n = section[key];
  if (!n.IsDefined() || n.IsNull()) return std::nullopt;
  const std::string path = section_ + "." + key;
  if (!origins_.count(path)) origins_[path] = mark_of(file_, n);
  if (!n.IsScalar()) type_error(key, n, "a single value");
  return n;
}

void SectionReader::operator()(const char* key, int64_t& out) {
  auto found = scalar(key);
  if (!found) return;
  const YAML::Node& n = *found;
  const std::string& s = n.Scalar();
  int64_t v = 0;
  auto res = std::from_chars(s.data(), s.data() + s.size(), v);
  if (res.ec != std::errc() || res.ptr != s.data() + s.size()) type_error(key, n, "an integer");
  out = v;
}

void SectionReader::operator()(const char* key, double& out) {
  auto found = scalar(key);
  if (!found) return;
  const YAML::Node& n = *found;
  try {
    out = n.as<double>();
  } catch (const YAML::Exception&) {
    type_error(key, n, "a number");
  }
}

void SectionReader::operator()(const char* key, bool& out) {
  auto found = scalar(key);
  if (!found) return;
  const YAML::Node& n = *found;
  try {
    out = n.as<bool>();
  } catch (const YAML::Exception&) {
    type_error(key, n, "true or false");
  }
}

void SectionReader::operator()(const char* key, std::string& out) {
  if (auto n = scalar(key)) out = n->Scalar();
}

void SectionReader::operator()(const char* key, std::vector<std::string>& out) {
  known_.insert(key);
  if (!node_.IsDefined() || !node_.IsMap()) return;
  const YAML::Node& section = node_;
  YAML::Node n = section[key];
  if (!n.IsDefined() || n.IsNull()) return;
  const std::string path = section_ + "." + key;
  if (!origins_.count(path)) origins_[path] = mark_of(file_, n);
  if (n.IsScalar()) {
    out = {n.Scalar()};
    return;
  }
  if (!n.IsSequence()) type_error(key, n, "a list of names");
  out.clear();
  for (const auto& item : n) {
    if (!item.IsScalar()) type_error(key, item, "a list of names");
    out.push_back(item.Scalar());
  }
}

void SectionReader::operator()(const char* key, std::vector<int64_t>& out) {
  std::vector<std::string> items;
  (*this)(key, items);
  if (items.empty()) return;
  const YAML::Node n = node_[key];
  out.clear();
  for (const std::string& s : items) {
    int64_t v = 0;
    auto res = std::from_chars(s.data(), s.data() + s.size(), v);
    if (res.ec != std::errc() || res.ptr != s.data() + s.size()) {
      type_error(key, n, "a list of integers");
    }
    out.push_back(v);
  }
}

void SectionReader::finish() const {
  if (!node_.IsDefined() || !node_.IsMap()) return;
  for (auto it = node_.begin(); it != node_.end(); ++it) {
    const std::string key = it->first.IsScalar() ? it->first.Scalar() : describe(it->first);
    if (known_.count(key)) continue;
    std::string known;
    for (const auto& k : known_) known += (known.empty() ? "" : ", ") + k;
    fail(where(key, it->first), ": ", section_, ".", key, ": unknown key (", section_,
         " takes: ", known, ")");
  }
}

void SectionEmitter::operator()(const char* key, const std::string& v) {
  if (skip_.count(key)) return;
  YAML::Emitter e;
  e << v;  // quotes the string when YAML would read it as something else
  os_ << "  " << key << ": " << (v.empty() ? "\"\"" : e.c_str()) << "\n";
}

void SectionEmitter::operator()(const char* key, const std::vector<std::string>& v) {
  if (skip_.count(key)) return;
  YAML::Emitter e;
  e << YAML::Flow << v;
  os_ << "  " << key << ": " << e.c_str() << "\n";
}

void SectionEmitter::operator()(const char* key, const std::vector<int64_t>& v) {
  if (skip_.count(key)) return;
  YAML::Emitter e;
  e << YAML::Flow << v;
  os_ << "  " << key << ": " << e.c_str() << "\n";
}

}  // namespace ftune::config
