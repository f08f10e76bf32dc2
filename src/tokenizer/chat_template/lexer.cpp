// The chat-template lexer (see lexer.h): one pass over the source finding `{{`, `{%` and `{#`,
// applying trim_blocks / lstrip_blocks / `-` / `+` to the text between tags, then tokenizing
// the tag body (Python-style numbers and string escapes, balanced brackets).
// Trade-off: a hand-written scanner over jinja2's regexes, so line numbers for errors come for
// free and no regex engine is needed; its rules mirror jinja2's lexer.py case by case.
#include "tokenizer/chat_template/lexer.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdlib>
#include <string_view>
#include <system_error>
#include <utility>

#include "tokenizer/chat_template/text.h"
#include "tokenizer/unicode.h"

namespace ftune::tok::jinja {

namespace {

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
            out += py_escape_cp(cp);
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

}  // namespace

std::vector<Token> tokenize(const std::string& source) { return Lexer(source).run(); }

}  // namespace ftune::tok::jinja
