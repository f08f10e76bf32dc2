// Parsing JSON text that users hand us (tokenizer files, dataset lines) with errors that say
// where: invalid UTF-8 is reported with the JSON field that holds it ("added_tokens[3].content"),
// not as nlohmann's parse_error. Trade-off: on invalid input the text is parsed a second time
// (with a marker in place of the bad bytes) to find the field; valid input pays one scan.
// Defines find_invalid_utf8_in_json() and parse_json_text().
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <string_view>

namespace ftune::tok {

struct JsonUtf8Problem {
  size_t offset = 0;  // byte offset of the first invalid byte in the text
  int64_t line = 1;   // 1-based line of that byte
  std::string field;  // "a.b[2].c", "a.b (a key)", or empty when outside any string
};

// The first invalid UTF-8 in `text` and the JSON field that holds it; nullopt when valid.
std::optional<JsonUtf8Problem> find_invalid_utf8_in_json(std::string_view text);

// "<field>: invalid UTF-8 at byte N" (or "invalid UTF-8 at byte N" outside strings); `with_line`
// adds the line number for multi-line files.
std::string describe(const JsonUtf8Problem& p, bool with_line);

// Parses `text`; throws ftune::Error "<origin>: <field>: invalid UTF-8 at line L (byte N)" or
// "<origin>: invalid JSON: <parser message>".
template <typename Json = nlohmann::json>
Json parse_json_text(std::string_view text, const std::string& origin);

}  // namespace ftune::tok
