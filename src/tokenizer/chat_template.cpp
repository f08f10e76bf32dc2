// A Jinja2-subset interpreter for HF chat templates: lexer -> parser -> AST -> tree-walking
// evaluator, following jinja2 3.1 as transformers configures it (ImmutableSandboxedEnvironment
// with trim_blocks, lstrip_blocks, loopcontrols, a json.dumps tojson with ensure_ascii=False, and
// the globals raise_exception and strftime_now). Trade-off: our own small dynamic Value type
// rather than nlohmann::json, so that Python's int/float/bool/tuple distinctions, undefined,
// namespace and loop objects and callables all survive; strings stay UTF-8 and are indexed,
// sliced and counted by code point like Python's str. Defines render_chat_template().
#include "tokenizer/chat_template.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <locale>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace ftune::tok {
namespace {

[[noreturn]] void fail_line(int line, const std::string& what) {
  fail("chat template: line ", line, ": ", what);
}

// Bounds that keep every template fast and small whatever its source (chat_template_fuzz found
// templates that ran for hours or exhausted memory: nested range() loops, a string doubled by
// {% set %} in a loop, a long string printed in a loop). transformers' sandbox bounds only range();
// these sit far above anything a chat template needs.
constexpr size_t kMaxStringBytes = size_t{1} << 26;  // 64 MiB: any string value, the output too
constexpr int64_t kMaxSteps = 1'000'000;              // statements run plus loop iterations

[[noreturn]] void fail_too_large() {
  fail("chat template: string result too large (over 64 MiB)");
}

// out += piece, failing instead when the result would exceed kMaxStringBytes.
void append_bounded(std::string& out, std::string_view piece) {
  if (out.size() + piece.size() > kMaxStringBytes) fail_too_large();
  out += piece;
}

// ---------------------------------------------------------------------------------- UTF-8
// The template and every context string are checked to be valid UTF-8 on entry (render()), so
// the shared decoder of unicode.h applies. Escapes such as '\udc80' can still produce a lone
// surrogate; utf8_append writes it as three bytes and utf8_next reads it back unchanged.
std::u32string to_u32(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) out += utf8_next(s, i);
  return out;
}

std::string from_u32(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) utf8_append(out, c);
  return out;
}

// Python's str.isspace() / the `\s` of a str regex.
bool is_py_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

// Byte length of `s` without its trailing whitespace (Python's rstrip()).
size_t rstrip_len(std::string_view s) {
  size_t keep = 0;
  for (size_t i = 0; i < s.size();) {
    const char32_t c = utf8_next(s, i);
    if (!is_py_space(c)) keep = i;
  }
  return keep;
}

// Byte offset after the whitespace run starting at `i` (the `\s*` of a regex).
size_t skip_space(std::string_view s, size_t i) {
  while (i < s.size()) {
    size_t j = i;
    if (!is_py_space(utf8_next(s, j))) break;
    i = j;
  }
  return i;
}

// Case mapping through the C.UTF-8 locale's tables (full Unicode simple mappings in glibc),
// falling back to ASCII when the locale is missing. Python's special casings (ß -> SS) are not
// applied.
const std::ctype<wchar_t>* unicode_ctype() {
  static const std::ctype<wchar_t>* facet = []() -> const std::ctype<wchar_t>* {
    try {
      static const std::locale loc("C.UTF-8");
      return &std::use_facet<std::ctype<wchar_t>>(loc);
    } catch (const std::exception&) {
      return nullptr;
    }
  }();
  return facet;
}

char32_t to_upper_cp(char32_t c) {
  if (c < 0x80) return (c >= 'a' && c <= 'z') ? c - 32 : c;
  const auto* f = unicode_ctype();
  return f ? static_cast<char32_t>(f->toupper(static_cast<wchar_t>(c))) : c;
}
char32_t to_lower_cp(char32_t c) {
  if (c < 0x80) return (c >= 'A' && c <= 'Z') ? c + 32 : c;
  const auto* f = unicode_ctype();
  return f ? static_cast<char32_t>(f->tolower(static_cast<wchar_t>(c))) : c;
}
bool is_cased_cp(char32_t c) { return to_upper_cp(c) != c || to_lower_cp(c) != c; }
bool is_upper_cp(char32_t c) { return to_lower_cp(c) != c; }
bool is_lower_cp(char32_t c) { return to_upper_cp(c) != c; }
bool is_alpha_cp(char32_t c) {
  if (c < 0x80) return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
  const auto* f = unicode_ctype();
  return f ? f->is(std::ctype_base::alpha, static_cast<wchar_t>(c)) : false;
}
bool is_digit_cp(char32_t c) { return c >= '0' && c <= '9'; }

std::string upper_str(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const char32_t c = utf8_next(s, i);
    if (c == 0xDF) {
      out += "SS";
    } else {
      utf8_append(out, to_upper_cp(c));
    }
  }
  return out;
}
std::string lower_str(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size();) utf8_append(out, to_lower_cp(utf8_next(s, i)));
  return out;
}
// Python's str.capitalize(): first character upper, the rest lower.
std::string capitalize_str(std::string_view s) {
  std::u32string u = to_u32(s);
  for (size_t k = 0; k < u.size(); ++k) u[k] = k == 0 ? to_upper_cp(u[k]) : to_lower_cp(u[k]);
  return from_u32(u);
}
// Python's str.title(): a cased character after an uncased one starts a word.
std::string py_title_str(std::string_view s) {
  std::u32string u = to_u32(s);
  bool prev_cased = false;
  for (char32_t& c : u) {
    const bool cased = is_cased_cp(c);
    c = prev_cased ? to_lower_cp(c) : to_upper_cp(c);
    prev_cased = cased;
  }
  return from_u32(u);
}

// ---------------------------------------------------------------------------------- values
struct Value;
struct Object;
struct CallArgs;
using ValueList = std::vector<Value>;
using ValueDict = std::vector<std::pair<Value, Value>>;  // insertion-ordered like a Python dict
using NativeFn = std::function<Value(CallArgs&)>;

struct Value {
  enum class Type { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kObject, kFunction };
  Type type = Type::kUndefined;
  bool tuple = false;      // a list that is a Python tuple (prints with parentheses)
  bool generator = false;  // an iterator (select, map, reverse...): always true, has no len()
  bool markup = false;     // a str that is markupsafe.Markup (from |safe or |e): `+` escapes the other side
  int64_t i = 0;       // int, and bool as 0/1 (Python's bool is an int)
  double f = 0;
  std::string s;  // str; for undefined, the error raised when it is used; for functions, the name
  std::shared_ptr<ValueList> list;
  std::shared_ptr<ValueDict> dict;
  std::shared_ptr<Object> obj;
  std::shared_ptr<NativeFn> fn;

  static Value undefined(std::string hint) {
    Value v;
    v.s = std::move(hint);
    return v;
  }
  static Value none() {
    Value v;
    v.type = Type::kNone;
    return v;
  }
  static Value boolean(bool b) {
    Value v;
    v.type = Type::kBool;
    v.i = b ? 1 : 0;
    return v;
  }
  static Value integer(int64_t x) {
    Value v;
    v.type = Type::kInt;
    v.i = x;
    return v;
  }
  static Value real(double x) {
    Value v;
    v.type = Type::kFloat;
    v.f = x;
    return v;
  }
  static Value str(std::string x) {
    if (x.size() > kMaxStringBytes) fail_too_large();
    Value v;
    v.type = Type::kString;
    v.s = std::move(x);
    return v;
  }
  static Value markup_str(std::string x) {
    Value v = str(std::move(x));
    v.markup = true;
    return v;
  }
  static Value make_list(ValueList items, bool is_tuple = false) {
    Value v;
    v.type = Type::kList;
    v.tuple = is_tuple;
    v.list = std::make_shared<ValueList>(std::move(items));
    return v;
  }
  static Value make_dict(ValueDict items) {
    Value v;
    v.type = Type::kDict;
    v.dict = std::make_shared<ValueDict>(std::move(items));
    return v;
  }
  static Value function(std::string name, NativeFn f) {
    Value v;
    v.type = Type::kFunction;
    v.s = std::move(name);
    v.fn = std::make_shared<NativeFn>(std::move(f));
    return v;
  }

  bool is_undefined() const { return type == Type::kUndefined; }
  bool is_none() const { return type == Type::kNone; }
  bool is_string() const { return type == Type::kString; }
  bool is_list() const { return type == Type::kList; }
  bool is_dict() const { return type == Type::kDict; }
  bool is_bool() const { return type == Type::kBool; }
  bool is_int_like() const { return type == Type::kInt || type == Type::kBool; }
  bool is_number() const { return is_int_like() || type == Type::kFloat; }
  double as_double() const { return type == Type::kFloat ? f : static_cast<double>(i); }
};

// A jinja2 Namespace (attributes assignable with {% set ns.x = ... %}) or a loop object.
struct Object {
  std::string type_name;
  bool assignable = false;
  std::vector<std::pair<std::string, Value>> attrs;
  const Value* find(const std::string& name) const {
    for (const auto& kv : attrs) {
      if (kv.first == name) return &kv.second;
    }
    return nullptr;
  }
  void set(const std::string& name, Value v) {
    for (auto& kv : attrs) {
      if (kv.first == name) {
        kv.second = std::move(v);
        return;
      }
    }
    attrs.emplace_back(name, std::move(v));
  }
};

struct CallArgs {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  int line = 0;

  // Positional argument `idx` or keyword `name`, if given.
  const Value* get(size_t idx, const char* name) const {
    if (idx < pos.size()) return &pos[idx];
    for (const auto& kv : kw) {
      if (kv.first == name) return &kv.second;
    }
    return nullptr;
  }
  Value get_or(size_t idx, const char* name, Value def) const {
    const Value* v = get(idx, name);
    return v ? *v : std::move(def);
  }
};

std::string py_type_name(const Value& v) {
  switch (v.type) {
    case Value::Type::kUndefined: return "Undefined";
    case Value::Type::kNone: return "NoneType";
    case Value::Type::kBool: return "bool";
    case Value::Type::kInt: return "int";
    case Value::Type::kFloat: return "float";
    case Value::Type::kString: return "str";
    case Value::Type::kList: return v.generator ? "generator" : v.tuple ? "tuple" : "list";
    case Value::Type::kDict: return "dict";
    case Value::Type::kObject: return v.obj->type_name;
    case Value::Type::kFunction: return "function";
  }
  return "object";
}

bool truthy(const Value& v) {
  switch (v.type) {
    case Value::Type::kUndefined:
    case Value::Type::kNone: return false;
    case Value::Type::kBool:
    case Value::Type::kInt: return v.i != 0;
    case Value::Type::kFloat: return v.f != 0.0;
    case Value::Type::kString: return !v.s.empty();
    case Value::Type::kList: return v.generator || !v.list->empty();
    case Value::Type::kDict: return !v.dict->empty();
    default: return true;
  }
}

// ---------------------------------------------------------------------------------- printing
// Python's repr(float): shortest round-trip digits, exponent form outside 1e-4 <= |x| < 1e16.
std::string py_float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string s(buf, r.ptr);
  std::string out;
  if (s[0] == '-') {
    out += '-';
    s.erase(0, 1);
  }
  const size_t e = s.find('e');
  std::string digits;
  for (size_t k = 0; k < e; ++k) {
    if (s[k] != '.') digits += s[k];
  }
  const int exp = std::stoi(s.substr(e + 1));
  const int decpt = exp + 1;
  const int nd = static_cast<int>(digits.size());
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0) {
      out += "0." + std::string(-decpt, '0') + digits;
    } else if (decpt >= nd) {
      out += digits + std::string(decpt - nd, '0') + ".0";
    } else {
      out += digits.substr(0, decpt) + "." + digits.substr(decpt);
    }
  } else {
    out += digits.substr(0, 1);
    if (nd > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof eb, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += eb;
  }
  return out;
}

bool py_printable(char32_t c) {
  if (c < 0x20 || c == 0x7F) return false;
  if (c < 0x7F) return true;
  if (c <= 0xA0 || c == 0xAD || c == 0x61C || c == 0x1680 || c == 0x180E) return false;
  if ((c >= 0x2000 && c <= 0x200F) || (c >= 0x2028 && c <= 0x202F) ||
      (c >= 0x205F && c <= 0x206F) || c == 0x3000 || c == 0xFEFF)
    return false;
  if ((c >= 0xD800 && c <= 0xF8FF) || (c >= 0xFFF9 && c <= 0xFFFB) || (c >= 0xFFFE && c <= 0xFFFF))
    return false;
  if (c >= 0xF0000) return false;
  return true;
}

// Python's repr(str).
std::string py_str_repr(std::string_view s) {
  const bool has_single = s.find('\'') != std::string_view::npos;
  const bool has_double = s.find('"') != std::string_view::npos;
  const char q = (has_single && !has_double) ? '"' : '\'';
  std::string out(1, q);
  for (size_t i = 0; i < s.size();) {
    const char32_t c = utf8_next(s, i);
    char buf[16];
    if (c == static_cast<char32_t>(q) || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c >= 0xDC80 && c <= 0xDCFF) {
      std::snprintf(buf, sizeof buf, "\\udc%02x", static_cast<unsigned>(c & 0xFF));
      out += buf;
    } else if (!py_printable(c)) {
      if (c < 0x100) {
        std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned>(c));
      } else if (c < 0x10000) {
        std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
      } else {
        std::snprintf(buf, sizeof buf, "\\U%08x", static_cast<unsigned>(c));
      }
      out += buf;
    } else {
      utf8_append(out, c);
    }
  }
  out += q;
  return out;
}

std::string py_repr(const Value& v);

// Python's str(v), which is what {{ v }} prints.
std::string py_str(const Value& v) {
  switch (v.type) {
    case Value::Type::kUndefined: return "";
    case Value::Type::kNone: return "None";
    case Value::Type::kBool: return v.i ? "True" : "False";
    case Value::Type::kInt: return std::to_string(v.i);
    case Value::Type::kFloat: return py_float_repr(v.f);
    case Value::Type::kString: return v.s;
    default: return py_repr(v);
  }
}

std::string py_repr(const Value& v) {
  switch (v.type) {
    case Value::Type::kUndefined: return "Undefined";
    case Value::Type::kString: return v.markup ? "Markup(" + py_str_repr(v.s) + ")" : py_str_repr(v.s);
    case Value::Type::kList: {
      if (v.generator) return "<generator object>";
      std::string out = v.tuple ? "(" : "[";
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += ", ";
        out += py_repr((*v.list)[k]);
      }
      if (v.tuple && v.list->size() == 1) out += ",";
      return out + (v.tuple ? ")" : "]");
    }
    case Value::Type::kDict: {
      std::string out = "{";
      bool first = true;
      for (const auto& [k, x] : *v.dict) {
        if (!first) out += ", ";
        first = false;
        out += py_repr(k) + ": " + py_repr(x);
      }
      return out + "}";
    }
    case Value::Type::kObject: {
      if (v.obj->type_name == "Namespace") {
        std::string out = "<Namespace {";
        bool first = true;
        for (const auto& [k, x] : v.obj->attrs) {
          if (!first) out += ", ";
          first = false;
          out += py_str_repr(k) + ": " + py_repr(x);
        }
        return out + "}>";
      }
      const Value* index = v.obj->find("index");
      const Value* length = v.obj->find("length");
      return "<LoopContext " + (index ? py_str(*index) : "?") + "/" +
             (length ? py_str(*length) : "?") + ">";
    }
    case Value::Type::kFunction: return "<function " + v.s + ">";
    default: return py_str(v);
  }
}

// ---------------------------------------------------------------------------------- json.dumps
struct JsonOptions {
  bool ensure_ascii = false;
  std::optional<std::string> indent;
  std::string item_sep = ", ";
  std::string key_sep = ": ";
  bool sort_keys = false;
};

void json_string(std::string_view s, bool ensure_ascii, std::string& out) {
  out += '"';
  for (size_t i = 0; i < s.size();) {
    const char32_t c = utf8_next(s, i);
    char buf[16];
    switch (c) {
      case '"': out += "\\\""; continue;
      case '\\': out += "\\\\"; continue;
      case '\n': out += "\\n"; continue;
      case '\r': out += "\\r"; continue;
      case '\t': out += "\\t"; continue;
      case '\b': out += "\\b"; continue;
      case '\f': out += "\\f"; continue;
      default: break;
    }
    if (c < 0x20 || (ensure_ascii && c >= 0x7F)) {
      if (c >= 0x10000) {
        const char32_t v = c - 0x10000;
        std::snprintf(buf, sizeof buf, "\\u%04x\\u%04x", static_cast<unsigned>(0xD800 + (v >> 10)),
                      static_cast<unsigned>(0xDC00 + (v & 0x3FF)));
      } else {
        std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
      }
      out += buf;
    } else {
      utf8_append(out, c);
    }
  }
  out += '"';
}

std::string json_float(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  return py_float_repr(d);
}

bool py_less(const Value& a, const Value& b, int line);

void json_dump(const Value& v, const JsonOptions& o, int level, std::string& out, int line) {
  auto newline = [&](int lvl) {
    out += '\n';
    for (int k = 0; k < lvl; ++k) out += *o.indent;
  };
  switch (v.type) {
    case Value::Type::kNone: out += "null"; return;
    case Value::Type::kBool: out += v.i ? "true" : "false"; return;
    case Value::Type::kInt: out += std::to_string(v.i); return;
    case Value::Type::kFloat: out += json_float(v.f); return;
    case Value::Type::kString: json_string(v.s, o.ensure_ascii, out); return;
    case Value::Type::kList: {
      if (v.generator) fail_line(line, "Object of type generator is not JSON serializable");
      if (v.list->empty()) {
        out += "[]";
        return;
      }
      out += '[';
      if (o.indent) newline(level + 1);
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) {
          out += o.item_sep;
          if (o.indent) newline(level + 1);
        }
        json_dump((*v.list)[k], o, level + 1, out, line);
      }
      if (o.indent) newline(level);
      out += ']';
      return;
    }
    case Value::Type::kDict: {
      if (v.dict->empty()) {
        out += "{}";
        return;
      }
      std::vector<std::pair<std::string, const Value*>> items;
      for (const auto& [k, x] : *v.dict) {
        std::string key;
        switch (k.type) {
          case Value::Type::kString: key = k.s; break;
          case Value::Type::kInt: key = std::to_string(k.i); break;
          case Value::Type::kBool: key = k.i ? "true" : "false"; break;
          case Value::Type::kFloat: key = json_float(k.f); break;
          case Value::Type::kNone: key = "null"; break;
          default:
            fail_line(line, "keys must be str, int, float, bool or None, not " + py_type_name(k));
        }
        items.emplace_back(key, &x);
      }
      if (o.sort_keys) {
        std::stable_sort(items.begin(), items.end(),
                         [](const auto& a, const auto& b) { return a.first < b.first; });
      }
      out += '{';
      if (o.indent) newline(level + 1);
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) {
          out += o.item_sep;
          if (o.indent) newline(level + 1);
        }
        json_string(items[k].first, o.ensure_ascii, out);
        out += o.key_sep;
        json_dump(*items[k].second, o, level + 1, out, line);
      }
      if (o.indent) newline(level);
      out += '}';
      return;
    }
    default:
      fail_line(line, "Object of type " + py_type_name(v) + " is not JSON serializable");
  }
}

// ---------------------------------------------------------------------------------- lexer
enum class Tok { kData, kVarBegin, kVarEnd, kBlockBegin, kBlockEnd, kName, kString, kInt, kFloat, kOp, kEof };

struct Token {
  Tok type;
  std::string text;  // data, name, operator or decoded string literal
  int line = 1;
  int64_t ival = 0;
  double fval = 0;
};

// Tokenizes like jinja2's lexer with trim_blocks=True, lstrip_blocks=True: `{%`/`{#` tags that
// start a line drop the line's leading spaces, a block or comment tag eats one newline after it,
// `-` strips all whitespace on its side, `+` turns the automatic stripping off.
class Lexer {
 public:
  explicit Lexer(const std::string& source) {
    // Newlines are normalized to "\n" and one trailing newline is dropped (keep_trailing_newline
    // is off).
    src_.reserve(source.size());
    for (size_t k = 0; k < source.size(); ++k) {
      if (source[k] == '\r') {
        src_ += '\n';
        if (k + 1 < source.size() && source[k + 1] == '\n') ++k;
      } else {
        src_ += source[k];
      }
    }
    if (!src_.empty() && src_.back() == '\n') src_.pop_back();
  }

  std::vector<Token> run() {
    const size_t n = src_.size();
    while (pos_ < n) {
      size_t p = pos_;
      size_t found = std::string::npos;
      while ((p = src_.find('{', p)) != std::string::npos) {
        if (p + 1 < n && (src_[p + 1] == '{' || src_[p + 1] == '%' || src_[p + 1] == '#')) {
          found = p;
          break;
        }
        ++p;
      }
      if (found == std::string::npos) {
        emit_data(src_.substr(pos_));
        pos_ = n;
        break;
      }
      std::string text = src_.substr(pos_, found - pos_);
      const char kind = src_[found + 1];
      size_t q = found + 2;
      char sign = 0;
      if (q < n && (src_[q] == '-' || src_[q] == '+')) sign = src_[q++];
      const size_t raw_end = kind == '%' ? match_raw_begin(q) : std::string::npos;

      if (sign == '-') {
        text.resize(rstrip_len(text));
      } else if (sign != '+' && kind != '{') {
        lstrip(text);
      }
      const int text_line = line_;
      line_ += count_newlines(src_, pos_, found);
      if (!text.empty()) out_.push_back({Tok::kData, std::move(text), text_line});

      if (raw_end != std::string::npos) {
        line_ += count_newlines(src_, found, raw_end);
        line_starting_ = src_[raw_end - 1] == '\n';
        pos_ = raw_end;
        lex_raw();
      } else if (kind == '#') {
        lex_comment(q);
      } else {
        line_starting_ = false;
        pos_ = q;
        lex_tag(kind);
      }
    }
    out_.push_back({Tok::kEof, "", line_});
    return std::move(out_);
  }

 private:
  static int count_newlines(const std::string& s, size_t a, size_t b) {
    return static_cast<int>(std::count(s.begin() + a, s.begin() + b, '\n'));
  }

  bool starts(size_t at, std::string_view what) const {
    return src_.compare(at, what.size(), what) == 0;
  }

  // lstrip_blocks: drop the spaces between the line start and the tag.
  void lstrip(std::string& text) const {
    const size_t nl = text.rfind('\n');
    const size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
    if (l_pos == 0 && !line_starting_) return;
    if (l_pos >= text.size()) return;
    if (skip_space(text, l_pos) == text.size()) text.resize(l_pos);
  }

  void emit_data(std::string text) {
    const int at = line_;
    line_ += static_cast<int>(std::count(text.begin(), text.end(), '\n'));
    if (!text.empty()) out_.push_back({Tok::kData, std::move(text), at});
  }

  // `{% raw %}` after the `{%` and sign at `q`: returns the end of the tag, or npos.
  size_t match_raw_begin(size_t q) const {
    size_t r = skip_space(src_, q);
    if (!starts(r, "raw")) return std::string::npos;
    r = skip_space(src_, r + 3);
    if (starts(r, "-%}")) return skip_space(src_, r + 3);
    if (starts(r, "%}")) return r + 2;
    return std::string::npos;
  }

  void lex_raw() {
    const size_t n = src_.size();
    if (pos_ >= n) return;  // as for comments: input ending right after {% raw %} is no error
    for (size_t p = src_.find("{%", pos_); p != std::string::npos; p = src_.find("{%", p + 1)) {
      size_t r = p + 2;
      char sign = 0;
      if (r < n && (src_[r] == '-' || src_[r] == '+')) sign = src_[r++];
      r = skip_space(src_, r);
      if (!starts(r, "endraw")) continue;
      r = skip_space(src_, r + 6);
      size_t end;
      if (starts(r, "+%}")) {
        end = r + 3;
      } else if (starts(r, "-%}")) {
        end = skip_space(src_, r + 3);
      } else if (starts(r, "%}")) {
        end = r + 2;
        if (end < n && src_[end] == '\n') ++end;
      } else {
        continue;
      }
      std::string text = src_.substr(pos_, p - pos_);
      if (sign == '-') {
        text.resize(rstrip_len(text));
      } else if (sign != '+') {
        lstrip(text);
      }
      const int at = line_;
      line_ += count_newlines(src_, pos_, end);
      if (!text.empty()) out_.push_back({Tok::kData, std::move(text), at});
      line_starting_ = src_[end - 1] == '\n';
      pos_ = end;
      return;
    }
    fail_line(line_, "Missing end of raw directive");
  }

  void lex_comment(size_t q) {
    if (q >= src_.size()) {  // jinja2's lexer stops quietly when the input ends right there
      pos_ = q;
      return;
    }
    const size_t e = src_.find("#}", q);
    if (e == std::string::npos) fail_line(line_, "Missing end of comment tag");
    size_t end = e + 2;
    if (e > q && src_[e - 1] == '-') {
      end = skip_space(src_, end);
    } else if (!(e > q && src_[e - 1] == '+')) {
      if (end < src_.size() && src_[end] == '\n') ++end;
    }
    line_ += count_newlines(src_, pos_, end);
    line_starting_ = src_[end - 1] == '\n';
    pos_ = end;
  }

  // Tokens of one `{{ ... }}` or `{% ... %}`; `pos_` is just after the opening delimiter.
  void lex_tag(char kind) {
    const size_t n = src_.size();
    out_.push_back({kind == '%' ? Tok::kBlockBegin : Tok::kVarBegin, "", line_});
    std::vector<char> balance;
    while (true) {
      if (pos_ >= n) fail_line(line_, "unexpected end of template");
      if (balance.empty()) {
        size_t end = std::string::npos;
        if (kind == '%') {
          if (starts(pos_, "+%}")) {
            end = pos_ + 3;
          } else if (starts(pos_, "-%}")) {
            end = skip_space(src_, pos_ + 3);
          } else if (starts(pos_, "%}")) {
            end = pos_ + 2;
            if (end < n && src_[end] == '\n') ++end;
          }
        } else {
          if (starts(pos_, "-}}")) {
            end = skip_space(src_, pos_ + 3);
          } else if (starts(pos_, "}}")) {
            end = pos_ + 2;
          }
        }
        if (end != std::string::npos) {
          out_.push_back({kind == '%' ? Tok::kBlockEnd : Tok::kVarEnd, "", line_});
          line_ += count_newlines(src_, pos_, end);
          line_starting_ = src_[end - 1] == '\n';
          pos_ = end;
          return;
        }
      }
      const char c = src_[pos_];
      {
        const size_t ws = skip_space(src_, pos_);
        if (ws != pos_) {
          line_ += count_newlines(src_, pos_, ws);
          pos_ = ws;
          continue;
        }
      }
      if (c >= '0' && c <= '9') {
        lex_number();
      } else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_') {
        size_t e = pos_;
        while (e < n && (std::isalnum(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) ++e;
        out_.push_back({Tok::kName, src_.substr(pos_, e - pos_), line_});
        pos_ = e;
      } else if (c == '\'' || c == '"') {
        lex_string();
      } else {
        static const char* kOps2[] = {"//", "**", "==", "!=", ">=", "<="};
        std::string op;
        for (const char* o : kOps2) {
          if (starts(pos_, o)) op = o;
        }
        if (op.empty() && std::string_view("+-/*%~[](){}><=.:|,;").find(c) != std::string_view::npos) {
          op = std::string(1, c);
        }
        if (op.empty()) fail_line(line_, std::string("unexpected char '") + c + "'");
        if (op == "(" || op == "[" || op == "{") {
          balance.push_back(op == "(" ? ')' : op == "[" ? ']' : '}');
        } else if (op == ")" || op == "]" || op == "}") {
          if (balance.empty()) fail_line(line_, "unexpected '" + op + "'");
          if (balance.back() != op[0]) {
            fail_line(line_, "unexpected '" + op + "', expected '" + std::string(1, balance.back()) + "'");
          }
          balance.pop_back();
        }
        out_.push_back({Tok::kOp, op, line_});
        pos_ += op.size();
      }
    }
  }

  // `(\d+_)*\d+` at `at`: returns the end, or `at` if there are no digits.
  size_t digit_run(size_t at) const {
    size_t e = at;
    while (e < src_.size() && std::isdigit(static_cast<unsigned char>(src_[e]))) {
      ++e;
      if (e + 1 < src_.size() && src_[e] == '_' && std::isdigit(static_cast<unsigned char>(src_[e + 1]))) ++e;
    }
    return e;
  }

  void lex_number() {
    const size_t n = src_.size();
    auto strip_us = [](std::string s) {
      s.erase(std::remove(s.begin(), s.end(), '_'), s.end());
      return s;
    };
    // Base prefixes.
    if (src_[pos_] == '0' && pos_ + 1 < n && std::string_view("bBoOxX").find(src_[pos_ + 1]) != std::string_view::npos) {
      const char b = static_cast<char>(std::tolower(src_[pos_ + 1]));
      const int base = b == 'b' ? 2 : b == 'o' ? 8 : 16;
      size_t e = pos_ + 2;
      std::string digits;
      while (e < n) {
        const char d = src_[e];
        const bool ok = base == 16 ? std::isxdigit(static_cast<unsigned char>(d)) != 0
                                   : (d >= '0' && d < '0' + base);
        if (ok) {
          digits += d;
          ++e;
        } else if (d == '_' && e + 1 < n) {
          ++e;
        } else {
          break;
        }
      }
      if (!digits.empty()) {
        int64_t value = 0;
        const auto r = std::from_chars(digits.data(), digits.data() + digits.size(), value, base);
        if (r.ec != std::errc()) fail_line(line_, "integer literal too large: " + src_.substr(pos_, e - pos_));
        out_.push_back({Tok::kInt, src_.substr(pos_, e - pos_), line_, value});
        pos_ = e;
        return;
      }
    }
    const bool after_dot = pos_ > 0 && src_[pos_ - 1] == '.';
    const size_t int_end = digit_run(pos_);
    if (!after_dot) {
      size_t e = int_end;
      bool is_float = false;
      if (e + 1 < n && src_[e] == '.' && std::isdigit(static_cast<unsigned char>(src_[e + 1]))) {
        e = digit_run(e + 1);
        is_float = true;
      }
      if (e < n && (src_[e] == 'e' || src_[e] == 'E')) {
        size_t x = e + 1;
        if (x < n && (src_[x] == '+' || src_[x] == '-')) ++x;
        const size_t xe = digit_run(x);
        if (xe > x) {
          e = xe;
          is_float = true;
        }
      }
      if (is_float) {
        const std::string text = src_.substr(pos_, e - pos_);
        // strtod, as Python's float(): inf beyond the range, 0 below it (std::stod threw).
        out_.push_back({Tok::kFloat, text, line_, 0, std::strtod(strip_us(text).c_str(), nullptr)});
        pos_ = e;
        return;
      }
    }
    // jinja2's integer rule: [1-9](_?\d)* | 0(_?0)*
    size_t e = pos_ + 1;
    if (src_[pos_] == '0') {
      while (e < n && (src_[e] == '0' || (src_[e] == '_' && e + 1 < n && src_[e + 1] == '0'))) ++e;
    } else {
      e = int_end;
    }
    const std::string text = src_.substr(pos_, e - pos_);
    int64_t value = 0;
    const std::string digits = strip_us(text);
    const auto r = std::from_chars(digits.data(), digits.data() + digits.size(), value);
    if (r.ec != std::errc()) fail_line(line_, "integer literal too large: " + text);
    out_.push_back({Tok::kInt, text, line_, value});
    pos_ = e;
  }

  // A quoted literal, decoded as jinja2 does (Python's unicode-escape codec).
  void lex_string() {
    const size_t n = src_.size();
    const char quote = src_[pos_];
    size_t e = pos_ + 1;
    while (e < n && src_[e] != quote) e += src_[e] == '\\' ? 2 : 1;
    if (e >= n) fail_line(line_, std::string("unexpected char '") + quote + "'");
    const std::string_view body(src_.data() + pos_ + 1, e - pos_ - 1);
    std::string out;
    for (size_t k = 0; k < body.size();) {
      if (body[k] != '\\') {
        out += body[k++];
        continue;
      }
      if (k + 1 >= body.size()) {
        out += '\\';
        ++k;
        continue;
      }
      const char c = body[k + 1];
      k += 2;
      auto hex = [&](int digits) -> char32_t {
        if (k + digits > body.size()) fail_line(line_, "truncated \\x, \\u or \\U escape in string literal");
        char32_t v = 0;
        for (int d = 0; d < digits; ++d) {
          const char h = body[k + d];
          if (!std::isxdigit(static_cast<unsigned char>(h))) {
            fail_line(line_, "truncated \\x, \\u or \\U escape in string literal");
          }
          v = v * 16 + static_cast<char32_t>(std::isdigit(static_cast<unsigned char>(h)) ? h - '0' : (std::tolower(h) - 'a' + 10));
        }
        k += digits;
        return v;
      };
      switch (c) {
        case '\n': break;
        case '\\': out += '\\'; break;
        case '\'': out += '\''; break;
        case '"': out += '"'; break;
        case 'a': out += '\a'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'v': out += '\v'; break;
        case 'x': utf8_append(out, hex(2)); break;
        case 'u': utf8_append(out, hex(4)); break;
        case 'U': {
          const char32_t v = hex(8);
          if (v > 0x10FFFF) fail_line(line_, "illegal Unicode character in string literal");
          utf8_append(out, v);
          break;
        }
        case 'N': fail_line(line_, "\\N{...} escapes are not supported");
        default:
          if (c >= '0' && c <= '7') {
            char32_t v = c - '0';
            for (int d = 0; d < 2 && k < body.size() && body[k] >= '0' && body[k] <= '7'; ++d) v = v * 8 + (body[k++] - '0');
            utf8_append(out, v);
          } else if (static_cast<unsigned char>(c) >= 0x80) {
            // jinja2 backslash-replaces non-ASCII text before decoding, so "\é" keeps the
            // backslash and spells the character as an escape.
            size_t at = k - 1;
            const char32_t cp = utf8_next(body, at);
            k = at;
            char buf[16];
            if (cp < 0x100) {
              std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned>(cp));
            } else if (cp < 0x10000) {
              std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(cp));
            } else {
              std::snprintf(buf, sizeof buf, "\\U%08x", static_cast<unsigned>(cp));
            }
            out += buf;
          } else {
            out += '\\';
            out += c;
          }
      }
    }
    out_.push_back({Tok::kString, std::move(out), line_});
    line_ += count_newlines(src_, pos_, e);
    pos_ = e + 1;
  }

  std::string src_;
  size_t pos_ = 0;
  int line_ = 1;
  bool line_starting_ = true;
  std::vector<Token> out_;
};


// ---------------------------------------------------------------------------------- AST
enum class EK {
  kLiteral, kName, kList, kTuple, kDict, kAttr, kItem, kSlice, kUnary, kBinary, kAnd, kOr,
  kCompare, kCond, kCall, kFilter, kTest
};

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;
// One node type for all expressions; which fields are used depends on `kind`:
// literal: value; name: name; list/tuple: args; dict: args = k0, v0, k1, v1...; attr: a.name;
// item: a[b] (b may be a slice: a:b:c); unary/binary: name is the operator, a (b); and/or: a, b;
// compare: a then ops[i] args[i]; cond: a if b else c; call: a(args, kwargs);
// filter: a|name(args, kwargs) (a null inside {% filter %}); test: a is [not] name(args).
struct Expr {
  EK kind = EK::kLiteral;
  int line = 0;
  Value value;
  std::string name;
  ExprPtr a, b, c;
  std::vector<ExprPtr> args;
  std::vector<std::string> ops;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  bool negated = false;
};

ExprPtr make_expr(EK kind, int line) {
  auto e = std::make_unique<Expr>();
  e->kind = kind;
  e->line = line;
  return e;
}

enum class SK { kText, kPrint, kIf, kFor, kSet, kSetBlock, kMacro, kBreak, kContinue, kFilterBlock, kScope };

struct Stmt;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;
struct Stmt {
  SK kind = SK::kText;
  int line = 0;
  std::string text;                  // text; macro name; set: the namespace attribute
  ExprPtr expr;                      // print, set value, for iterable, filter chain
  ExprPtr cond;                      // for ... if cond
  std::vector<std::string> targets;  // for / set names
  bool unpack = false;               // targets are a tuple
  std::vector<std::pair<ExprPtr, Body>> branches;       // if / elif
  Body body, else_body;
  std::vector<std::pair<std::string, ExprPtr>> params;  // macro params (default or null); with
  // Names that start undefined when the frame this statement opens is entered (the for body,
  // the for-else, the macro call, the with / set / filter / generation body); see
  // analyze_scopes().
  std::vector<std::string> undef, undef_else;
};

StmtPtr make_stmt(SK kind, int line) {
  auto s = std::make_unique<Stmt>();
  s->kind = kind;
  s->line = line;
  return s;
}

// Every builtin filter and test of jinja2 3.1: a name outside these lists is a compile error in
// jinja2, so it is one here too; a listed one we do not implement fails only when it runs.
bool is_jinja_filter(const std::string& n) {
  static const char* kNames[] = {
      "abs", "attr", "batch", "capitalize", "center", "count", "d", "default", "dictsort", "e",
      "escape", "filesizeformat", "first", "float", "forceescape", "format", "groupby", "indent",
      "int", "join", "last", "length", "list", "lower", "items", "map", "min", "max", "pprint",
      "random", "reject", "rejectattr", "replace", "reverse", "round", "safe", "select",
      "selectattr", "slice", "sort", "string", "striptags", "sum", "title", "trim", "truncate",
      "unique", "upper", "urlencode", "urlize", "wordcount", "wordwrap", "xmlattr", "tojson"};
  return std::find(std::begin(kNames), std::end(kNames), n) != std::end(kNames);
}
bool is_jinja_test(const std::string& n) {
  static const char* kNames[] = {
      "odd", "even", "divisibleby", "defined", "undefined", "filter", "test", "none", "boolean",
      "false", "true", "integer", "float", "lower", "upper", "string", "mapping", "number",
      "sequence", "iterable", "callable", "sameas", "escaped", "in", "==", "eq", "equalto", "!=",
      "ne", ">", "gt", "greaterthan", "ge", ">=", "<", "lt", "lessthan", "<=", "le"};
  return std::find(std::begin(kNames), std::end(kNames), n) != std::end(kNames);
}

// ---------------------------------------------------------------------------------- parser
// Recursive descent with jinja2's grammar and precedence (parser.py): condexpr < or < and <
// not < compare < + - < ~ < * / // % < ** < unary < postfix/filter/test.
class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : t_(std::move(tokens)) {}

  Body parse() { return parse_body({}); }

 private:
  const Token& cur() const { return t_[p_]; }
  const Token& look() const { return t_[std::min(p_ + 1, t_.size() - 1)]; }
  void advance() {
    if (p_ + 1 < t_.size()) ++p_;
  }
  bool is_op(std::string_view op) const { return cur().type == Tok::kOp && cur().text == op; }
  bool is_name(std::string_view n) const { return cur().type == Tok::kName && cur().text == n; }
  bool skip_op(std::string_view op) {
    if (!is_op(op)) return false;
    advance();
    return true;
  }
  bool skip_name(std::string_view n) {
    if (!is_name(n)) return false;
    advance();
    return true;
  }
  [[noreturn]] void error(const std::string& msg) const { fail_line(cur().line, msg); }

  static std::string describe(const Token& t) {
    switch (t.type) {
      case Tok::kData: return "template data";
      case Tok::kVarBegin: return "begin of print statement";
      case Tok::kVarEnd: return "end of print statement";
      case Tok::kBlockBegin: return "begin of statement block";
      case Tok::kBlockEnd: return "end of statement block";
      case Tok::kEof: return "end of template";
      case Tok::kString: return "string";
      default: return t.text;
    }
  }
  void expect_op(std::string_view op) {
    if (!skip_op(op)) error("expected '" + std::string(op) + "', got '" + describe(cur()) + "'");
  }
  std::string expect_name() {
    if (cur().type != Tok::kName) error("expected name, got '" + describe(cur()) + "'");
    std::string s = cur().text;
    advance();
    return s;
  }
  void expect_name(std::string_view n) {
    if (!skip_name(n)) error("expected '" + std::string(n) + "', got '" + describe(cur()) + "'");
  }
  void expect_block_end() {
    if (cur().type != Tok::kBlockEnd) error("expected end of statement block, got '" + describe(cur()) + "'");
    advance();
  }

  Body parse_body(const std::vector<std::string>& ends) {
    Body body;
    while (true) {
      const Token& t = cur();
      switch (t.type) {
        case Tok::kData: {
          auto s = make_stmt(SK::kText, t.line);
          s->text = t.text;
          body.push_back(std::move(s));
          advance();
          break;
        }
        case Tok::kVarBegin: {
          auto s = make_stmt(SK::kPrint, t.line);
          advance();
          chain_ = 0;
          s->expr = parse_tuple(true, {}, false);
          if (cur().type != Tok::kVarEnd) error("expected end of print statement, got '" + describe(cur()) + "'");
          advance();
          body.push_back(std::move(s));
          break;
        }
        case Tok::kBlockBegin: {
          advance();
          if (cur().type == Tok::kName && std::find(ends.begin(), ends.end(), cur().text) != ends.end()) {
            return body;
          }
          body.push_back(parse_statement());
          break;
        }
        case Tok::kEof: {
          if (!ends.empty()) {
            std::string want;
            for (const auto& e : ends) want += (want.empty() ? "'" : " or '") + e + "'";
            error("Unexpected end of template. Jinja was looking for the following tags: " + want + ".");
          }
          return body;
        }
        default: error("unexpected '" + describe(t) + "'");
      }
    }
  }

  StmtPtr parse_statement() {
    DepthGuard guard(*this);
    chain_ = 0;
    if (cur().type != Tok::kName) error("tag name expected");
    const std::string tag = cur().text;
    const int line = cur().line;
    if (tag == "for") return parse_for();
    if (tag == "if") return parse_if();
    if (tag == "set") return parse_set();
    if (tag == "macro") return parse_macro();
    if (tag == "break" || tag == "continue") {
      if (loop_depth_ == 0) error("'" + tag + "' outside loop");
      advance();
      expect_block_end();
      return make_stmt(tag == "break" ? SK::kBreak : SK::kContinue, line);
    }
    if (tag == "print") {
      advance();
      auto s = make_stmt(SK::kPrint, line);
      s->expr = parse_tuple(true, {}, false);
      expect_block_end();
      return s;
    }
    if (tag == "filter") {
      advance();
      auto s = make_stmt(SK::kFilterBlock, line);
      s->expr = parse_filter(nullptr, true);
      expect_block_end();
      s->body = parse_body({"endfilter"});
      advance();
      expect_block_end();
      return s;
    }
    if (tag == "with") {
      advance();
      auto s = make_stmt(SK::kScope, line);
      while (cur().type != Tok::kBlockEnd) {
        if (!s->params.empty()) expect_op(",");
        std::string name = expect_name();
        expect_op("=");
        s->params.emplace_back(std::move(name), parse_expression(true));
      }
      expect_block_end();
      s->body = parse_body({"endwith"});
      advance();
      expect_block_end();
      return s;
    }
    if (tag == "generation") {  // transformers' AssistantTracker: renders its body unchanged
      advance();
      expect_block_end();
      auto s = make_stmt(SK::kScope, line);
      s->body = parse_body({"endgeneration"});
      advance();
      expect_block_end();
      return s;
    }
    static const char* kUnsupported[] = {"block", "extends", "include", "import", "from", "call", "autoescape"};
    if (std::find(std::begin(kUnsupported), std::end(kUnsupported), tag) != std::end(kUnsupported)) {
      error("the '" + tag + "' tag is not supported");
    }
    error("Encountered unknown tag '" + tag + "'.");
  }

  // `a`, `a, b`, `(a, b)`: names assigned by for / set.
  void parse_targets(Stmt& s) {
    const bool paren = skip_op("(");
    while (true) {
      s.targets.push_back(expect_name());
      if (!skip_op(",")) break;
      s.unpack = true;
      if (cur().type != Tok::kName || is_name("in")) break;
    }
    if (paren) expect_op(")");
  }

  StmtPtr parse_for() {
    auto s = make_stmt(SK::kFor, cur().line);
    advance();
    parse_targets(*s);
    expect_name("in");
    s->expr = parse_tuple(false, {"recursive"}, false);
    if (skip_name("if")) s->cond = parse_expression(true);
    if (is_name("recursive")) error("recursive for loops are not supported");
    expect_block_end();
    ++loop_depth_;
    s->body = parse_body({"endfor", "else"});
    --loop_depth_;
    if (skip_name("else")) {
      expect_block_end();
      s->else_body = parse_body({"endfor"});
    }
    expect_name("endfor");
    expect_block_end();
    return s;
  }

  StmtPtr parse_if() {
    auto s = make_stmt(SK::kIf, cur().line);
    advance();
    while (true) {
      ExprPtr cond = parse_tuple(false, {}, false);
      expect_block_end();
      Body body = parse_body({"elif", "else", "endif"});
      s->branches.emplace_back(std::move(cond), std::move(body));
      if (skip_name("elif")) continue;
      if (skip_name("else")) {
        expect_block_end();
        s->else_body = parse_body({"endif"});
      }
      expect_name("endif");
      expect_block_end();
      return s;
    }
  }

  StmtPtr parse_set() {
    auto s = make_stmt(SK::kSet, cur().line);
    advance();
    if (cur().type == Tok::kName && look().type == Tok::kOp && look().text == ".") {
      s->targets.push_back(expect_name());
      advance();
      s->text = expect_name();
    } else {
      parse_targets(*s);
    }
    if (skip_op("=")) {
      s->expr = parse_tuple(true, {}, false);
      expect_block_end();
      return s;
    }
    s->kind = SK::kSetBlock;
    if (is_op("|")) s->expr = parse_filter(nullptr, false);
    expect_block_end();
    s->body = parse_body({"endset"});
    advance();
    expect_block_end();
    return s;
  }

  StmtPtr parse_macro() {
    auto s = make_stmt(SK::kMacro, cur().line);
    advance();
    s->text = expect_name();
    expect_op("(");
    bool defaults = false;
    while (!is_op(")")) {
      if (!s->params.empty()) expect_op(",");
      std::string name = expect_name();
      ExprPtr def;
      if (skip_op("=")) {
        def = parse_expression(true);
        defaults = true;
      } else if (defaults) {
        error("non-default argument follows default argument");
      }
      s->params.emplace_back(std::move(name), std::move(def));
    }
    expect_op(")");
    expect_block_end();
    const int saved_depth = loop_depth_;
    loop_depth_ = 0;
    s->body = parse_body({"endmacro"});
    loop_depth_ = saved_depth;
    advance();
    expect_block_end();
    return s;
  }

  // ---- expressions
  bool is_tuple_end(const std::vector<std::string>& extra_end) const {
    if (cur().type == Tok::kVarEnd || cur().type == Tok::kBlockEnd || is_op(")")) return true;
    return cur().type == Tok::kName &&
           std::find(extra_end.begin(), extra_end.end(), cur().text) != extra_end.end();
  }

  ExprPtr parse_tuple(bool with_condexpr, const std::vector<std::string>& extra_end, bool explicit_parens) {
    const int line = cur().line;
    std::vector<ExprPtr> args;
    bool is_tuple = false;
    while (true) {
      if (!args.empty()) expect_op(",");
      if (is_tuple_end(extra_end)) break;
      args.push_back(parse_expression(with_condexpr));
      if (is_op(",")) {
        is_tuple = true;
      } else {
        break;
      }
    }
    if (!is_tuple) {
      if (!args.empty()) return std::move(args[0]);
      if (!explicit_parens) error("Expected an expression, got '" + describe(cur()) + "'");
    }
    auto e = make_expr(EK::kTuple, line);
    e->args = std::move(args);
    return e;
  }

  ExprPtr parse_expression(bool with_condexpr) {
    DepthGuard guard(*this);
    return with_condexpr ? parse_condexpr() : parse_or();
  }

  ExprPtr parse_condexpr() {
    int line = cur().line;
    ExprPtr e1 = parse_or();
    while (skip_name("if")) {
      ExprPtr e2 = parse_or();
      ExprPtr e3;
      if (skip_name("else")) e3 = parse_condexpr();
      bump_chain();
      auto c = make_expr(EK::kCond, line);
      c->a = std::move(e1);
      c->b = std::move(e2);
      c->c = std::move(e3);
      e1 = std::move(c);
      line = cur().line;
    }
    return e1;
  }

  ExprPtr binary(EK kind, std::string op, ExprPtr l, ExprPtr r, int line) {
    bump_chain();
    auto e = make_expr(kind, line);
    e->name = std::move(op);
    e->a = std::move(l);
    e->b = std::move(r);
    return e;
  }

  ExprPtr parse_or() {
    const int line = cur().line;
    ExprPtr l = parse_and();
    while (skip_name("or")) l = binary(EK::kOr, "or", std::move(l), parse_and(), line);
    return l;
  }
  ExprPtr parse_and() {
    const int line = cur().line;
    ExprPtr l = parse_not();
    while (skip_name("and")) l = binary(EK::kAnd, "and", std::move(l), parse_not(), line);
    return l;
  }
  ExprPtr parse_not() {
    DepthGuard guard(*this);
    if (is_name("not")) {
      auto e = make_expr(EK::kUnary, cur().line);
      advance();
      e->name = "not";
      e->a = parse_not();
      return e;
    }
    return parse_compare();
  }
  ExprPtr parse_compare() {
    const int line = cur().line;
    ExprPtr first = parse_math1();
    auto e = make_expr(EK::kCompare, line);
    while (true) {
      if (cur().type == Tok::kOp && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                     cur().text == "<=" || cur().text == ">" || cur().text == ">=")) {
        e->ops.push_back(cur().text);
        advance();
      } else if (skip_name("in")) {
        e->ops.push_back("in");
      } else if (is_name("not") && look().type == Tok::kName && look().text == "in") {
        advance();
        advance();
        e->ops.push_back("notin");
      } else {
        break;
      }
      e->args.push_back(parse_math1());
      bump_chain();
    }
    if (e->ops.empty()) return first;
    e->a = std::move(first);
    return e;
  }
  ExprPtr parse_math1() {
    const int line = cur().line;
    ExprPtr l = parse_concat();
    while (is_op("+") || is_op("-")) {
      std::string op = cur().text;
      advance();
      l = binary(EK::kBinary, op, std::move(l), parse_concat(), line);
    }
    return l;
  }
  ExprPtr parse_concat() {
    const int line = cur().line;
    ExprPtr l = parse_math2();
    while (skip_op("~")) l = binary(EK::kBinary, "~", std::move(l), parse_math2(), line);
    return l;
  }
  ExprPtr parse_math2() {
    const int line = cur().line;
    ExprPtr l = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      std::string op = cur().text;
      advance();
      l = binary(EK::kBinary, op, std::move(l), parse_pow(), line);
    }
    return l;
  }
  ExprPtr parse_pow() {
    const int line = cur().line;
    ExprPtr l = parse_unary(true);
    while (skip_op("**")) l = binary(EK::kBinary, "**", std::move(l), parse_unary(true), line);
    return l;
  }
  ExprPtr parse_unary(bool with_filter) {
    DepthGuard guard(*this);
    const int line = cur().line;
    ExprPtr node;
    if (is_op("-") || is_op("+")) {
      node = make_expr(EK::kUnary, line);
      node->name = cur().text;
      advance();
      node->a = parse_unary(false);
    } else {
      node = parse_primary();
    }
    node = parse_postfix(std::move(node));
    if (with_filter) node = parse_filter_expr(std::move(node));
    return node;
  }

  ExprPtr parse_primary() {
    const Token& t = cur();
    const int line = t.line;
    if (t.type == Tok::kName) {
      auto e = make_expr(EK::kLiteral, line);
      if (t.text == "true" || t.text == "True") {
        e->value = Value::boolean(true);
      } else if (t.text == "false" || t.text == "False") {
        e->value = Value::boolean(false);
      } else if (t.text == "none" || t.text == "None") {
        e->value = Value::none();
      } else {
        e->kind = EK::kName;
        e->name = t.text;
      }
      advance();
      return e;
    }
    if (t.type == Tok::kString) {
      std::string s;
      while (cur().type == Tok::kString) {
        s += cur().text;
        advance();
      }
      auto e = make_expr(EK::kLiteral, line);
      e->value = Value::str(std::move(s));
      return e;
    }
    if (t.type == Tok::kInt || t.type == Tok::kFloat) {
      auto e = make_expr(EK::kLiteral, line);
      e->value = t.type == Tok::kInt ? Value::integer(t.ival) : Value::real(t.fval);
      advance();
      return e;
    }
    if (skip_op("(")) {
      ExprPtr e = parse_tuple(true, {}, true);
      expect_op(")");
      return e;
    }
    if (skip_op("[")) {
      auto e = make_expr(EK::kList, line);
      while (!is_op("]")) {
        if (!e->args.empty()) expect_op(",");
        if (is_op("]")) break;
        e->args.push_back(parse_expression(true));
      }
      expect_op("]");
      return e;
    }
    if (skip_op("{")) {
      auto e = make_expr(EK::kDict, line);
      while (!is_op("}")) {
        if (!e->args.empty()) expect_op(",");
        if (is_op("}")) break;
        e->args.push_back(parse_expression(true));
        expect_op(":");
        e->args.push_back(parse_expression(true));
      }
      expect_op("}");
      return e;
    }
    error("unexpected '" + describe(t) + "'");
  }

  ExprPtr parse_postfix(ExprPtr node) {
    while (true) {
      if (is_op(".") || is_op("[")) {
        bump_chain();
        node = parse_subscript(std::move(node));
      } else if (is_op("(")) {
        bump_chain();
        node = parse_call(std::move(node));
      } else {
        return node;
      }
    }
  }

  ExprPtr parse_filter_expr(ExprPtr node) {
    while (true) {
      if (is_op("|")) {
        node = parse_filter(std::move(node), false);
      } else if (is_name("is")) {
        bump_chain();
        node = parse_test(std::move(node));
      } else if (is_op("(")) {
        bump_chain();
        node = parse_call(std::move(node));
      } else {
        return node;
      }
    }
  }

  ExprPtr parse_subscript(ExprPtr node) {
    const int line = cur().line;
    if (skip_op(".")) {
      if (cur().type == Tok::kName) {
        auto e = make_expr(EK::kAttr, line);
        e->a = std::move(node);
        e->name = cur().text;
        advance();
        return e;
      }
      if (cur().type != Tok::kInt) error("expected name or number");
      auto e = make_expr(EK::kItem, line);
      e->a = std::move(node);
      e->b = make_expr(EK::kLiteral, line);
      e->b->value = Value::integer(cur().ival);
      advance();
      return e;
    }
    expect_op("[");
    std::vector<ExprPtr> args;
    while (!is_op("]")) {
      if (!args.empty()) expect_op(",");
      args.push_back(parse_subscribed());
    }
    expect_op("]");
    auto e = make_expr(EK::kItem, line);
    e->a = std::move(node);
    if (args.size() == 1) {
      e->b = std::move(args[0]);
    } else {
      e->b = make_expr(EK::kTuple, line);
      e->b->args = std::move(args);
    }
    return e;
  }

  ExprPtr parse_subscribed() {
    const int line = cur().line;
    auto slice = make_expr(EK::kSlice, line);
    if (!skip_op(":")) {
      ExprPtr node = parse_expression(true);
      if (!skip_op(":")) return node;
      slice->a = std::move(node);
    }
    if (!is_op(":") && !is_op("]") && !is_op(",")) slice->b = parse_expression(true);
    if (skip_op(":")) {
      if (!is_op("]") && !is_op(",")) slice->c = parse_expression(true);
    }
    return slice;
  }

  void parse_call_args(Expr& e) {
    expect_op("(");
    bool require_comma = false;
    while (!is_op(")")) {
      if (require_comma) {
        expect_op(",");
        if (is_op(")")) break;
      }
      if (is_op("*") || is_op("**")) error("*args and **kwargs in calls are not supported");
      if (cur().type == Tok::kName && look().type == Tok::kOp && look().text == "=") {
        std::string key = cur().text;
        advance();
        advance();
        e.kwargs.emplace_back(std::move(key), parse_expression(true));
      } else {
        if (!e.kwargs.empty()) error("invalid syntax for function call expression");
        e.args.push_back(parse_expression(true));
      }
      require_comma = true;
    }
    expect_op(")");
  }

  ExprPtr parse_call(ExprPtr node) {
    auto e = make_expr(EK::kCall, cur().line);
    e->a = std::move(node);
    parse_call_args(*e);
    return e;
  }

  ExprPtr parse_filter(ExprPtr node, bool start_inline) {
    while (is_op("|") || start_inline) {
      if (!start_inline) advance();
      start_inline = false;
      bump_chain();
      const int line = cur().line;
      std::string name = expect_name();
      while (skip_op(".")) name += "." + expect_name();
      if (!is_jinja_filter(name)) fail_line(line, "No filter named '" + name + "'.");
      auto f = make_expr(EK::kFilter, line);
      f->name = std::move(name);
      f->a = std::move(node);
      if (is_op("(")) parse_call_args(*f);
      node = std::move(f);
    }
    return node;
  }

  ExprPtr parse_test(ExprPtr node) {
    const int line = cur().line;
    advance();  // is
    auto e = make_expr(EK::kTest, line);
    e->negated = skip_name("not");
    e->name = expect_name();
    while (skip_op(".")) e->name += "." + expect_name();
    if (!is_jinja_test(e->name)) fail_line(line, "No test named '" + e->name + "'.");
    e->a = std::move(node);
    if (is_op("(")) {
      parse_call_args(*e);
    } else if ((cur().type == Tok::kName || cur().type == Tok::kString || cur().type == Tok::kInt ||
                cur().type == Tok::kFloat || is_op("(") || is_op("[") || is_op("{")) &&
               !is_name("else") && !is_name("or") && !is_name("and")) {
      if (is_name("is")) error("You cannot chain multiple tests with is");
      e->args.push_back(parse_postfix(parse_primary()));
    }
    return e;
  }

  // Bounds the recursion of the parser (and so of the evaluator) on pathological nesting.
  struct DepthGuard {
    explicit DepthGuard(Parser& p) : p_(p) {
      if (++p_.depth_ > kMaxDepth) p_.error("template nested too deeply");
    }
    ~DepthGuard() { --p_.depth_; }
    Parser& p_;
  };
  static constexpr int kMaxDepth = 300;
  // Operators, filters, calls and subscripts chain left-deep without recursing in the parser,
  // but the evaluator recurses over them: bound them per statement too.
  void bump_chain() {
    if (++chain_ > kMaxChain) error("expression too long");
  }
  static constexpr int kMaxChain = 1000;
  int chain_ = 0;

  std::vector<Token> t_;
  size_t p_ = 0;
  int loop_depth_ = 0;
  int depth_ = 0;
};

// ---------------------------------------------------------------------------------- operations
[[noreturn]] void undefined_error(const Value& u, int line) {
  fail_line(line, u.s.empty() ? "undefined value" : u.s);
}

Value generator(ValueList items) {
  Value v = Value::make_list(std::move(items));
  v.generator = true;
  return v;
}

std::string object_desc(const Value& v) { return "'" + py_type_name(v) + " object'"; }

Value no_attribute(const Value& obj, const std::string& name) {
  return Value::undefined(object_desc(obj) + " has no attribute '" + name + "'");
}

// Python's iter(v), materialized.
ValueList iterate(const Value& v, int line) {
  switch (v.type) {
    case Value::Type::kList: return *v.list;
    case Value::Type::kDict: {
      ValueList keys;
      for (const auto& kv : *v.dict) keys.push_back(kv.first);
      return keys;
    }
    case Value::Type::kString: {
      ValueList chars;
      for (size_t i = 0; i < v.s.size();) {
        const size_t start = i;
        utf8_next(v.s, i);
        chars.push_back(Value::str(v.s.substr(start, i - start)));
      }
      return chars;
    }
    case Value::Type::kUndefined: return {};
    default: fail_line(line, "'" + py_type_name(v) + "' object is not iterable");
  }
}

int64_t py_len(const Value& v, int line) {
  switch (v.type) {
    case Value::Type::kString: return static_cast<int64_t>(to_u32(v.s).size());
    case Value::Type::kList:
      if (v.generator) break;
      return static_cast<int64_t>(v.list->size());
    case Value::Type::kDict: return static_cast<int64_t>(v.dict->size());
    case Value::Type::kUndefined: return 0;
    default: break;
  }
  fail_line(line, "object of type '" + py_type_name(v) + "' has no len()");
}

bool py_equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is_int_like() && b.is_int_like()) return a.i == b.i;
    return a.as_double() == b.as_double();
  }
  if (a.type != b.type) return false;
  switch (a.type) {
    case Value::Type::kUndefined:
    case Value::Type::kNone: return true;
    case Value::Type::kString: return a.s == b.s;
    case Value::Type::kList: {
      if (a.generator || b.generator) return a.list == b.list;
      if (a.tuple != b.tuple || a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k) {
        if (!py_equal((*a.list)[k], (*b.list)[k])) return false;
      }
      return true;
    }
    case Value::Type::kDict: {
      if (a.dict->size() != b.dict->size()) return false;
      for (const auto& [k, v] : *a.dict) {
        bool found = false;
        for (const auto& [k2, v2] : *b.dict) {
          if (py_equal(k, k2)) {
            if (!py_equal(v, v2)) return false;
            found = true;
            break;
          }
        }
        if (!found) return false;
      }
      return true;
    }
    case Value::Type::kObject: return a.obj == b.obj;
    case Value::Type::kFunction: return a.fn == b.fn;
    default: return false;
  }
}

bool py_less(const Value& a, const Value& b, int line) {
  if (a.is_number() && b.is_number()) {
    if (a.is_int_like() && b.is_int_like()) return a.i < b.i;
    return a.as_double() < b.as_double();
  }
  if (a.is_undefined()) undefined_error(a, line);
  if (b.is_undefined()) undefined_error(b, line);
  if (a.is_string() && b.is_string()) return a.s < b.s;  // UTF-8 byte order is code point order
  if (a.is_list() && b.is_list() && a.tuple == b.tuple && !a.generator && !b.generator) {
    const size_t n = std::min(a.list->size(), b.list->size());
    for (size_t k = 0; k < n; ++k) {
      if (!py_equal((*a.list)[k], (*b.list)[k])) return py_less((*a.list)[k], (*b.list)[k], line);
    }
    return a.list->size() < b.list->size();
  }
  fail_line(line, "'<' not supported between instances of '" + py_type_name(a) + "' and '" +
                      py_type_name(b) + "'");
}

bool compare(const std::string& op, const Value& a, const Value& b, int line);

// Python's hash(): lists, dicts, generators, namespaces and undefined cannot be dict keys.
bool hashable(const Value& v) {
  if (v.is_dict() || v.is_undefined() || v.type == Value::Type::kObject) return false;
  if (v.is_list()) {
    if (!v.tuple || v.generator) return v.generator;
    return std::all_of(v.list->begin(), v.list->end(), hashable);
  }
  return true;
}

void require_hashable(const Value& v, int line) {
  if (!hashable(v)) fail_line(line, "unhashable type: '" + py_type_name(v) + "'");
}

bool contains(const Value& container, const Value& item, int line) {
  switch (container.type) {
    case Value::Type::kString:
      if (!item.is_string()) {
        fail_line(line, "'in <string>' requires string as left operand, not " + py_type_name(item));
      }
      return container.s.find(item.s) != std::string::npos;
    case Value::Type::kList:
      for (const auto& x : *container.list) {
        if (py_equal(x, item)) return true;
      }
      return false;
    case Value::Type::kDict:
      require_hashable(item, line);
      for (const auto& kv : *container.dict) {
        if (py_equal(kv.first, item)) return true;
      }
      return false;
    case Value::Type::kUndefined: return false;
    default: fail_line(line, "argument of type '" + py_type_name(container) + "' is not iterable");
  }
}

bool compare(const std::string& op, const Value& a, const Value& b, int line) {
  if (op == "==") return py_equal(a, b);
  if (op == "!=") return !py_equal(a, b);
  if (op == "in") return contains(b, a, line);
  if (op == "notin") return !contains(b, a, line);
  if (a.is_number() && b.is_number() && !(a.is_int_like() && b.is_int_like())) {
    const double x = a.as_double(), y = b.as_double();
    if (op == "<") return x < y;
    if (op == "<=") return x <= y;
    if (op == ">") return x > y;
    return x >= y;
  }
  if (op == "<") return py_less(a, b, line);
  if (op == ">") return py_less(b, a, line);
  if (op == "<=") return !py_less(b, a, line);
  return !py_less(a, b, line);
}

void dict_set(ValueDict& d, Value key, Value value) {
  for (auto& kv : d) {
    if (py_equal(kv.first, key)) {
      kv.second = std::move(value);
      return;
    }
  }
  d.emplace_back(std::move(key), std::move(value));
}

const Value* dict_find(const ValueDict& d, const Value& key) {
  for (const auto& kv : d) {
    if (py_equal(kv.first, key)) return &kv.second;
  }
  return nullptr;
}

// Python's slice.indices(): the positions a[start:stop:step] selects.
std::vector<int64_t> slice_positions(int64_t len, std::optional<int64_t> start_in,
                                     std::optional<int64_t> stop_in, int64_t step) {
  int64_t start, stop;
  if (!start_in) {
    start = step < 0 ? len - 1 : 0;
  } else {
    start = *start_in;
    if (start < 0) {
      start += len;
      if (start < 0) start = step < 0 ? -1 : 0;
    } else if (start >= len) {
      start = step < 0 ? len - 1 : len;
    }
  }
  if (!stop_in) {
    stop = step < 0 ? -1 : len;
  } else {
    stop = *stop_in;
    if (stop < 0) {
      stop += len;
      if (stop < 0) stop = step < 0 ? -1 : 0;
    } else if (stop >= len) {
      stop = step < 0 ? len - 1 : len;
    }
  }
  std::vector<int64_t> pos;
  if (step > 0) {
    for (int64_t k = start; k < stop; k += step) pos.push_back(k);
  } else {
    for (int64_t k = start; k > stop; k += step) pos.push_back(k);
  }
  return pos;
}

// ---------------------------------------------------------------------------------- strings
bool in_chars(char32_t c, const std::u32string* chars) {
  return chars ? chars->find(c) != std::u32string::npos : is_py_space(c);
}

// str.strip / lstrip / rstrip; `chars` null means whitespace.
std::string py_strip(const std::string& s, const std::u32string* chars, bool left, bool right) {
  const std::u32string u = to_u32(s);
  size_t a = 0, b = u.size();
  if (left) {
    while (a < b && in_chars(u[a], chars)) ++a;
  }
  if (right) {
    while (b > a && in_chars(u[b - 1], chars)) --b;
  }
  return from_u32(std::u32string_view(u).substr(a, b - a));
}

std::vector<std::u32string> split_u32(const std::u32string& u, const std::u32string* sep, int64_t maxsplit) {
  std::vector<std::u32string> out;
  if (!sep) {
    size_t i = 0;
    const size_t n = u.size();
    int64_t splits = 0;
    while (true) {
      while (i < n && is_py_space(u[i])) ++i;
      if (i >= n) break;
      if (maxsplit >= 0 && splits == maxsplit) {
        out.push_back(u.substr(i));
        break;
      }
      size_t j = i;
      while (j < n && !is_py_space(u[j])) ++j;
      out.push_back(u.substr(i, j - i));
      ++splits;
      i = j;
    }
    return out;
  }
  size_t i = 0;
  int64_t splits = 0;
  while (maxsplit < 0 || splits < maxsplit) {
    const size_t j = u.find(*sep, i);
    if (j == std::u32string::npos) break;
    out.push_back(u.substr(i, j - i));
    i = j + sep->size();
    ++splits;
  }
  out.push_back(u.substr(i));
  return out;
}

Value py_split(const std::string& s, const CallArgs& a, bool from_right) {
  const Value sep_v = a.get_or(0, "sep", Value::none());
  const Value max_v = a.get_or(1, "maxsplit", Value::integer(-1));
  if (!sep_v.is_none() && !sep_v.is_string()) fail_line(a.line, "must be str or None, not " + py_type_name(sep_v));
  if (!max_v.is_int_like()) fail_line(a.line, "maxsplit must be an integer");
  std::u32string u = to_u32(s);
  std::optional<std::u32string> sep;
  if (sep_v.is_string()) {
    sep = to_u32(sep_v.s);
    if (sep->empty()) fail_line(a.line, "empty separator");
  }
  if (from_right) {
    std::reverse(u.begin(), u.end());
    if (sep) std::reverse(sep->begin(), sep->end());
  }
  auto parts = split_u32(u, sep ? &*sep : nullptr, max_v.i);
  ValueList out;
  for (auto& p : parts) {
    if (from_right) std::reverse(p.begin(), p.end());
    out.push_back(Value::str(from_u32(p)));
  }
  if (from_right) std::reverse(out.begin(), out.end());
  return Value::make_list(std::move(out));
}

std::string py_replace(const std::string& s, const std::string& old_s, const std::string& new_s, int64_t count) {
  if (old_s.empty()) {
    const std::u32string u = to_u32(s);
    std::string out;
    int64_t done = 0;
    for (char32_t c : u) {
      if (count < 0 || done < count) {
        append_bounded(out, new_s);
        ++done;
      }
      utf8_append(out, c);
    }
    if (count < 0 || done < count) out += new_s;
    return out;
  }
  std::string out;
  size_t i = 0;
  int64_t done = 0;
  while (count < 0 || done < count) {
    const size_t j = s.find(old_s, i);
    if (j == std::string::npos) break;
    out.append(s, i, j - i);
    append_bounded(out, new_s);
    i = j + old_s.size();
    ++done;
  }
  out.append(s, i, std::string::npos);
  return out;
}

std::vector<std::string> py_splitlines(const std::string& s, bool keepends) {
  const std::u32string u = to_u32(s);
  std::vector<std::string> out;
  size_t start = 0;
  for (size_t k = 0; k < u.size(); ++k) {
    const char32_t c = u[k];
    const bool brk = c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D ||
                     c == 0x1E || c == 0x85 || c == 0x2028 || c == 0x2029;
    if (!brk) continue;
    size_t end = k + 1;
    if (c == '\r' && k + 1 < u.size() && u[k + 1] == '\n') end = k + 2;
    out.push_back(from_u32(std::u32string_view(u).substr(start, (keepends ? end : k) - start)));
    start = end;
    k = end - 1;
  }
  if (start < u.size()) out.push_back(from_u32(std::u32string_view(u).substr(start)));
  return out;
}

std::optional<int64_t> py_parse_int(const std::string& text, int base) {
  std::string s = py_strip(text, nullptr, true, true);
  bool neg = false;
  size_t i = 0;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) neg = s[i++] == '-';
  if (i + 1 < s.size() && s[i] == '0') {
    const char p = static_cast<char>(std::tolower(s[i + 1]));
    if ((p == 'x' && base == 16) || (p == 'o' && base == 8) || (p == 'b' && base == 2)) {
      i += 2;
      if (i < s.size() && s[i] == '_') ++i;
    }
  }
  std::string digits;
  for (; i < s.size(); ++i) {
    if (s[i] == '_' && !digits.empty() && i + 1 < s.size() && s[i + 1] != '_') continue;
    digits += s[i];
  }
  if (digits.empty()) return std::nullopt;
  int64_t v = 0;
  const auto r = std::from_chars(digits.data(), digits.data() + digits.size(), v, base);
  if (r.ec != std::errc() || r.ptr != digits.data() + digits.size()) return std::nullopt;
  return neg ? -v : v;
}

std::optional<double> py_parse_float(const std::string& text) {
  std::string s = py_strip(text, nullptr, true, true);
  std::string lower = lower_str(s);
  std::string body = lower;
  double sign = 1;
  if (!body.empty() && (body[0] == '+' || body[0] == '-')) {
    sign = body[0] == '-' ? -1 : 1;
    body.erase(0, 1);
  }
  if (body == "inf" || body == "infinity") return sign * HUGE_VAL;
  if (body == "nan") return std::nan("");
  // [digits][.digits][e[+-]digits], underscores only between digits.
  std::string clean;
  bool digit_seen = false;
  for (size_t k = 0; k < body.size(); ++k) {
    const char c = body[k];
    if (c == '_') {
      if (k == 0 || k + 1 >= body.size() || !std::isdigit(static_cast<unsigned char>(body[k - 1])) ||
          !std::isdigit(static_cast<unsigned char>(body[k + 1]))) {
        return std::nullopt;
      }
      continue;
    }
    if (std::isdigit(static_cast<unsigned char>(c))) {
      digit_seen = true;
    } else if (c != '.' && c != 'e' && c != '+' && c != '-') {
      return std::nullopt;
    }
    clean += c;
  }
  if (!digit_seen) return std::nullopt;
  double v = 0;
  const auto r = std::from_chars(clean.data(), clean.data() + clean.size(), v);
  if (r.ec == std::errc::result_out_of_range) {
    v = HUGE_VAL;
  } else if (r.ec != std::errc() || r.ptr != clean.data() + clean.size()) {
    return std::nullopt;
  }
  return sign * v;
}

int64_t to_index_arg(const Value& v, int line, const char* what) {
  if (!v.is_int_like()) fail_line(line, std::string(what) + " must be an integer, not " + py_type_name(v));
  return v.i;
}

std::string pad_str(const std::string& s, int64_t width, char32_t fill, int align /* -1 left, 0 center, 1 right */) {
  const int64_t len = static_cast<int64_t>(to_u32(s).size());
  if (width <= len) return s;
  if (width > static_cast<int64_t>(kMaxStringBytes)) fail_too_large();
  const int64_t marg = width - len;
  int64_t left = 0;
  if (align == 1) left = marg;
  if (align == 0) left = marg / 2 + (marg & width & 1);
  std::string out;
  for (int64_t k = 0; k < left; ++k) utf8_append(out, fill);
  out += s;
  for (int64_t k = 0; k < marg - left; ++k) utf8_append(out, fill);
  return out;
}

std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&#34;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

// Python's `fmt % args` for the conversions templates use: %s %r %d %i %f %e %g %x %o %c %%.
std::string py_percent_format(const std::string& fmt, const Value& args, int line, bool escape_args = false) {
  // Like CPython: a tuple supplies the positional values; any other object is the single value,
  // and one with __getitem__ (dict, list, undefined) also counts as the mapping for %(name)s and
  // switches off the "not all arguments converted" check.
  ValueList items;
  const Value* mapping = nullptr;
  if (args.is_list() && args.tuple) {
    items = *args.list;
  } else {
    items.push_back(args);
    if (args.is_dict() || args.is_undefined() || (args.is_list() && !args.generator)) mapping = &args;
  }
  size_t next = 0;
  std::string out;
  for (size_t k = 0; k < fmt.size(); ++k) {
    if (fmt[k] != '%') {
      out += fmt[k];
      continue;
    }
    if (++k >= fmt.size()) fail_line(line, "incomplete format");
    const Value* arg = nullptr;
    if (fmt[k] == '(') {
      const size_t close = fmt.find(')', k);
      if (close == std::string::npos || !mapping) fail_line(line, "format requires a mapping");
      if (mapping->is_undefined()) undefined_error(*mapping, line);
      if (!mapping->is_dict()) fail_line(line, "list indices must be integers or slices, not str");
      arg = dict_find(*mapping->dict, Value::str(fmt.substr(k + 1, close - k - 1)));
      if (!arg) fail_line(line, "KeyError: " + py_str_repr(fmt.substr(k + 1, close - k - 1)));
      k = close + 1;
    }
    std::string flags;
    while (k < fmt.size() && std::string_view("-+ #0").find(fmt[k]) != std::string_view::npos) flags += fmt[k++];
    std::string width, prec;
    while (k < fmt.size() && std::isdigit(static_cast<unsigned char>(fmt[k]))) width += fmt[k++];
    if (k < fmt.size() && fmt[k] == '.') {
      prec = ".";
      ++k;
      while (k < fmt.size() && std::isdigit(static_cast<unsigned char>(fmt[k]))) prec += fmt[k++];
    }
    while (k < fmt.size() && (fmt[k] == 'l' || fmt[k] == 'h' || fmt[k] == 'L')) ++k;
    if (k >= fmt.size()) fail_line(line, "incomplete format");
    // Wider than kMaxStringBytes is refused anyway; this also keeps stoll/stoul below in range.
    if (width.size() > 9 || prec.size() > 10) fail_line(line, "format width or precision too large");
    const char conv = fmt[k];
    if (conv == '%') {
      out += '%';
      continue;
    }
    if (!arg) {
      if (next >= items.size()) fail_line(line, "not enough arguments for format string");
      arg = &items[next++];
    }
    std::string piece;
    char buf[512];
    const std::string spec = "%" + flags + width + prec;
    switch (conv) {
      case 's':
      case 'r':
      case 'a': {
        piece = conv == 's' ? py_str(*arg) : py_repr(*arg);
        // Markup % x escapes what x turns into, unless x is Markup itself.
        if (escape_args && !(conv == 's' && arg->markup)) piece = html_escape(piece);
        if (prec.size() > 1) {
          const auto u = to_u32(piece);
          piece = from_u32(std::u32string_view(u).substr(0, std::stoul(prec.substr(1))));
        }
        const int64_t w = width.empty() ? 0 : std::stoll(width);
        piece = pad_str(piece, w, ' ', flags.find('-') != std::string::npos ? -1 : 1);
        break;
      }
      case 'd':
      case 'i':
      case 'u':
      case 'x':
      case 'X':
      case 'o':
      case 'c': {
        if (!arg->is_number()) fail_line(line, "%" + std::string(1, conv) + " format: a real number is required, not " + py_type_name(*arg));
        if (conv == 'c') {
          utf8_append(piece, static_cast<char32_t>(arg->is_int_like() ? arg->i : 0));
          break;
        }
        const long long v = arg->is_int_like() ? arg->i : static_cast<long long>(std::trunc(arg->f));
        std::snprintf(buf, sizeof buf, (spec + "ll" + (conv == 'i' || conv == 'u' ? 'd' : conv)).c_str(), v);
        piece = buf;
        break;
      }
      case 'f':
      case 'F':
      case 'e':
      case 'E':
      case 'g':
      case 'G': {
        if (!arg->is_number()) fail_line(line, "must be real number, not " + py_type_name(*arg));
        std::snprintf(buf, sizeof buf, (spec + conv).c_str(), arg->as_double());
        piece = buf;
        break;
      }
      default: fail_line(line, std::string("unsupported format character '") + conv + "'");
    }
    out += piece;
  }
  if (!mapping && next < items.size()) fail_line(line, "not all arguments converted during string formatting");
  return out;
}

// Python's str.format for "{}", "{0}" and "{name}" fields without format specs.
std::string py_str_format(const std::string& fmt, const CallArgs& a) {
  std::string out;
  size_t auto_idx = 0;
  for (size_t k = 0; k < fmt.size(); ++k) {
    const char c = fmt[k];
    if (c == '{' && k + 1 < fmt.size() && fmt[k + 1] == '{') {
      out += '{';
      ++k;
    } else if (c == '}' && k + 1 < fmt.size() && fmt[k + 1] == '}') {
      out += '}';
      ++k;
    } else if (c == '{') {
      const size_t close = fmt.find('}', k);
      if (close == std::string::npos) fail_line(a.line, "Single '{' encountered in format string");
      const std::string field = fmt.substr(k + 1, close - k - 1);
      if (field.find_first_of(":!.[") != std::string::npos) fail_line(a.line, "format specs in str.format are not supported");
      const Value* v = nullptr;
      if (field.empty()) {
        if (auto_idx >= a.pos.size()) fail_line(a.line, "Replacement index out of range");
        v = &a.pos[auto_idx++];
      } else if (std::isdigit(static_cast<unsigned char>(field[0]))) {
        size_t idx = 0;
        const auto r = std::from_chars(field.data(), field.data() + field.size(), idx);
        if (r.ec != std::errc() || idx >= a.pos.size()) fail_line(a.line, "Replacement index out of range");
        v = &a.pos[idx];
      } else {
        for (const auto& kv : a.kw) {
          if (kv.first == field) v = &kv.second;
        }
        if (!v) fail_line(a.line, "KeyError: " + py_str_repr(field));
      }
      out += py_str(*v);
      k = close;
    } else if (c == '}') {
      fail_line(a.line, "Single '}' encountered in format string");
    } else {
      out += c;
    }
  }
  return out;
}


bool is_str_method(const std::string& n) {
  static const char* kNames[] = {
      "strip", "lstrip", "rstrip", "split", "rsplit", "startswith", "endswith", "upper", "lower",
      "title", "capitalize", "swapcase", "casefold", "replace", "find", "rfind", "index", "rindex",
      "count", "join", "splitlines", "isdigit", "isalpha", "isalnum", "isspace", "islower",
      "isupper", "isnumeric", "isdecimal", "istitle", "isascii", "zfill", "center", "ljust",
      "rjust", "removeprefix", "removesuffix", "partition", "rpartition", "format", "encode",
      "expandtabs", "format_map", "isidentifier", "isprintable", "maketrans", "translate"};
  return std::find(std::begin(kNames), std::end(kNames), n) != std::end(kNames);
}

Value call_str_method(const std::string& s, const std::string& name, CallArgs& a) {
  const int line = a.line;
  auto str_arg = [&](size_t idx, const char* kw) -> std::string {
    const Value* v = a.get(idx, kw);
    if (!v) fail_line(line, name + "() missing required argument '" + kw + "'");
    if (!v->is_string()) fail_line(line, name + "() argument must be str, not " + py_type_name(*v));
    return v->s;
  };
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    const Value chars = a.get_or(0, "chars", Value::none());
    std::u32string cs;
    if (!chars.is_none()) {
      if (!chars.is_string()) fail_line(line, name + " arg must be None or str");
      cs = to_u32(chars.s);
    }
    return Value::str(py_strip(s, chars.is_none() ? nullptr : &cs, name != "rstrip", name != "lstrip"));
  }
  if (name == "upper") return Value::str(upper_str(s));
  if (name == "lower" || name == "casefold") return Value::str(lower_str(s));
  if (name == "title") return Value::str(py_title_str(s));
  if (name == "capitalize") return Value::str(capitalize_str(s));
  if (name == "swapcase") {
    std::u32string u = to_u32(s);
    for (char32_t& c : u) c = is_upper_cp(c) ? to_lower_cp(c) : to_upper_cp(c);
    return Value::str(from_u32(u));
  }
  if (name == "startswith" || name == "endswith") {
    const Value* p = a.get(0, "prefix");
    if (!p) fail_line(line, name + "() takes at least 1 argument (0 given)");
    std::vector<std::string> options;
    if (p->is_string()) {
      options.push_back(p->s);
    } else if (p->is_list() && p->tuple) {
      for (const auto& x : *p->list) {
        if (!x.is_string()) fail_line(line, "tuple for " + name + " must only contain str");
        options.push_back(x.s);
      }
    } else {
      fail_line(line, name + " first arg must be str or a tuple of str, not " + py_type_name(*p));
    }
    if (a.pos.size() > 1) fail_line(line, name + "() with start/end arguments is not supported");
    for (const auto& o : options) {
      if (o.size() > s.size()) continue;
      if (name == "startswith" ? s.compare(0, o.size(), o) == 0 : s.compare(s.size() - o.size(), o.size(), o) == 0) {
        return Value::boolean(true);
      }
    }
    return Value::boolean(false);
  }
  if (name == "split" || name == "rsplit") return py_split(s, a, name == "rsplit");
  if (name == "splitlines") {
    ValueList out;
    for (auto& l : py_splitlines(s, truthy(a.get_or(0, "keepends", Value::boolean(false))))) {
      out.push_back(Value::str(std::move(l)));
    }
    return Value::make_list(std::move(out));
  }
  if (name == "replace") {
    const Value count = a.get_or(2, "count", Value::integer(-1));
    return Value::str(py_replace(s, str_arg(0, "old"), str_arg(1, "new"), to_index_arg(count, line, "count")));
  }
  if (name == "find" || name == "rfind" || name == "index" || name == "rindex" || name == "count") {
    if (a.pos.size() > 1) fail_line(line, name + "() with start/end arguments is not supported");
    const std::u32string u = to_u32(s), sub = to_u32(str_arg(0, "sub"));
    if (name == "count") {
      if (sub.empty()) return Value::integer(static_cast<int64_t>(u.size()) + 1);
      int64_t n = 0;
      for (size_t p = u.find(sub); p != std::u32string::npos; p = u.find(sub, p + sub.size())) ++n;
      return Value::integer(n);
    }
    const size_t p = (name == "find" || name == "index") ? u.find(sub) : u.rfind(sub);
    if (p == std::u32string::npos) {
      if (name == "index" || name == "rindex") fail_line(line, "substring not found");
      return Value::integer(-1);
    }
    return Value::integer(static_cast<int64_t>(p));
  }
  if (name == "join") {
    const Value* it = a.get(0, "iterable");
    if (!it) fail_line(line, "join() takes exactly one argument (0 given)");
    std::string out;
    bool first = true;
    for (const auto& x : iterate(*it, line)) {
      if (!x.is_string()) fail_line(line, "sequence item: expected str instance, " + py_type_name(x) + " found");
      if (!first) append_bounded(out, s);
      first = false;
      append_bounded(out, x.s);
    }
    return Value::str(out);
  }
  if (name.rfind("is", 0) == 0 && name != "isidentifier" && name != "isprintable") {
    const std::u32string u = to_u32(s);
    if (name == "islower" || name == "isupper") {
      bool cased = false;
      for (char32_t c : u) {
        if (name == "islower" ? is_upper_cp(c) : is_lower_cp(c)) return Value::boolean(false);
        cased = cased || is_cased_cp(c);
      }
      return Value::boolean(cased);
    }
    if (name == "istitle") return Value::boolean(!u.empty() && py_title_str(s) == s && is_cased_cp(u[0]));
    if (u.empty()) return Value::boolean(false);
    for (char32_t c : u) {
      bool ok = false;
      if (name == "isdigit" || name == "isnumeric" || name == "isdecimal") ok = is_digit_cp(c);
      if (name == "isalpha") ok = is_alpha_cp(c);
      if (name == "isalnum") ok = is_alpha_cp(c) || is_digit_cp(c);
      if (name == "isspace") ok = is_py_space(c);
      if (name == "isascii") ok = c < 0x80;
      if (!ok) return Value::boolean(false);
    }
    return Value::boolean(true);
  }
  if (name == "zfill") {
    const int64_t w = to_index_arg(a.get_or(0, "width", Value::integer(0)), line, "width");
    if (w > static_cast<int64_t>(kMaxStringBytes)) fail_too_large();
    std::string body = s;
    std::string sign;
    if (!body.empty() && (body[0] == '+' || body[0] == '-')) {
      sign = body.substr(0, 1);
      body.erase(0, 1);
    }
    const int64_t len = static_cast<int64_t>(to_u32(s).size());
    return Value::str(sign + std::string(std::max<int64_t>(0, w - len), '0') + body);
  }
  if (name == "center" || name == "ljust" || name == "rjust") {
    const int64_t w = to_index_arg(a.get_or(0, "width", Value::integer(0)), line, "width");
    const std::string fill = a.get_or(1, "fillchar", Value::str(" ")).s;
    const std::u32string f = to_u32(fill);
    if (f.size() != 1) fail_line(line, "The fill character must be exactly one character long");
    return Value::str(pad_str(s, w, f[0], name == "center" ? 0 : name == "ljust" ? -1 : 1));
  }
  if (name == "removeprefix") {
    const std::string p = str_arg(0, "prefix");
    return Value::str(s.compare(0, p.size(), p) == 0 ? s.substr(p.size()) : s);
  }
  if (name == "removesuffix") {
    const std::string p = str_arg(0, "suffix");
    const bool ends = !p.empty() && p.size() <= s.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
    return Value::str(ends ? s.substr(0, s.size() - p.size()) : s);
  }
  if (name == "partition" || name == "rpartition") {
    const std::string sep = str_arg(0, "sep");
    if (sep.empty()) fail_line(line, "empty separator");
    const size_t p = name == "partition" ? s.find(sep) : s.rfind(sep);
    if (p == std::string::npos) {
      return name == "partition"
                 ? Value::make_list({Value::str(s), Value::str(""), Value::str("")}, true)
                 : Value::make_list({Value::str(""), Value::str(""), Value::str(s)}, true);
    }
    return Value::make_list({Value::str(s.substr(0, p)), Value::str(sep), Value::str(s.substr(p + sep.size()))}, true);
  }
  if (name == "format") return Value::str(py_str_format(s, a));
  fail_line(line, "str." + name + "() is not supported");
}

bool is_dict_method(const std::string& n) {
  return n == "items" || n == "keys" || n == "values" || n == "get" || n == "copy";
}
bool is_unsafe_method(const Value& v, const std::string& n) {
  static const char* kDict[] = {"clear", "pop", "popitem", "setdefault", "update"};
  static const char* kList[] = {"append", "extend", "insert", "pop", "remove", "reverse", "sort", "clear"};
  if (v.is_dict()) return std::find(std::begin(kDict), std::end(kDict), n) != std::end(kDict);
  if (v.is_list() && !v.tuple && !v.generator) return std::find(std::begin(kList), std::end(kList), n) != std::end(kList);
  return false;
}

// markupsafe.Markup's str methods: string arguments are escaped first (except split's), and
// string results come back as Markup.
Value call_markup_method(const std::string& s, const std::string& name, CallArgs& a) {
  static const char* kWrapped[] = {"capitalize", "title", "lower", "upper", "replace", "ljust", "rjust",
                                   "lstrip", "rstrip", "center", "strip", "expandtabs", "swapcase",
                                   "zfill", "casefold", "removeprefix", "removesuffix", "partition",
                                   "rpartition", "join", "format", "split", "rsplit", "splitlines"};
  if (std::find(std::begin(kWrapped), std::end(kWrapped), name) == std::end(kWrapped)) {
    return call_str_method(s, name, a);
  }
  auto escape_arg = [](Value& v) {
    if (v.is_string() && !v.markup) v = Value::markup_str(html_escape(v.s));
  };
  if (name != "split" && name != "rsplit" && name != "splitlines") {
    for (auto& v : a.pos) escape_arg(v);
    for (auto& kv : a.kw) escape_arg(kv.second);
  }
  if (name == "join" && !a.pos.empty()) {
    ValueList items = iterate(a.pos[0], a.line);
    for (auto& v : items) escape_arg(v);
    a.pos[0] = Value::make_list(std::move(items));
  }
  Value r = call_str_method(s, name, a);
  if (r.is_string()) r.markup = true;
  if (r.is_list()) {
    for (auto& v : *r.list) v.markup = v.is_string();
  }
  return r;
}

Value call_method(const Value& self, const std::string& name, CallArgs& a) {
  if (self.is_string()) return self.markup ? call_markup_method(self.s, name, a) : call_str_method(self.s, name, a);
  if (self.is_dict()) {
    if (name == "get") {
      const Value* k = a.get(0, "key");
      if (!k) fail_line(a.line, "get expected at least 1 argument, got 0");
      const Value* v = dict_find(*self.dict, *k);
      return v ? *v : a.get_or(1, "default", Value::none());
    }
    if (name == "copy") return Value::make_dict(*self.dict);
    ValueList out;
    for (const auto& [k, v] : *self.dict) {
      if (name == "items") out.push_back(Value::make_list({k, v}, true));
      if (name == "keys") out.push_back(k);
      if (name == "values") out.push_back(v);
    }
    return Value::make_list(std::move(out));
  }
  if (self.is_list()) {
    if (name == "copy") return Value::make_list(*self.list);
    const Value* x = a.get(0, "value");
    if (!x) fail_line(a.line, name + "() takes exactly one argument (0 given)");
    int64_t count = 0;
    for (size_t k = 0; k < self.list->size(); ++k) {
      if (py_equal((*self.list)[k], *x)) {
        if (name == "index") return Value::integer(static_cast<int64_t>(k));
        ++count;
      }
    }
    if (name == "index") fail_line(a.line, py_repr(*x) + " is not in list");
    return Value::integer(count);
  }
  fail_line(a.line, "'" + py_type_name(self) + "' object has no method " + name);
}

Value bound_method(const Value& self, const std::string& name) {
  return Value::function(name, [self, name](CallArgs& a) { return call_method(self, name, a); });
}

// jinja2's sandboxed environment.getattr: attribute first (methods, namespace fields), then item.
Value get_attr(const Value& obj, const std::string& name, int line) {
  switch (obj.type) {
    case Value::Type::kUndefined: undefined_error(obj, line);
    case Value::Type::kDict: {
      if (is_dict_method(name)) return bound_method(obj, name);
      if (is_unsafe_method(obj, name)) {
        return Value::undefined("access to attribute '" + name + "' of 'dict' object is unsafe.");
      }
      if (const Value* v = dict_find(*obj.dict, Value::str(name))) return *v;
      return no_attribute(obj, name);
    }
    case Value::Type::kString:
      if (is_str_method(name)) return bound_method(obj, name);
      return no_attribute(obj, name);
    case Value::Type::kList:
      if (!obj.generator && (name == "index" || name == "count" || (name == "copy" && !obj.tuple))) {
        return bound_method(obj, name);
      }
      if (is_unsafe_method(obj, name)) {
        return Value::undefined("access to attribute '" + name + "' of 'list' object is unsafe.");
      }
      return no_attribute(obj, name);
    case Value::Type::kObject:
      if (const Value* v = obj.obj->find(name)) return *v;
      return no_attribute(obj, name);
    default: return no_attribute(obj, name);
  }
}

// jinja2's environment.getitem: item first, then attribute for string keys.
Value get_item(const Value& obj, const Value& key, int line) {
  switch (obj.type) {
    case Value::Type::kUndefined: undefined_error(obj, line);
    case Value::Type::kList:
    case Value::Type::kString: {
      if (key.is_int_like() && !(obj.is_list() && obj.generator)) {
        int64_t idx = key.i;
        if (obj.is_list()) {
          const int64_t n = static_cast<int64_t>(obj.list->size());
          if (idx < 0) idx += n;
          if (idx >= 0 && idx < n) return (*obj.list)[idx];
        } else {
          const std::u32string u = to_u32(obj.s);
          const int64_t n = static_cast<int64_t>(u.size());
          if (idx < 0) idx += n;
          if (idx >= 0 && idx < n) {
            Value c = Value::str(from_u32(std::u32string_view(u).substr(idx, 1)));
            c.markup = obj.markup;
            return c;
          }
        }
        return Value::undefined(object_desc(obj) + " has no element " + std::to_string(key.i));
      }
      break;
    }
    case Value::Type::kDict:
      if (const Value* v = dict_find(*obj.dict, key)) return *v;
      break;
    default: break;
  }
  if (key.is_string()) return get_attr(obj, key.s, line);
  return Value::undefined(object_desc(obj) + " has no element " + py_repr(key));
}

// Slices bypass jinja2's forgiving getitem (they compile to a plain Python subscript), so every
// misuse is an error rather than undefined.
Value get_slice(const Value& obj, const Value& start, const Value& stop, const Value& step, int line) {
  if (obj.is_undefined()) undefined_error(obj, line);
  if (!(obj.is_string() || (obj.is_list() && !obj.generator))) {
    fail_line(line, "'" + py_type_name(obj) + "' object is not subscriptable");
  }
  auto bound = [&](const Value& v) -> std::optional<int64_t> {
    if ((v.is_undefined() && v.s == "<absent>") || v.is_none()) return std::nullopt;
    if (!v.is_int_like()) fail_line(line, "slice indices must be integers or None or have an __index__ method");
    return v.i;
  };
  const auto a = bound(start), b = bound(stop), c = bound(step);
  if (c && *c == 0) fail_line(line, "slice step cannot be zero");
  if (obj.is_list()) {
    ValueList out;
    for (int64_t k : slice_positions(static_cast<int64_t>(obj.list->size()), a, b, c.value_or(1))) out.push_back((*obj.list)[k]);
    return Value::make_list(std::move(out), obj.tuple);
  }
  const std::u32string u = to_u32(obj.s);
  std::u32string out;
  for (int64_t k : slice_positions(static_cast<int64_t>(u.size()), a, b, c.value_or(1))) out += u[k];
  Value r = Value::str(from_u32(out));
  r.markup = obj.markup;
  return r;
}

// Python ints are unbounded; ours are 64-bit and fail loudly instead of wrapping.
template <typename Op>
int64_t checked(Op op, int64_t a, int64_t b, int line) {
  int64_t r = 0;
  if (op(a, b, &r)) fail_line(line, "integer overflow: template integers are limited to 64 bits");
  return r;
}
bool add_ovf(int64_t a, int64_t b, int64_t* r) { return __builtin_add_overflow(a, b, r); }
bool sub_ovf(int64_t a, int64_t b, int64_t* r) { return __builtin_sub_overflow(a, b, r); }
bool mul_ovf(int64_t a, int64_t b, int64_t* r) { return __builtin_mul_overflow(a, b, r); }

int64_t float_to_int(double f, int line) {
  if (std::isinf(f)) fail_line(line, "cannot convert float infinity to integer");
  if (!(std::fabs(f) < 9.2233720368547758e18)) fail_line(line, "integer overflow: template integers are limited to 64 bits");
  return static_cast<int64_t>(std::trunc(f));
}

Value binary_op(const std::string& op, const Value& a, const Value& b, int line) {
  if (op == "~") return Value::str(py_str(a) + py_str(b));
  if (op == "%" && a.is_string()) {
    std::string text = py_percent_format(a.s, b, line, a.markup);
    return a.markup ? Value::markup_str(std::move(text)) : Value::str(std::move(text));
  }
  if (a.is_undefined()) undefined_error(a, line);
  if (b.is_undefined()) undefined_error(b, line);
  const bool ints = a.is_int_like() && b.is_int_like();
  const bool nums = a.is_number() && b.is_number();
  auto unsupported = [&]() {
    fail_line(line, "unsupported operand type(s) for " + op + ": '" + py_type_name(a) + "' and '" +
                        py_type_name(b) + "'");
  };
  if (op == "+") {
    if (ints) return Value::integer(checked(add_ovf, a.i, b.i, line));
    if (nums) return Value::real(a.as_double() + b.as_double());
    if (a.is_string() && b.is_string()) {
      if (!a.markup && !b.markup) return Value::str(a.s + b.s);
      return Value::markup_str((a.markup ? a.s : html_escape(a.s)) + (b.markup ? b.s : html_escape(b.s)));
    }
    if (a.is_string()) fail_line(line, "can only concatenate str (not \"" + py_type_name(b) + "\") to str");
    if (a.is_list() && b.is_list() && !a.generator && !b.generator && a.tuple == b.tuple) {
      ValueList out = *a.list;
      out.insert(out.end(), b.list->begin(), b.list->end());
      return Value::make_list(std::move(out), a.tuple);
    }
    if (a.is_list() && !a.generator && b.is_list()) {
      fail_line(line, "can only concatenate " + py_type_name(a) + " (not \"" + py_type_name(b) + "\") to " + py_type_name(a));
    }
    unsupported();
  }
  if (op == "-") {
    if (ints) return Value::integer(checked(sub_ovf, a.i, b.i, line));
    if (nums) return Value::real(a.as_double() - b.as_double());
    unsupported();
  }
  if (op == "*") {
    if (ints) return Value::integer(checked(mul_ovf, a.i, b.i, line));
    if (nums) return Value::real(a.as_double() * b.as_double());
    const Value* seq = a.is_int_like() ? &b : &a;
    const Value* times = a.is_int_like() ? &a : &b;
    if (times->is_int_like() && (seq->is_string() || (seq->is_list() && !seq->generator))) {
      // Bytes per repetition: list items are copied, strings among them deeply.
      int64_t unit = seq->is_string() ? static_cast<int64_t>(seq->s.size()) : 0;
      if (seq->is_list()) {
        for (const auto& x : *seq->list) unit += static_cast<int64_t>(sizeof(Value) + (x.is_string() ? x.s.size() : 0));
      }
      if (times->i > 0 && unit > 0 && times->i > (int64_t{1} << 26) / unit) {
        fail_line(line, "repetition result too large");
      }
      if (seq->is_string()) {
        // By doubling: a byte-at-a-time loop took seconds for 64 MiB under the sanitizers.
        std::string out;
        const size_t total = times->i > 0 ? seq->s.size() * static_cast<size_t>(times->i) : 0;
        out.reserve(total);
        if (total > 0) out = seq->s;
        while (out.size() < total) out.append(out, 0, std::min(out.size(), total - out.size()));
        return seq->markup ? Value::markup_str(out) : Value::str(out);
      }
      ValueList out;
      for (int64_t k = 0; k < times->i; ++k) out.insert(out.end(), seq->list->begin(), seq->list->end());
      return Value::make_list(std::move(out), seq->tuple);
    }
    if (seq->is_string() || seq->is_list()) {
      fail_line(line, "can't multiply sequence by non-int of type '" + py_type_name(*times) + "'");
    }
    unsupported();
  }
  if (op == "/") {
    if (!nums) unsupported();
    if (b.as_double() == 0) fail_line(line, "division by zero");
    return Value::real(a.as_double() / b.as_double());
  }
  if (op == "//" || op == "%") {
    if (!nums) unsupported();
    if (ints) {
      if (b.i == 0) fail_line(line, "integer division or modulo by zero");
      int64_t q = a.i / b.i, r = a.i % b.i;
      if (r != 0 && ((r < 0) != (b.i < 0))) {
        --q;
        r += b.i;
      }
      return Value::integer(op == "//" ? q : r);
    }
    const double x = a.as_double(), y = b.as_double();
    if (y == 0) fail_line(line, op == "//" ? "float floor division by zero" : "float modulo");
    // CPython's float divmod.
    double mod = std::fmod(x, y);
    double div = (x - mod) / y;
    if (mod != 0) {
      if ((y < 0) != (mod < 0)) {
        mod += y;
        div -= 1.0;
      }
    } else {
      mod = std::copysign(0.0, y);
    }
    if (op == "%") return Value::real(mod);
    double fd;
    if (div != 0) {
      fd = std::floor(div);
      if (div - fd > 0.5) fd += 1.0;
    } else {
      fd = std::copysign(0.0, x / y);
    }
    return Value::real(fd);
  }
  if (op == "**") {
    if (ints && b.i >= 0) {
      int64_t r = 1, base = a.i;
      for (int64_t e = b.i; e > 0; e >>= 1) {  // square-and-multiply; stops at the first overflow
        if (e & 1) r = checked(mul_ovf, r, base, line);
        if (e > 1) base = checked(mul_ovf, base, base, line);
      }
      return Value::integer(r);
    }
    if (nums) return Value::real(std::pow(a.as_double(), b.as_double()));
    unsupported();
  }
  fail_line(line, "unknown operator " + op);
}

// Python's round(x, ndigits): correctly rounded, ties to even (printf rounds the exact binary
// value the same way).
Value py_round(const Value& v, int64_t precision, int line) {
  if (v.is_int_like()) {
    if (precision >= 0) return Value::integer(v.i);
    int64_t p = 1;
    for (int64_t k = 0; k < -precision; ++k) p *= 10;
    const double r = std::nearbyint(static_cast<double>(v.i) / static_cast<double>(p));
    return Value::integer(static_cast<int64_t>(r) * p);
  }
  if (v.type != Value::Type::kFloat) fail_line(line, "type " + py_type_name(v) + " doesn't define __round__ method");
  if (!std::isfinite(v.f)) return v;
  if (precision < 0) {
    const double p = std::pow(10.0, static_cast<double>(-precision));
    return Value::real(std::nearbyint(v.f / p) * p);
  }
  char buf[512];
  std::snprintf(buf, sizeof buf, "%.*f", static_cast<int>(std::min<int64_t>(precision, 300)), v.f);
  return Value::real(std::strtod(buf, nullptr));
}

// make_attrgetter: "a.b.0" looked up item by item; "0" parts are integers.
Value attr_path(const Value& item, const Value& attribute, const Value* def, int line) {
  std::vector<Value> parts;
  if (attribute.is_string()) {
    size_t start = 0;
    while (true) {
      const size_t dot = attribute.s.find('.', start);
      std::string part = attribute.s.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      const bool digits = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); });
      int64_t index = 0;
      const bool in_range = digits && std::from_chars(part.data(), part.data() + part.size(), index).ec == std::errc();
      if (digits && !in_range) fail_line(line, "integer too large: " + part);
      parts.push_back(digits ? Value::integer(index) : Value::str(part));
      if (dot == std::string::npos) break;
      start = dot + 1;
    }
  } else {
    parts.push_back(attribute);
  }
  Value v = item;
  for (const auto& p : parts) {
    v = get_item(v, p, line);
    if (def && !def->is_none() && v.is_undefined()) v = *def;
  }
  return v;
}

std::string strftime_now(const std::string& fmt) {
  const auto now = std::chrono::system_clock::now();
  const std::time_t t = std::chrono::system_clock::to_time_t(now);
  const auto micros = std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch()).count() % 1000000;
  std::tm tm{};
  localtime_r(&t, &tm);
  // datetime.strftime handles %f, %z and %Z itself (a naive datetime has no zone).
  std::string f;
  for (size_t k = 0; k < fmt.size(); ++k) {
    if (fmt[k] == '%' && k + 1 < fmt.size()) {
      const char c = fmt[k + 1];
      if (c == 'f') {
        char b[16];
        std::snprintf(b, sizeof b, "%06lld", static_cast<long long>(micros));
        f += b;
      } else if (c == 'z' || c == 'Z') {
      } else {
        f += fmt.substr(k, 2);
      }
      ++k;
    } else {
      f += fmt[k];
    }
  }
  if (f.empty()) return "";
  std::vector<char> buf(256 + f.size() * 16);
  const size_t n = std::strftime(buf.data(), buf.size(), f.c_str(), &tm);
  return std::string(buf.data(), n);
}

// ---------------------------------------------------------------------------------- scoping
// jinja2 resolves names at compile time (idtracking.py): each frame (the template, a for body,
// a macro...) gives every name it mentions a load action at frame entry: parameter, resolve from
// the context, alias of the enclosing frame's variable, or undefined. The evaluator here looks
// names up dynamically through nested scopes, which agrees with all of that except "undefined":
// a name whose first mention in a frame is an assignment (outside if-branches) and that no
// enclosing frame knows starts undefined, even if the context has it, e.g. a for body that reads
// `x` before a later top-level {% set x %}. This pass finds those names per frame so the
// evaluator can bind them to undefined when it enters the frame.
class Symbols {
 public:
  explicit Symbols(const Symbols* parent) : parent_(parent) {}

  bool find(const std::string& n) const {
    for (const Symbols* s = this; s; s = s->parent_) {
      if (s->refs_.count(n)) return true;
    }
    return false;
  }
  void load(const std::string& n) {
    if (!find(n)) refs_[n] = Load::kResolve;
  }
  void store(const std::string& n) {
    stores_.insert(n);
    if (!refs_.count(n)) refs_[n] = (parent_ && parent_->find(n)) ? Load::kAlias : Load::kUndefined;
  }
  void param(const std::string& n) {
    stores_.insert(n);
    refs_[n] = Load::kParam;
  }
  // Merges the symbols of if/elif/else branches: a name assigned in some branch resolves from
  // the context (or aliases the enclosing frame) instead of starting undefined.
  void branch_update(const std::vector<const Symbols*>& branches) {
    std::set<std::string> stored;
    for (const Symbols* b : branches) stored.insert(b->stores_.begin(), b->stores_.end());
    for (const auto& n : stores_) stored.erase(n);
    for (const Symbols* b : branches) {
      for (const auto& [n, l] : b->refs_) refs_[n] = l;
      stores_.insert(b->stores_.begin(), b->stores_.end());
    }
    for (const auto& n : stored) refs_[n] = (parent_ && parent_->find(n)) ? Load::kAlias : Load::kResolve;
  }
  std::vector<std::string> undefined_names() const {
    std::vector<std::string> out;
    for (const auto& [n, l] : refs_) {
      if (l == Load::kUndefined) out.push_back(n);
    }
    return out;
  }

 private:
  enum class Load { kParam, kResolve, kAlias, kUndefined };
  const Symbols* parent_;
  std::map<std::string, Load> refs_;
  std::set<std::string> stores_;
};

void sym_expr(const Expr* e, Symbols& s) {
  if (!e) return;
  if (e->kind == EK::kName) {
    s.load(e->name);
    return;
  }
  sym_expr(e->a.get(), s);
  sym_expr(e->b.get(), s);
  sym_expr(e->c.get(), s);
  for (const auto& x : e->args) sym_expr(x.get(), s);
  for (const auto& kv : e->kwargs) sym_expr(kv.second.get(), s);
}

void sym_stmt(const Stmt& st, Symbols& s);
void sym_body(const Body& body, Symbols& s) {
  for (const auto& st : body) sym_stmt(*st, s);
}

void sym_targets(const Stmt& st, Symbols& s) {
  if (!st.text.empty()) {
    s.load(st.targets[0]);  // {% set ns.attr = ... %} reads ns
  } else {
    for (const auto& n : st.targets) s.store(n);
  }
}

// What a frame sees of one statement at its own level (jinja2's FrameSymbolVisitor): nested
// frames contribute only the expressions evaluated in the enclosing frame.
void sym_stmt(const Stmt& st, Symbols& s) {
  switch (st.kind) {
    case SK::kPrint: sym_expr(st.expr.get(), s); break;
    case SK::kIf: {
      sym_expr(st.branches[0].first.get(), s);
      Symbols body = s;
      sym_body(st.branches[0].second, body);
      Symbols elifs = s;
      for (size_t k = 1; k < st.branches.size(); ++k) {
        sym_expr(st.branches[k].first.get(), elifs);
        Symbols b = elifs;
        sym_body(st.branches[k].second, b);
        elifs.branch_update({&b});
      }
      Symbols els = s;
      sym_body(st.else_body, els);
      s.branch_update({&body, &elifs, &els});
      break;
    }
    case SK::kFor: sym_expr(st.expr.get(), s); break;
    case SK::kSet:
      sym_expr(st.expr.get(), s);
      sym_targets(st, s);
      break;
    case SK::kSetBlock: sym_targets(st, s); break;
    case SK::kMacro: s.store(st.text); break;
    case SK::kFilterBlock: sym_expr(st.expr.get(), s); break;
    case SK::kScope:
      for (const auto& p : st.params) sym_expr(p.second.get(), s);
      break;
    default: break;
  }
}

void analyze_frames_in(Body& body, const Symbols& frame);

// Analyzes the frames that `st` opens, as children of `frame`.
void analyze_stmt_frames(Stmt& st, const Symbols& frame) {
  switch (st.kind) {
    case SK::kIf:
      for (auto& br : st.branches) analyze_frames_in(br.second, frame);
      analyze_frames_in(st.else_body, frame);
      return;
    case SK::kFor: {
      Symbols body(&frame);
      body.param("loop");
      for (const auto& n : st.targets) body.param(n);
      sym_body(st.body, body);
      st.undef = body.undefined_names();
      analyze_frames_in(st.body, body);
      Symbols els(&frame);
      sym_body(st.else_body, els);
      st.undef_else = els.undefined_names();
      analyze_frames_in(st.else_body, els);
      return;
    }
    case SK::kMacro:
    case SK::kScope:
    case SK::kSetBlock:
    case SK::kFilterBlock: {
      Symbols inner(&frame);
      for (const auto& p : st.params) inner.param(p.first);
      if (st.kind == SK::kMacro) {
        for (const auto& p : st.params) sym_expr(p.second.get(), inner);
      }
      sym_body(st.body, inner);
      if (st.kind == SK::kFilterBlock) sym_expr(st.expr.get(), inner);
      st.undef = inner.undefined_names();
      analyze_frames_in(st.body, inner);
      return;
    }
    default: return;
  }
}

void analyze_frames_in(Body& body, const Symbols& frame) {
  for (auto& st : body) analyze_stmt_frames(*st, frame);
}

// Returns the names that start undefined at the top level; fills Stmt::undef / undef_else.
std::vector<std::string> analyze_scopes(Body& body) {
  Symbols root(nullptr);
  sym_body(body, root);
  analyze_frames_in(body, root);
  return root.undefined_names();
}

// ---------------------------------------------------------------------------------- evaluator
struct Scope {
  std::shared_ptr<Scope> parent;
  std::unordered_map<std::string, Value> vars;

  const Value* find(const std::string& name) const {
    for (const Scope* s = this; s; s = s->parent.get()) {
      auto it = s->vars.find(name);
      if (it != s->vars.end()) return &it->second;
    }
    return nullptr;
  }
};
using ScopePtr = std::shared_ptr<Scope>;

ScopePtr child_scope(const ScopePtr& parent) {
  auto s = std::make_shared<Scope>();
  s->parent = parent;
  return s;
}

// Entering a frame: the names analyze_scopes() found start undefined there.
ScopePtr frame_scope(const ScopePtr& parent, const std::vector<std::string>& undef) {
  auto s = child_scope(parent);
  for (const auto& n : undef) s->vars[n] = Value::undefined("'" + n + "' is undefined");
  return s;
}

enum class Flow { kNormal, kBreak, kContinue };

// Walks the AST. Scoping follows jinja2: a for-loop iteration, macro call, {% with %} and
// {% set %}...{% endset %} body get a child scope (so `set` inside a loop does not leak out,
// which is why templates use namespace()); if-blocks do not.
class Interp {
 public:
  ~Interp() {
    // Macros hold their defining scope, which holds the macro: break the cycles.
    for (auto& s : macro_scopes_) s->vars.clear();
  }

  Flow exec(const Body& body, const ScopePtr& scope, std::string& out) {
    for (const auto& st : body) {
      const Flow f = exec_stmt(*st, scope, out);
      if (f != Flow::kNormal) return f;
    }
    return Flow::kNormal;
  }

 private:
  // Bounds the evaluator's recursion (nested blocks, expressions, macro calls) so that a
  // pathological template fails with an error instead of overflowing the stack.
  struct RecursionGuard {
    RecursionGuard(Interp& in, int line) : in_(in) {
      if (++in_.recursion_ > kMaxRecursion) fail_line(line, "maximum recursion depth exceeded");
    }
    ~RecursionGuard() { --in_.recursion_; }
    Interp& in_;
  };

  // Counts one step of the render's kMaxSteps (a statement run or a loop iteration).
  void step(int line) {
    if (++steps_ > kMaxSteps) fail_line(line, "template too expensive (over 1,000,000 steps)");
  }

  Flow exec_stmt(const Stmt& s, const ScopePtr& scope, std::string& out) {
    RecursionGuard guard(*this, s.line);
    step(s.line);
    const Flow f = exec_stmt_unbounded(s, scope, out);
    if (out.size() > kMaxStringBytes) fail_line(s.line, "output too large (over 64 MiB)");
    return f;
  }

  Flow exec_stmt_unbounded(const Stmt& s, const ScopePtr& scope, std::string& out) {
    switch (s.kind) {
      case SK::kText: out += s.text; return Flow::kNormal;
      case SK::kPrint: exec_print(s, scope, out); return Flow::kNormal;
      case SK::kIf:
        for (const auto& [cond, body] : s.branches) {
          if (truthy(eval(*cond, scope))) return exec(body, scope, out);
        }
        return exec(s.else_body, scope, out);
      case SK::kFor: exec_for(s, scope, out); return Flow::kNormal;
      case SK::kSet: exec_set(s, scope); return Flow::kNormal;
      case SK::kMacro: scope->vars[s.text] = make_macro(s, scope); return Flow::kNormal;
      case SK::kBreak: return Flow::kBreak;
      case SK::kContinue: return Flow::kContinue;
      case SK::kSetBlock:
      case SK::kFilterBlock:
      case SK::kScope: exec_block(s, scope, out); return Flow::kNormal;
    }
    return Flow::kNormal;
  }

  [[gnu::noinline]] void exec_block(const Stmt& s, const ScopePtr& scope, std::string& out) {
    auto inner = frame_scope(scope, s.undef);
    if (s.kind == SK::kScope) {
      for (const auto& [name, expr] : s.params) inner->vars[name] = eval(*expr, scope);
      exec(s.body, inner, out);
      return;
    }
    std::string text;
    exec(s.body, inner, text);
    Value v = Value::str(std::move(text));
    if (s.kind == SK::kFilterBlock) {
      out += py_str(eval_with_input(*s.expr, scope, v));
      return;
    }
    if (s.expr) v = eval_with_input(*s.expr, scope, v);
    assign(s, std::move(v), *scope);
  }

  [[gnu::noinline]] void exec_print(const Stmt& s, const ScopePtr& scope, std::string& out) {
    out += py_str(eval(*s.expr, scope));
  }
  [[gnu::noinline]] void exec_set(const Stmt& s, const ScopePtr& scope) { assign(s, eval(*s.expr, scope), *scope); }

  void bind_targets(const Stmt& s, const Value& v, Scope& scope) {
    if (!s.unpack) {
      scope.vars[s.targets[0]] = v;
      return;
    }
    const ValueList items = iterate(v, s.line);
    if (items.size() != s.targets.size()) {
      fail_line(s.line, items.size() > s.targets.size()
                            ? "too many values to unpack (expected " + std::to_string(s.targets.size()) + ")"
                            : "not enough values to unpack (expected " + std::to_string(s.targets.size()) +
                                  ", got " + std::to_string(items.size()) + ")");
    }
    for (size_t k = 0; k < items.size(); ++k) scope.vars[s.targets[k]] = items[k];
  }

  void assign(const Stmt& s, Value v, Scope& scope) {
    if (s.text.empty()) {
      bind_targets(s, v, scope);
      return;
    }
    const Value* ns = scope.find(s.targets[0]);
    if (!ns || ns->type != Value::Type::kObject || !ns->obj->assignable) {
      fail_line(s.line, "cannot assign attribute on non-namespace object");
    }
    ns->obj->set(s.text, std::move(v));
  }

  [[gnu::noinline]] void exec_for(const Stmt& s, const ScopePtr& scope, std::string& out) {
    const Value seq = eval(*s.expr, scope);
    ValueList items = iterate(seq, s.line);
    if (s.cond) {
      ValueList kept;
      for (auto& item : items) {
        step(s.line);
        auto inner = child_scope(scope);
        bind_targets(s, item, *inner);
        if (truthy(eval(*s.cond, inner))) kept.push_back(std::move(item));
      }
      items = std::move(kept);
    }
    if (items.empty()) {
      exec(s.else_body, frame_scope(scope, s.undef_else), out);
      return;
    }
    const auto n = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < n; ++k) {
      step(s.line);
      auto inner = frame_scope(scope, s.undef);
      bind_targets(s, items[k], *inner);
      inner->vars["loop"] = make_loop(items, k);
      if (exec(s.body, inner, out) == Flow::kBreak) break;
    }
  }

  [[gnu::noinline]] static Value make_loop(const ValueList& items, int64_t k) {
    const auto n = static_cast<int64_t>(items.size());
    auto loop = std::make_shared<Object>();
    loop->type_name = "LoopContext";
    loop->attrs = {
          {"index", Value::integer(k + 1)},
          {"index0", Value::integer(k)},
          {"revindex", Value::integer(n - k)},
          {"revindex0", Value::integer(n - k - 1)},
          {"first", Value::boolean(k == 0)},
          {"last", Value::boolean(k == n - 1)},
          {"length", Value::integer(n)},
          {"depth", Value::integer(1)},
          {"depth0", Value::integer(0)},
          {"previtem", k > 0 ? items[k - 1] : Value::undefined("there is no previous item")},
          {"nextitem", k + 1 < n ? items[k + 1] : Value::undefined("there is no next item")},
          {"cycle", Value::function("cycle", [k](CallArgs& a) -> Value {
             if (a.pos.empty()) fail_line(a.line, "no items for cycling given");
             return a.pos[static_cast<size_t>(k) % a.pos.size()];
           })},
      };
    Value lv;
    lv.type = Value::Type::kObject;
    lv.obj = loop;
    return lv;
  }

  Value make_macro(const Stmt& s, const ScopePtr& scope) {
    macro_scopes_.push_back(scope);
    const Stmt* def = &s;
    std::weak_ptr<Scope> weak = scope;
    return Value::function(s.text, [this, def, weak](CallArgs& a) -> Value {
      auto parent = weak.lock();
      if (!parent) fail_line(a.line, "macro '" + def->text + "' called after its scope ended");
      if (a.pos.size() > def->params.size()) {
        fail_line(a.line, "macro '" + def->text + "' takes not more than " + std::to_string(def->params.size()) + " argument(s)");
      }
      if (call_depth_ >= kMaxCallDepth) fail_line(a.line, "maximum recursion depth exceeded in macro '" + def->text + "'");
      ++call_depth_;
      struct Leave {
        int& d;
        ~Leave() { --d; }
      } leave{call_depth_};
      auto inner = frame_scope(parent, def->undef);
      for (const auto& kv : a.kw) {
        const bool known = std::any_of(def->params.begin(), def->params.end(), [&](const auto& p) { return p.first == kv.first; });
        if (!known) fail_line(a.line, "macro '" + def->text + "' takes no keyword argument '" + kv.first + "'");
      }
      for (size_t k = 0; k < def->params.size(); ++k) {
        const auto& [name, default_expr] = def->params[k];
        if (const Value* v = a.get(k, name.c_str())) {
          inner->vars[name] = *v;
        } else if (default_expr) {
          inner->vars[name] = eval(*default_expr, inner);
        } else {
          inner->vars[name] = Value::undefined("parameter '" + name + "' was not provided");
        }
      }
      std::string out;
      exec(def->body, inner, out);
      return Value::str(std::move(out));
    });
  }

  // Evaluates a filter chain whose innermost target is the rendered body of a block.
  Value eval_with_input(const Expr& e, const ScopePtr& scope, const Value& input) {
    const Value* saved = block_input_;
    block_input_ = &input;
    Value v = eval(e, scope);
    block_input_ = saved;
    return v;
  }

  CallArgs eval_args(const Expr& e, const ScopePtr& scope) {
    CallArgs a;
    a.line = e.line;
    for (const auto& x : e.args) a.pos.push_back(eval(*x, scope));
    for (const auto& [k, x] : e.kwargs) a.kw.emplace_back(k, eval(*x, scope));
    return a;
  }

  Value call(const Value& f, CallArgs& a) {
    if (f.type == Value::Type::kFunction) return (*f.fn)(a);
    if (f.is_undefined()) undefined_error(f, a.line);
    fail_line(a.line, "'" + py_type_name(f) + "' object is not callable");
  }

 public:
  Value eval(const Expr& e, const ScopePtr& scope) {
    RecursionGuard guard(*this, e.line);
    switch (e.kind) {
      case EK::kLiteral: return e.value;
      case EK::kName: {
        if (const Value* v = scope->find(e.name)) return *v;
        return Value::undefined("'" + e.name + "' is undefined");
      }
      case EK::kList:
      case EK::kTuple: {
        ValueList items;
        for (const auto& x : e.args) items.push_back(eval(*x, scope));
        return Value::make_list(std::move(items), e.kind == EK::kTuple);
      }
      case EK::kDict: {
        ValueDict d;
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          Value key = eval(*e.args[k], scope);
          require_hashable(key, e.line);
          dict_set(d, std::move(key), eval(*e.args[k + 1], scope));
        }
        return Value::make_dict(std::move(d));
      }
      case EK::kAttr: return get_attr(eval(*e.a, scope), e.name, e.line);
      case EK::kItem: {
        const Value obj = eval(*e.a, scope);
        if (e.b->kind == EK::kSlice) {
          const Expr& sl = *e.b;
          const Value absent = Value::undefined("<absent>");
          return get_slice(obj, sl.a ? eval(*sl.a, scope) : absent, sl.b ? eval(*sl.b, scope) : absent,
                           sl.c ? eval(*sl.c, scope) : absent, e.line);
        }
        return get_item(obj, eval(*e.b, scope), e.line);
      }
      case EK::kSlice: fail_line(e.line, "slice outside a subscript");
      case EK::kUnary: {
        const Value v = eval(*e.a, scope);
        if (e.name == "not") return Value::boolean(!truthy(v));
        if (v.is_undefined()) undefined_error(v, e.line);
        if (v.is_int_like()) return Value::integer(e.name == "-" ? -v.i : v.i);
        if (v.type == Value::Type::kFloat) return Value::real(e.name == "-" ? -v.f : v.f);
        fail_line(e.line, "bad operand type for unary " + e.name + ": '" + py_type_name(v) + "'");
      }
      case EK::kBinary: return binary_op(e.name, eval(*e.a, scope), eval(*e.b, scope), e.line);
      case EK::kAnd: {
        Value l = eval(*e.a, scope);
        return truthy(l) ? eval(*e.b, scope) : l;
      }
      case EK::kOr: {
        Value l = eval(*e.a, scope);
        return truthy(l) ? l : eval(*e.b, scope);
      }
      case EK::kCompare: {
        Value left = eval(*e.a, scope);
        for (size_t k = 0; k < e.ops.size(); ++k) {
          Value right = eval(*e.args[k], scope);
          if (!compare(e.ops[k], left, right, e.line)) return Value::boolean(false);
          left = std::move(right);
        }
        return Value::boolean(true);
      }
      case EK::kCond: {
        if (truthy(eval(*e.b, scope))) return eval(*e.a, scope);
        if (e.c) return eval(*e.c, scope);
        return Value::undefined("the inline if-expression on line " + std::to_string(e.line) +
                                " evaluated to false and no else section was defined.");
      }
      case EK::kCall: {
        const Value f = eval(*e.a, scope);
        CallArgs a = eval_args(e, scope);
        return call(f, a);
      }
      case EK::kFilter: {
        Value target = e.a ? eval(*e.a, scope) : (block_input_ ? *block_input_ : Value());
        CallArgs a = eval_args(e, scope);
        return apply_filter(e.name, target, a);
      }
      case EK::kTest: {
        const Value target = eval(*e.a, scope);
        CallArgs a = eval_args(e, scope);
        return Value::boolean(apply_test(e.name, target, a) != e.negated);
      }
    }
    fail_line(e.line, "bad expression");
  }

 private:
  bool apply_test(const std::string& name, const Value& v, CallArgs& a) {
    const int line = a.line;
    static const char* kNoArgs[] = {"defined", "undefined", "none", "boolean", "false", "true", "integer",
                                    "float", "number", "string", "mapping", "iterable", "sequence", "callable",
                                    "escaped", "lower", "upper", "odd", "even", "filter", "test"};
    const size_t given = a.pos.size() + a.kw.size();
    const bool no_args = std::find(std::begin(kNoArgs), std::end(kNoArgs), name) != std::end(kNoArgs);
    if ((no_args && given > 0) || given > 1) {
      fail_line(line, "test_" + name + "() takes " + (no_args ? "1" : "2") + " positional arguments but " +
                          std::to_string(given + 1) + " were given");
    }
    auto arg0 = [&]() -> Value {
      const Value* x = a.get(0, "other");
      if (!x) fail_line(line, "test '" + name + "' needs an argument");
      return *x;
    };
    if (name == "defined") return !v.is_undefined();
    if (name == "undefined") return v.is_undefined();
    if (name == "none") return v.is_none();
    if (name == "boolean") return v.is_bool();
    if (name == "true") return v.is_bool() && v.i == 1;
    if (name == "false") return v.is_bool() && v.i == 0;
    if (name == "integer") return v.type == Value::Type::kInt;
    if (name == "float") return v.type == Value::Type::kFloat;
    if (name == "number") return v.is_number();
    if (name == "string") return v.is_string();
    if (name == "mapping") return v.is_dict();
    if (name == "iterable") return v.is_list() || v.is_dict() || v.is_string() || v.is_undefined();
    if (name == "sequence") return (v.is_list() && !v.generator) || v.is_dict() || v.is_string() || v.is_undefined();
    if (name == "callable") {
      return v.type == Value::Type::kFunction || v.is_undefined() ||
             (v.type == Value::Type::kObject && v.obj->type_name == "LoopContext");
    }
    if (name == "escaped") return v.markup;
    if (name == "odd" || name == "even" || name == "divisibleby") {
      const Value d = name == "divisibleby" ? a.get_or(0, "num", Value()) : Value::integer(2);
      const Value r = binary_op("%", v, d, line);
      return py_equal(r, Value::integer(name == "odd" ? 1 : 0));
    }
    if (name == "sameas") {
      const Value o = arg0();
      if (v.type != o.type) return false;
      if (v.is_list()) return v.list == o.list;
      if (v.is_dict()) return v.dict == o.dict;
      if (v.type == Value::Type::kObject) return v.obj == o.obj;
      if (v.type == Value::Type::kFunction) return v.fn == o.fn;
      return py_equal(v, o);
    }
    if (name == "in") return contains(a.get_or(0, "seq", Value()), v, line);
    if (name == "==" || name == "eq" || name == "equalto") return compare("==", v, arg0(), line);
    if (name == "!=" || name == "ne") return compare("!=", v, arg0(), line);
    if (name == ">" || name == "gt" || name == "greaterthan") return compare(">", v, arg0(), line);
    if (name == ">=" || name == "ge") return compare(">=", v, arg0(), line);
    if (name == "<" || name == "lt" || name == "lessthan") return compare("<", v, arg0(), line);
    if (name == "<=" || name == "le") return compare("<=", v, arg0(), line);
    if (name == "lower" || name == "upper") {
      CallArgs none;
      none.line = line;
      return truthy(call_str_method(py_str(v), name == "lower" ? "islower" : "isupper", none));
    }
    if (name == "filter") return v.is_string() && is_jinja_filter(v.s);
    if (name == "test") return v.is_string() && is_jinja_test(v.s);
    fail_line(line, "No test named '" + name + "'.");
  }

  // Splits `args` for map/select: leading positional arguments become the name, the rest is
  // passed on.
  static CallArgs rest_args(const CallArgs& a, size_t skip) {
    CallArgs r;
    r.line = a.line;
    for (size_t k = skip; k < a.pos.size(); ++k) r.pos.push_back(a.pos[k]);
    r.kw = a.kw;
    return r;
  }

  Value sort_key(const Value& item, const Value& attribute, bool case_sensitive, int line) {
    Value k = attribute.is_none() ? item : attr_path(item, attribute, nullptr, line);
    if (!case_sensitive && k.is_string()) k = Value::str(lower_str(k.s));
    return k;
  }

  Value apply_filter(const std::string& name, const Value& v, CallArgs& a) {
    const int line = a.line;
    auto str_of = [&](const char* kw, size_t idx, const char* def) {
      return py_str(a.get_or(idx, kw, Value::str(def)));
    };
    if (name == "length" || name == "count") return Value::integer(py_len(v, line));
    if (name == "default" || name == "d") {
      const bool boolean = truthy(a.get_or(1, "boolean", Value::boolean(false)));
      if (v.is_undefined() || (boolean && !truthy(v))) return a.get_or(0, "default_value", Value::str(""));
      return v;
    }
    // These filters call a str method on soft_str(value), so a Markup input gives a Markup.
    auto like_input = [&](std::string text) { return v.markup ? Value::markup_str(std::move(text)) : Value::str(std::move(text)); };
    if (name == "trim") {
      const Value chars = a.get_or(0, "chars", Value::none());
      std::u32string cs;
      if (!chars.is_none()) cs = to_u32(v.markup ? html_escape(py_str(chars)) : py_str(chars));
      return like_input(py_strip(py_str(v), chars.is_none() ? nullptr : &cs, true, true));
    }
    if (name == "upper") return like_input(upper_str(py_str(v)));
    if (name == "lower") return like_input(lower_str(py_str(v)));
    if (name == "capitalize") return like_input(capitalize_str(py_str(v)));
    if (name == "title") {
      // jinja2's own title: words start after spaces and -({[<, the rest is lowered.
      const std::u32string u = to_u32(py_str(v));
      std::u32string out;
      bool start = true;
      for (char32_t c : u) {
        const bool sep = is_py_space(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
        out += sep ? c : (start ? to_upper_cp(c) : to_lower_cp(c));
        start = sep;
      }
      return Value::str(from_u32(out));
    }
    if (name == "safe") return v.markup ? v : Value::markup_str(py_str(v));
    if (name == "string") return v.is_string() ? v : Value::str(py_str(v));
    if (name == "escape" || name == "e") return v.markup ? v : Value::markup_str(html_escape(py_str(v)));
    if (name == "forceescape") return Value::markup_str(html_escape(py_str(v)));
    if (name == "tojson") {
      JsonOptions o;
      o.ensure_ascii = truthy(a.get_or(0, "ensure_ascii", Value::boolean(false)));
      const Value indent = a.get_or(1, "indent", Value::none());
      if (indent.is_int_like()) {
        o.indent = std::string(static_cast<size_t>(std::max<int64_t>(0, indent.i)), ' ');
      } else if (indent.is_string()) {
        o.indent = indent.s;
      } else if (!indent.is_none()) {
        fail_line(line, "tojson: indent must be an int or a string");
      }
      const Value seps = a.get_or(2, "separators", Value::none());
      if (seps.is_list() && seps.list->size() == 2) {
        o.item_sep = py_str((*seps.list)[0]);
        o.key_sep = py_str((*seps.list)[1]);
      } else if (!seps.is_none()) {
        fail_line(line, "tojson: separators must be a pair of strings");
      } else if (o.indent) {
        o.item_sep = ",";
      }
      o.sort_keys = truthy(a.get_or(3, "sort_keys", Value::boolean(false)));
      std::string out;
      json_dump(v, o, 0, out, line);
      return Value::str(out);
    }
    if (name == "first") {
      const ValueList items = iterate(v, line);
      return items.empty() ? Value::undefined("No first item, sequence was empty.") : items.front();
    }
    if (name == "last") {
      if (v.is_list() && v.generator) fail_line(line, "'generator' object is not reversible");
      const ValueList items = iterate(v, line);
      return items.empty() ? Value::undefined("No last item, sequence was empty.") : items.back();
    }
    if (name == "join") {
      const std::string sep = str_of("d", 0, "");
      const Value attribute = a.get_or(1, "attribute", Value::none());
      std::string out;
      bool first = true;
      for (const auto& x : iterate(v, line)) {
        if (!first) append_bounded(out, sep);
        first = false;
        append_bounded(out, py_str(attribute.is_none() ? x : attr_path(x, attribute, nullptr, line)));
      }
      return Value::str(out);
    }
    if (name == "list") return Value::make_list(iterate(v, line));
    if (name == "replace") {
      const Value count = a.get_or(2, "count", Value::none());
      return Value::str(py_replace(py_str(v), str_of("old", 0, ""), str_of("new", 1, ""),
                                   count.is_none() ? -1 : to_index_arg(count, line, "count")));
    }
    if (name == "int") {
      const Value def = a.get_or(0, "default", Value::integer(0));
      const Value base = a.get_or(1, "base", Value::integer(10));
      if (v.is_undefined()) undefined_error(v, line);
      if (v.is_int_like()) return Value::integer(v.i);
      if (v.type == Value::Type::kFloat) {
        if (std::isnan(v.f)) return def;
        return Value::integer(float_to_int(v.f, line));
      }
      if (v.is_string()) {
        if (auto i = py_parse_int(v.s, static_cast<int>(base.i))) return Value::integer(*i);
        if (auto f = py_parse_float(v.s)) {
          if (std::isnan(*f)) return def;
          return Value::integer(float_to_int(*f, line));
        }
      }
      return def;
    }
    if (name == "float") {
      const Value def = a.get_or(0, "default", Value::real(0.0));
      if (v.is_undefined()) undefined_error(v, line);
      if (v.is_number()) return Value::real(v.as_double());
      if (v.is_string()) {
        if (auto f = py_parse_float(v.s)) return Value::real(*f);
      }
      return def;
    }
    if (name == "abs") {
      if (v.is_int_like()) return Value::integer(std::abs(v.i));
      if (v.type == Value::Type::kFloat) return Value::real(std::fabs(v.f));
      fail_line(line, "bad operand type for abs(): '" + py_type_name(v) + "'");
    }
    if (name == "round") {
      const int64_t precision = to_index_arg(a.get_or(0, "precision", Value::integer(0)), line, "precision");
      const std::string method = str_of("method", 1, "common");
      if (method == "common") return py_round(v, precision, line);
      if (method != "ceil" && method != "floor") fail_line(line, "method must be common, ceil or floor");
      if (!v.is_number()) fail_line(line, "must be real number, not " + py_type_name(v));
      const double p = std::pow(10.0, static_cast<double>(precision));
      const double x = v.as_double() * p;
      return Value::real((method == "ceil" ? std::ceil(x) : std::floor(x)) / p);
    }
    if (name == "items") {
      if (v.is_undefined()) return generator({});
      if (!v.is_dict()) fail_line(line, "Can only get item pairs from a mapping.");
      ValueList out;
      for (const auto& [k, x] : *v.dict) out.push_back(Value::make_list({k, x}, true));
      return generator(std::move(out));
    }
    // map and select/reject are generators that skip a false input (None, empty) entirely.
    if ((name == "map" || name == "select" || name == "reject" || name == "selectattr" ||
         name == "rejectattr") && !truthy(v)) {
      return generator({});
    }
    if (name == "map") {
      ValueList out;
      if (a.pos.empty() && a.get(0, "attribute")) {
        const Value attribute = *a.get(0, "attribute");
        const Value def = a.get_or(99, "default", Value::none());
        for (const auto& x : iterate(v, line)) out.push_back(attr_path(x, attribute, &def, line));
      } else {
        if (a.pos.empty()) fail_line(line, "map requires a filter argument");
        const std::string filter = py_str(a.pos[0]);
        if (!is_jinja_filter(filter)) fail_line(line, "No filter named '" + filter + "'.");
        for (const auto& x : iterate(v, line)) {
          CallArgs rest = rest_args(a, 1);
          out.push_back(apply_filter(filter, x, rest));
        }
      }
      return generator(std::move(out));
    }
    if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
      const bool by_attr = name == "selectattr" || name == "rejectattr";
      const bool want = name == "select" || name == "selectattr";
      const size_t off = by_attr ? 1 : 0;
      if (by_attr && a.pos.empty()) fail_line(line, "Missing parameter for attribute name");
      ValueList out;
      for (const auto& x : iterate(v, line)) {
        const Value t = by_attr ? attr_path(x, a.pos[0], nullptr, line) : x;
        bool ok;
        if (a.pos.size() > off) {
          const std::string test = py_str(a.pos[off]);
          CallArgs rest = rest_args(a, off + 1);
          ok = apply_test(test, t, rest);
        } else {
          ok = truthy(t);
        }
        if (ok == want) out.push_back(x);
      }
      return generator(std::move(out));
    }
    if (name == "reverse") {
      if (v.is_string()) {
        std::u32string u = to_u32(v.s);
        std::reverse(u.begin(), u.end());
        return Value::str(from_u32(u));
      }
      ValueList items = iterate(v, line);
      std::reverse(items.begin(), items.end());
      if (v.is_list() && v.generator) return Value::make_list(std::move(items));
      return generator(std::move(items));
    }
    if (name == "sort" || name == "unique" || name == "min" || name == "max" || name == "dictsort") {
      const bool is_sort = name == "sort";
      const size_t cs_idx = is_sort ? 1 : 0;
      const bool case_sensitive = truthy(a.get_or(cs_idx, "case_sensitive", Value::boolean(false)));
      if (name == "dictsort") {
        if (!v.is_dict()) fail_line(line, "dictsort: a mapping is required");
        const std::string by = str_of("by", 1, "key");
        if (by != "key" && by != "value") fail_line(line, "You can only sort by either \"key\" or \"value\"");
        const bool rev = truthy(a.get_or(2, "reverse", Value::boolean(false)));
        ValueList items;
        for (const auto& [k, x] : *v.dict) items.push_back(Value::make_list({k, x}, true));
        const size_t pos = by == "key" ? 0 : 1;
        std::stable_sort(items.begin(), items.end(), [&](const Value& p, const Value& q) {
          const Value kp = sort_key((*p.list)[pos], Value::none(), case_sensitive, line);
          const Value kq = sort_key((*q.list)[pos], Value::none(), case_sensitive, line);
          return rev ? py_less(kq, kp, line) : py_less(kp, kq, line);
        });
        return Value::make_list(std::move(items));
      }
      const Value attribute = a.get_or(is_sort ? 2 : 1, "attribute", Value::none());
      ValueList items = iterate(v, line);
      if (is_sort) {
        const bool rev = truthy(a.get_or(0, "reverse", Value::boolean(false)));
        std::vector<std::pair<Value, Value>> keyed;
        for (auto& x : items) keyed.emplace_back(sort_key(x, attribute, case_sensitive, line), std::move(x));
        std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& p, const auto& q) {
          return rev ? py_less(q.first, p.first, line) : py_less(p.first, q.first, line);
        });
        ValueList out;
        for (auto& kv : keyed) out.push_back(std::move(kv.second));
        return Value::make_list(std::move(out));
      }
      if (name == "unique") {
        ValueList out, seen;
        for (auto& x : items) {
          const Value k = sort_key(x, attribute, case_sensitive, line);
          require_hashable(k, line);
          if (std::none_of(seen.begin(), seen.end(), [&](const Value& s) { return py_equal(s, k); })) {
            seen.push_back(k);
            out.push_back(std::move(x));
          }
        }
        return generator(std::move(out));
      }
      if (items.empty()) return Value::undefined("No aggregated item, sequence was empty.");
      size_t best = 0;
      Value best_key = sort_key(items[0], attribute, case_sensitive, line);
      for (size_t k = 1; k < items.size(); ++k) {
        const Value key = sort_key(items[k], attribute, case_sensitive, line);
        if (name == "min" ? py_less(key, best_key, line) : py_less(best_key, key, line)) {
          best = k;
          best_key = key;
        }
      }
      return items[best];
    }
    if (name == "sum") {
      const Value attribute = a.get_or(0, "attribute", Value::none());
      Value total = a.get_or(1, "start", Value::integer(0));
      for (const auto& x : iterate(v, line)) {
        total = binary_op("+", total, attribute.is_none() ? x : attr_path(x, attribute, nullptr, line), line);
      }
      return total;
    }
    if (name == "wordcount") {
      const std::u32string u = to_u32(py_str(v));
      int64_t n = 0;
      bool in_word = false;
      for (char32_t c : u) {
        const bool w = is_alpha_cp(c) || is_digit_cp(c) || c == '_';
        if (w && !in_word) ++n;
        in_word = w;
      }
      return Value::integer(n);
    }
    if (name == "center") {
      const int64_t w = to_index_arg(a.get_or(0, "width", Value::integer(80)), line, "width");
      return like_input(pad_str(py_str(v), w, ' ', 0));
    }
    if (name == "indent") {
      if (v.is_undefined()) undefined_error(v, line);
      if (!v.is_string()) fail_line(line, "unsupported operand type(s) for +=: '" + py_type_name(v) + "' and 'str'");
      const Value width = a.get_or(0, "width", Value::integer(4));
      const bool first = truthy(a.get_or(1, "first", Value::boolean(false)));
      const bool blank = truthy(a.get_or(2, "blank", Value::boolean(false)));
      const int64_t n_ind = width.is_string() ? 0 : std::max<int64_t>(0, to_index_arg(width, line, "width"));
      if (n_ind > static_cast<int64_t>(kMaxStringBytes)) fail_too_large();
      const std::string ind = width.is_string() ? width.s : std::string(static_cast<size_t>(n_ind), ' ');
      const std::vector<std::string> lines = py_splitlines(py_str(v) + "\n", false);
      std::string out;
      for (size_t k = 0; k < lines.size(); ++k) {
        if (k) out += "\n";
        if (k == 0 || (!blank && lines[k].empty())) {
          out += lines[k];
        } else {
          append_bounded(out, ind);
          out += lines[k];
        }
      }
      if (first) out = ind + out;
      return like_input(out);
    }
    if (name == "format") {
      if (!a.pos.empty() && !a.kw.empty()) fail_line(line, "can't handle positional and keyword arguments at the same time");
      Value args;
      if (!a.kw.empty()) {
        ValueDict d;
        for (const auto& [k, x] : a.kw) d.emplace_back(Value::str(k), x);
        args = Value::make_dict(std::move(d));
      } else {
        args = Value::make_list(a.pos, true);
      }
      return like_input(py_percent_format(py_str(v), args, line, v.markup));
    }
    if (name == "attr") {
      const std::string attr = str_of("name", 0, "");
      if (v.is_dict() && !is_dict_method(attr)) return no_attribute(v, attr);
      return get_attr(v, attr, line);
    }
    fail_line(line, "the filter '" + name + "' is not supported");
  }

  static constexpr int kMaxCallDepth = 100;
  static constexpr int kMaxRecursion = 1500;
  int recursion_ = 0;
  const Value* block_input_ = nullptr;
  std::vector<ScopePtr> macro_scopes_;
  int call_depth_ = 0;
  int64_t steps_ = 0;  // see step()
};

// ---------------------------------------------------------------------------------- entry
// `path` names the value in errors ("messages[1].content").
Value from_json(const nlohmann::ordered_json& j, const std::string& path) {
  auto checked = [&](const std::string& s, const std::string& where) -> const std::string& {
    if (const auto bad = utf8_invalid_at(s)) {
      fail("chat template: ", where, ": invalid UTF-8 at byte ", *bad);
    }
    return s;
  };
  switch (j.type()) {
    case nlohmann::json::value_t::null: return Value::none();
    case nlohmann::json::value_t::boolean: return Value::boolean(j.get<bool>());
    case nlohmann::json::value_t::number_integer: return Value::integer(j.get<int64_t>());
    case nlohmann::json::value_t::number_unsigned: {
      const auto u = j.get<uint64_t>();
      if (u > static_cast<uint64_t>(INT64_MAX)) return Value::real(static_cast<double>(u));
      return Value::integer(static_cast<int64_t>(u));
    }
    case nlohmann::json::value_t::number_float: return Value::real(j.get<double>());
    case nlohmann::json::value_t::string:
      return Value::str(checked(j.get_ref<const std::string&>(), path));
    case nlohmann::json::value_t::array: {
      ValueList items;
      for (size_t i = 0; i < j.size(); ++i) {
        items.push_back(from_json(j[i], path + "[" + std::to_string(i) + "]"));
      }
      return Value::make_list(std::move(items));
    }
    case nlohmann::json::value_t::object: {
      ValueDict d;
      for (auto it = j.begin(); it != j.end(); ++it) {
        const std::string child = path.empty() ? it.key() : path + "." + it.key();
        checked(it.key(), (path.empty() ? std::string("(context)") : path) + " (a key)");
        d.emplace_back(Value::str(it.key()), from_json(it.value(), child));
      }
      return Value::make_dict(std::move(d));
    }
    default: return Value::none();
  }
}

ScopePtr make_globals() {
  auto g = std::make_shared<Scope>();
  g->vars["raise_exception"] = Value::function("raise_exception", [](CallArgs& a) -> Value {
    const Value msg = a.get_or(0, "message", Value::none());
    fail("chat template: ", py_str(msg));
  });
  g->vars["strftime_now"] = Value::function("strftime_now", [](CallArgs& a) -> Value {
    const Value* f = a.get(0, "format");
    if (!f || !f->is_string()) fail_line(a.line, "strftime_now() needs a format string");
    return Value::str(strftime_now(f->s));
  });
  g->vars["range"] = Value::function("range", [](CallArgs& a) -> Value {
    if (!a.kw.empty()) fail_line(a.line, "range() takes no keyword arguments");
    if (a.pos.empty() || a.pos.size() > 3) fail_line(a.line, "range expected 1 to 3 arguments");
    for (const auto& x : a.pos) {
      if (!x.is_int_like()) fail_line(a.line, "'" + py_type_name(x) + "' object cannot be interpreted as an integer");
    }
    int64_t start = 0, stop, step = 1;
    if (a.pos.size() == 1) {
      stop = a.pos[0].i;
    } else {
      start = a.pos[0].i;
      stop = a.pos[1].i;
      if (a.pos.size() == 3) step = a.pos[2].i;
    }
    if (step == 0) fail_line(a.line, "range() arg 3 must not be zero");
    ValueList out;
    for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
      if (out.size() >= 100000) fail_line(a.line, "Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
      out.push_back(Value::integer(k));
    }
    return Value::make_list(std::move(out));
  });
  auto make_mapping = [](CallArgs& a, const char* what) {
    if (a.pos.size() > 1) fail_line(a.line, std::string(what) + " expected at most 1 argument");
    ValueDict d;
    if (!a.pos.empty()) {
      const Value& src = a.pos[0];
      if (src.is_dict()) {
        d = *src.dict;
      } else {
        for (const auto& pair : iterate(src, a.line)) {
          const ValueList kv = iterate(pair, a.line);
          if (kv.size() != 2) fail_line(a.line, std::string(what) + ": sequence elements must have length 2");
          dict_set(d, kv[0], kv[1]);
        }
      }
    }
    for (const auto& [k, x] : a.kw) dict_set(d, Value::str(k), x);
    return d;
  };
  g->vars["dict"] = Value::function("dict", [make_mapping](CallArgs& a) {
    return Value::make_dict(make_mapping(a, "dict"));
  });
  g->vars["namespace"] = Value::function("namespace", [make_mapping](CallArgs& a) {
    auto o = std::make_shared<Object>();
    o->type_name = "Namespace";
    o->assignable = true;
    for (auto& [k, x] : make_mapping(a, "namespace")) {
      if (!k.is_string()) fail_line(a.line, "namespace keywords must be strings");
      o->set(k.s, x);
    }
    Value v;
    v.type = Value::Type::kObject;
    v.obj = o;
    return v;
  });
  return g;
}

// A parsed template. Rendering a dataset calls us once per example with the same source, so each
// thread keeps the last one it parsed (the AST is immutable once analyzed).
struct Program {
  std::string source;
  Body body;
  std::vector<std::string> root_undef;
};

std::shared_ptr<const Program> compile(const std::string& source) {
  thread_local std::shared_ptr<const Program> last;
  if (last && last->source == source) return last;
  if (const auto bad = utf8_invalid_at(source)) {
    const auto line = 1 + std::count(source.begin(), source.begin() + static_cast<std::ptrdiff_t>(*bad), '\n');
    fail_line(static_cast<int>(line), "invalid UTF-8 at byte " + std::to_string(*bad));
  }
  auto p = std::make_shared<Program>();
  p->source = source;
  p->body = Parser(Lexer(source).run()).parse();
  p->root_undef = analyze_scopes(p->body);
  last = p;
  return p;
}

std::string render(const std::string& source, const Value& context) {
  if (!context.is_dict()) fail("chat template: context must be a JSON object");
  const auto program = compile(source);
  auto vars = child_scope(make_globals());
  for (const auto& [k, v] : *context.dict) vars->vars[k.s] = v;
  auto root = frame_scope(vars, program->root_undef);
  std::string out;
  Interp interp;
  interp.exec(program->body, root, out);
  return out;
}

}  // namespace

std::string render_chat_template(const std::string& source, const nlohmann::ordered_json& context) {
  return render(source, from_json(context, ""));
}

}  // namespace ftune::tok
