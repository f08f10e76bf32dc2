// Reading YAML config files into option structs, with errors that name the file, line and key.
// A config struct lists its fields once in `template <class V> void fields(V& v)`; the same list
// drives parsing (SectionReader: type checks, unknown-key detection), `--set section.key=value`
// overrides and writing the resolved config back out (emit_section), so they cannot drift apart.
// Defines: load_yaml_file, apply_override, SectionReader, emit_section, format_double.
#pragma once

#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace ftune::config {

// Where each `section.key` came from: "<file>:<line>" or "--set section.key=value".
using Origins = std::map<std::string, std::string>;

// Parses `path` as a YAML mapping of sections. Errors: "<file>: cannot read: ...",
// "<file>:<line>:<col>: malformed YAML: ...", "<file>: expected a mapping of sections",
// "<file>:<line>: section.key: duplicate key (first at line N)".
YAML::Node load_yaml_file(const std::filesystem::path& path);
// The same from text; `origin` names it in errors.
YAML::Node parse_yaml_text(const std::string& text, const std::string& origin);

// Applies one "section.key=value" override to `root` (the value is parsed as a YAML scalar, so
// `true`, `3`, `1e-4` keep their types, or as a flow list of scalars, `[q_proj, v_proj]`) and
// records its origin. Errors name the override.
void apply_override(YAML::Node& root, const std::string& assignment, Origins& origins);

// Shortest decimal text that round-trips the double ("0.0001", "3", "1e-08").
std::string format_double(double v);

// Reads the fields of one section. Visit each field with operator(); then finish() reports the
// first key that no field claimed. Type errors name the key and the expected type.
class SectionReader {
 public:
  SectionReader(const YAML::Node& node, std::string section, std::string file, Origins& origins);

  void operator()(const char* key, int64_t& out);
  void operator()(const char* key, double& out);
  void operator()(const char* key, bool& out);
  void operator()(const char* key, std::string& out);
  // A list of strings: a YAML list, or one value as a list of one.
  void operator()(const char* key, std::vector<std::string>& out);
  // A list of integers ([0, 12, 22]).
  void operator()(const char* key, std::vector<int64_t>& out);
  void finish() const;

 private:
  // The node for `key` (nullopt when absent or explicitly null: the default stays), recording its
  // origin; fails when the value is a list or mapping.
  std::optional<YAML::Node> scalar(const char* key);
  [[noreturn]] void type_error(const char* key, const YAML::Node& n, const char* expected) const;
  std::string where(const std::string& key, const YAML::Node& n) const;

  YAML::Node node_;
  std::string section_, file_;
  Origins& origins_;
  std::set<std::string> known_;
};

// Writes "key: value" lines (two-space indent) for every field of a struct but `skip`.
class SectionEmitter {
 public:
  SectionEmitter(std::ostringstream& os, std::set<std::string> skip)
      : os_(os), skip_(std::move(skip)) {}
  void operator()(const char* key, const int64_t& v) {
    if (!skip_.count(key)) os_ << "  " << key << ": " << v << "\n";
  }
  void operator()(const char* key, const double& v) {
    if (!skip_.count(key)) os_ << "  " << key << ": " << format_double(v) << "\n";
  }
  void operator()(const char* key, const bool& v) {
    if (!skip_.count(key)) os_ << "  " << key << ": " << (v ? "true" : "false") << "\n";
  }
  void operator()(const char* key, const std::string& v);
  void operator()(const char* key, const std::vector<std::string>& v);  // flow list [a, b]
  void operator()(const char* key, const std::vector<int64_t>& v);      // flow list [0, 12]

 private:
  std::ostringstream& os_;
  std::set<std::string> skip_;
};

// Collects "section.key" -> value text (as emit_section writes it) for every field of a struct.
class SectionFlattener {
 public:
  SectionFlattener(std::map<std::string, std::string>& out, std::string section)
      : out_(out), prefix_(std::move(section) + ".") {}
  void operator()(const char* key, const int64_t& v) { out_[prefix_ + key] = std::to_string(v); }
  void operator()(const char* key, const double& v) { out_[prefix_ + key] = format_double(v); }
  void operator()(const char* key, const bool& v) { out_[prefix_ + key] = v ? "true" : "false"; }
  void operator()(const char* key, const std::string& v) { out_[prefix_ + key] = "\"" + v + "\""; }
  void operator()(const char* key, const std::vector<std::string>& v) {
    std::string s = "[";
    for (const auto& x : v) s += (s.size() > 1 ? ", " : "") + x;
    out_[prefix_ + key] = s + "]";
  }
  void operator()(const char* key, const std::vector<int64_t>& v) {
    std::string s = "[";
    for (int64_t x : v) s += (s.size() > 1 ? ", " : "") + std::to_string(x);
    out_[prefix_ + key] = s + "]";
  }

 private:
  std::map<std::string, std::string>& out_;
  std::string prefix_;
};

// Reads `section` of `root` into `opts` (a struct with fields(V&)), rejecting unknown keys.
template <class Options>
void read_section(const YAML::Node& root, const char* section, const std::string& file,
                  Origins& origins, Options& opts) {
  SectionReader r(root[section], section, file, origins);
  opts.fields(r);
  r.finish();
}

// Appends "section:\n  key: value\n..." for `opts` to `os`, leaving out the keys in `skip`.
template <class Options>
void emit_section(std::ostringstream& os, const char* section, Options opts,
                  std::set<std::string> skip = {}) {
  os << section << ":\n";
  SectionEmitter e(os, std::move(skip));
  opts.fields(e);
}

// Adds "section.key" -> value text for every field of `opts` to `out`.
template <class Options>
void flatten_section(std::map<std::string, std::string>& out, const char* section, Options opts) {
  SectionFlattener f(out, section);
  opts.fields(f);
}

}  // namespace ftune::config
