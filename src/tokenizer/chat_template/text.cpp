// Python str semantics on UTF-8 text for the chat-template interpreter; see text.h. Trade-off:
// each operation decodes to UTF-32 when it needs code-point positions (strip, split, padding)
// and works on bytes otherwise (find, replace), matching Python's results either way.
#include "tokenizer/chat_template/text.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <locale>
#include <string>
#include <system_error>

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace ftune::tok::jinja {

void fail_line(int line, const std::string& what) { fail("chat template: line ", line, ": ", what); }

void fail_too_large() { fail("chat template: string result too large (over 64 MiB)"); }

void append_bounded(std::string& out, std::string_view piece) {
  if (out.size() + piece.size() > kMaxStringBytes) fail_too_large();
  out += piece;
}

// The template and every context string are checked to be valid UTF-8 on entry (compile() and
// from_json() in chat_template.cpp), so the shared decoder of unicode.h applies. Escapes such
// as '\udc80' can still produce a lone surrogate; utf8_append writes it as three bytes and
// utf8_next reads it back unchanged.
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

namespace {

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

}  // namespace

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

namespace {

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

}  // namespace

std::string py_escape_cp(char32_t c) {
  char buf[16];
  if (c < 0x100) {
    std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned>(c));
  } else if (c < 0x10000) {
    std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
  } else {
    std::snprintf(buf, sizeof buf, "\\U%08x", static_cast<unsigned>(c));
  }
  return buf;
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
      out += py_escape_cp(c);
    } else {
      utf8_append(out, c);
    }
  }
  out += q;
  return out;
}

namespace {

bool in_chars(char32_t c, const std::u32string* chars) {
  return chars ? chars->find(c) != std::u32string::npos : is_py_space(c);
}

}  // namespace

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

}  // namespace ftune::tok::jinja
