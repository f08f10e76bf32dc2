// Python str semantics on UTF-8 std::string for the chat-template interpreter (chat_template/):
// code points, str.isspace(), case mapping, strip/split/replace/splitlines, int()/float() text
// parsing, padding, repr() of str and float, HTML escaping; plus fail_line(), its error form.
// Trade-off: strings stay UTF-8 (what contexts and outputs are) and are decoded to UTF-32 only
// inside an operation that counts or indexes code points; case mapping uses glibc's C.UTF-8
// tables, so Python's special casings are not applied (except upper()'s ß -> SS).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ftune::tok::jinja {

// Throws ftune::Error "chat template: line <line>: <what>"; every template error goes here.
[[noreturn]] void fail_line(int line, const std::string& what);

// Bounds that keep every template fast and small whatever its source (chat_template_fuzz found
// templates that ran for hours or exhausted memory: nested range() loops, a string doubled by
// {% set %} in a loop, a long string printed in a loop). transformers' sandbox bounds only range();
// these sit far above anything a chat template needs.
constexpr size_t kMaxStringBytes = size_t{1} << 26;  // 64 MiB: any string value, the output too
constexpr int64_t kMaxSteps = 1'000'000;              // statements run plus loop iterations
// Throws "chat template: string result too large (over 64 MiB)".
[[noreturn]] void fail_too_large();
// out += piece, failing instead when the result would exceed kMaxStringBytes.
void append_bounded(std::string& out, std::string_view piece);

std::u32string to_u32(std::string_view s);
std::string from_u32(std::u32string_view s);

// Python's str.isspace() / the `\s` of a str regex.
bool is_py_space(char32_t c);
// Byte length of `s` without its trailing whitespace (Python's rstrip()).
size_t rstrip_len(std::string_view s);
// Byte offset after the whitespace run starting at `i` (the `\s*` of a regex).
size_t skip_space(std::string_view s, size_t i);

char32_t to_upper_cp(char32_t c);
char32_t to_lower_cp(char32_t c);
bool is_cased_cp(char32_t c);
bool is_upper_cp(char32_t c);
bool is_lower_cp(char32_t c);
bool is_alpha_cp(char32_t c);
bool is_digit_cp(char32_t c);
std::string upper_str(std::string_view s);
std::string lower_str(std::string_view s);
std::string capitalize_str(std::string_view s);  // str.capitalize()
std::string py_title_str(std::string_view s);    // str.title()

std::string py_float_repr(double d);         // repr(float)
std::string py_str_repr(std::string_view s);  // repr(str)
// Python's backslash escape of one code point: \xNN, \uNNNN or \UNNNNNNNN.
std::string py_escape_cp(char32_t c);

// str.strip / lstrip / rstrip; `chars` null means whitespace.
std::string py_strip(const std::string& s, const std::u32string* chars, bool left, bool right);
// str.split on code points; `sep` null splits on whitespace runs; maxsplit < 0: no limit.
std::vector<std::u32string> split_u32(const std::u32string& u, const std::u32string* sep, int64_t maxsplit);
std::string py_replace(const std::string& s, const std::string& old_s, const std::string& new_s, int64_t count);
std::vector<std::string> py_splitlines(const std::string& s, bool keepends);
// int(text, base) / float(text); nullopt where Python raises ValueError.
std::optional<int64_t> py_parse_int(const std::string& text, int base);
std::optional<double> py_parse_float(const std::string& text);
// Pads to `width` code points: align -1 left (ljust), 0 center, 1 right (rjust).
std::string pad_str(const std::string& s, int64_t width, char32_t fill, int align);
// markupsafe.escape: & < > " '.
std::string html_escape(const std::string& s);

}  // namespace ftune::tok::jinja
